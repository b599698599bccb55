"""Group quantization and bit packing of K/V (prune/groupquant.py) against brute-force oracles."""

from __future__ import annotations

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.groupquant import (
    KVQuantSpec,
    dequantize_groups,
    dequantize_keys,
    dequantize_values,
    fake_quantize_kv,
    pack_bits,
    packed_bytes,
    quantize_groups,
    quantize_keys,
    quantize_values,
    unpack_bits,
)


def _kv(seed: int = 0, b: int = 2, h: int = 3, t: int = 128, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 5] *= 20  # an outlier channel, as Llama keys have
    return x


def _brute_force_groups(x: torch.Tensor, bits: int, group: int):
    """Element by element: each group's fp16 scale/zero taken from the implementation, codes recomputed
    by hand; returns per-element scale (for the error bound) and the reconstruction."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    codes, scale, zero = quantize_groups(x, bits, group)
    scale, zero = scale.reshape(len(rows), -1).float().tolist(), zero.reshape(len(rows), -1).float().tolist()
    recon, per_scale = [], []
    qmax = 2**bits - 1
    for r, row in enumerate(rows):
        out, sc = [], []
        for j, value in enumerate(row):
            s, z = scale[r][j // group], zero[r][j // group]
            lo = min(row[(j // group) * group : (j // group + 1) * group])
            hi = max(row[(j // group) * group : (j // group + 1) * group])
            assert z <= lo and z + qmax * s >= hi - 1e-6 * abs(hi)  # no element needs a clipped code
            code = min(qmax, max(0, round((value - z) / s))) if s > 0 else 0
            out.append(code * s + z)
            sc.append(s)
        recon.append(out)
        per_scale.append(sc)
    return torch.tensor(recon).view_as(x), torch.tensor(per_scale).view_as(x)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("group", [8, 32])
def test_round_trip_error_at_most_half_a_scale(bits: int, group: int) -> None:
    x = _kv(bits, b=1, h=2, t=4, d=64)
    codes, scale, zero = quantize_groups(x, bits, group)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert scale.dtype == zero.dtype == torch.float16
    got = dequantize_groups(codes, scale, zero)
    recon, per_scale = _brute_force_groups(x, bits, group)
    torch.testing.assert_close(got, recon, rtol=0, atol=1e-5 * float(x.abs().max()))
    err = (got - x).abs()
    assert bool((err <= per_scale / 2 * (1 + 1e-4) + 1e-6).all()), float((err - per_scale / 2).max())


def test_sixteen_bits_is_nearly_lossless() -> None:
    x = _kv(3)
    k = dequantize_keys(quantize_keys(x, 16, 64), 64)
    v = dequantize_values(quantize_values(x, 16, 64), 64)
    assert float((k - x).abs().max()) < 1e-3 and float((v - x).abs().max()) < 1e-3


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_unpack_exact_and_byte_count(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for m in (1, 7, 64, 100):
        codes = torch.randint(0, 2**bits, (3, 2, m), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.shape[-1] == packed_bytes(m, bits) == -(-m * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, m), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [3, 5, 6, 7, 9, 12, 15])
def test_pack_is_the_little_endian_bit_stream_built_by_hand(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (2, 13), generator=torch.Generator().manual_seed(bits))
    for row, packed in zip(codes.tolist(), pack_bits(codes, bits).tolist(), strict=True):
        stream = "".join(format(c, f"0{bits}b")[::-1] for c in row)  # each code LSB first
        stream += "0" * (-len(stream) % 8)
        assert packed == [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]


def test_pack_layout_by_hand() -> None:
    # 4 bits: low nibble first; 3 bits: codes 5, 3, 7 -> bits 101 110 111 (LSB first) = 0b11_011_101, then 0b1
    assert pack_bits(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


def test_nbytes_hand_count() -> None:
    # 1 x 3 heads x 128 tokens x 64 channels, 4 bits, groups of 64
    x = _kv(1, b=1, h=3, t=128, d=64)
    k, v = quantize_keys(x, 4, 64), quantize_values(x, 4, 64)
    codes = 3 * 128 * 64 * 4 // 8  # 24576 bytes of codes each
    assert k.nbytes == codes + 2 * 2 * (3 * 2 * 64)  # a scale + a zero per channel per 64-token block
    assert v.nbytes == codes + 2 * 2 * (3 * 128 * 1)  # a scale + a zero per token per 64-channel group
    # 3 bits, value groups of 32: 64 x 3 / 8 = 24 bytes a token, 2 groups a token
    v3 = quantize_values(x, 3, 32)
    assert v3.nbytes == 3 * 128 * 24 + 2 * 2 * (3 * 128 * 2)


def test_keys_are_per_channel_values_per_token() -> None:
    x = _kv(2, b=1, h=1, t=64, d=64)
    k = quantize_keys(x, 4, 32)
    assert k.scale.shape == (1, 1, 2, 64)  # 2 blocks of 32 tokens x 64 channels
    # the outlier channel 5 gets its own wide scale; the other channels stay fine
    assert float(k.scale.float()[..., 5].min()) > 5 * float(k.scale.float()[..., 6].max())
    v = quantize_values(x, 4, 32)
    assert v.scale.shape == (1, 1, 64, 2)
    # per channel the keys' error is bounded by that channel's scale, not the outlier's
    kq, _ = fake_quantize_kv(x, x, KVQuantSpec(4, 4, 32, 32))
    assert float((kq - x)[..., 6].abs().max()) <= float(k.scale.float()[..., 6].max()) / 2 * 1.001
    assert torch.equal(kq, dequantize_keys(k, 64))


def test_constant_group_is_exact() -> None:
    x = torch.full((1, 1, 64, 64), 0.5)
    assert torch.equal(dequantize_keys(quantize_keys(x, 2, 64), 64), x)
    assert torch.equal(dequantize_values(quantize_values(x, 2, 64), 64), x)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True])
def test_bad_bits(bits) -> None:
    with pytest.raises(DynapruneError, match="bits"):
        quantize_groups(torch.zeros(1, 64), bits, 64)


def test_bad_group() -> None:
    with pytest.raises(DynapruneError, match="does not divide"):
        quantize_values(torch.zeros(1, 1, 4, 64), 4, 48)
    with pytest.raises(DynapruneError, match="does not divide"):
        quantize_keys(torch.zeros(1, 1, 40, 64), 4, 32)
    with pytest.raises(DynapruneError, match="positive"):
        quantize_groups(torch.zeros(1, 64), 4, 0)
    with pytest.raises(DynapruneError, match="value bits"):
        KVQuantSpec(4, 0, 64, 64)

"""8-bit scales / zero-points (prune/scalequant.py) and the Hadamard rotation (prune/hadamard.py) of the
packed K/V cache, against element-by-element brute force and hand counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune import groupquant as gq
from dynaprune.prune.hadamard import hadamard, rotate


def _kv(seed: int = 0, b: int = 1, h: int = 2, t: int = 64, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 3] = x[..., 3] * 15 + 4  # an outlier channel off zero, as Llama keys have
    return x


def _brute_keys(x: torch.Tensor, bits: int, group: int, s8: torch.Tensor, z8: torch.Tensor) -> torch.Tensor:
    """Element by element with python floats: each (block, channel) group's stored scale / zero, the
    covering invariants checked by hand, codes rounded by hand."""
    b, h, t, d = x.shape
    qmax = 2**bits - 1
    out = torch.empty_like(x)
    for i, j, blk, c in itertools.product(range(b), range(h), range(t // group), range(d)):
        col = [float(x[i, j, blk * group + u, c]) for u in range(group)]
        s, z = float(s8[i, j, blk, c]), float(z8[i, j, blk, c])
        assert z <= min(col) and z + qmax * s >= max(col) * (1 - 1e-6) - 1e-6  # nothing clipped
        for u, value in enumerate(col):
            code = min(qmax, max(0, round((value - z) / s))) if s > 0 else 0
            out[i, j, blk * group + u, c] = code * s + z
            assert abs(out[i, j, blk * group + u, c] - value) <= s / 2 * (1 + 1e-4) + 1e-6
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_eight_bit_key_scales_against_brute_force(bits: int) -> None:
    x = _kv(bits)
    p = gq.quantize_keys(x, bits, 16, scale_bits=8)
    assert p.scale.values.dtype == p.zero.values.dtype == torch.uint8
    # brute force: the stored 8-bit codes decoded by hand, row by row (one row = a block's 16 channels)
    s_codes, step, base = p.scale.values, p.scale.step, p.scale.base
    s8 = torch.tensor(
        [
            [
                [
                    [float(s_codes[i, j, r, c]) * float(step[i, j, r, 0]) + float(base[i, j, r, 0]) for c in range(16)]
                    for r in range(4)
                ]
                for j in range(2)
            ]
            for i in range(1)
        ]
    )
    z_codes, zstep, zbase = p.zero.values, p.zero.step, p.zero.base
    z8 = torch.tensor(
        [
            [
                [
                    [
                        float(z_codes[i, j, r, c]) * float(zstep[i, j, r, 0]) + float(zbase[i, j, r, 0])
                        for c in range(16)
                    ]
                    for r in range(4)
                ]
                for j in range(2)
            ]
            for i in range(1)
        ]
    )
    torch.testing.assert_close(p.scale.float(), s8, rtol=1e-6, atol=1e-7)
    ref = _brute_keys(x, bits, 16, s8, z8)
    torch.testing.assert_close(gq.dequantize_keys(p, 16), ref, rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("bits", [2, 4])
def test_eight_bit_value_scales_bound_and_rows(bits: int) -> None:
    x = _kv(10 + bits, t=32)
    p = gq.quantize_values(x, bits, 8, scale_bits=8, rows=16)
    assert p.scale.step.shape == (1, 2, 2, 1)  # 32 tokens in rows of 16 tokens
    s, z = p.scale.float(), p.zero.float()  # (1, 2, 32, 2)
    g = x.unflatten(-1, (-1, 8))
    assert bool((z <= g.amin(-1)).all()) and bool((z + (2**bits - 1) * s >= g.amax(-1) - 1e-6).all())
    err = (gq.dequantize_values(p, 16).unflatten(-1, (-1, 8)) - g).abs()
    assert bool((err <= s[..., None] / 2 * (1 + 1e-4) + 1e-6).all())
    with pytest.raises(DynapruneError, match="scale rows"):
        gq.quantize_values(x[:, :, :24], bits, 8, scale_bits=8, rows=16)


def test_eight_bit_nbytes_hand_count() -> None:
    # 1 x 3 heads x 128 tokens x 64 channels, 2 bits, key groups of 32 tokens, value groups of 32 channels
    x = _kv(1, b=1, h=3, t=128, d=64)
    k, v = gq.quantize_kv(x, x, gq.KVQuantSpec(2, 2, 32, 32, scale_bits=8))
    codes = 3 * 128 * 64 * 2 // 8
    blocks = 3 * 128 // 32  # key blocks (one 8-bit row each) and value rows (32 tokens each)
    # a uint8 scale + a uint8 zero per channel per block, an fp16 step + base per row of each
    assert k.nbytes == codes + 2 * (3 * 4 * 64) + 2 * 2 * 2 * blocks
    assert v.nbytes == codes + 2 * (3 * 128 * 2) + 2 * 2 * 2 * blocks
    k16, v16 = gq.quantize_kv(x, x, gq.KVQuantSpec(2, 2, 32, 32))
    assert k16.nbytes == codes + 2 * 2 * (3 * 4 * 64) and v16.nbytes == codes + 2 * 2 * (3 * 128 * 2)


def test_hadamard_is_orthonormal_and_rotation_round_trips() -> None:
    h = hadamard(8)
    assert torch.allclose(h * 8**0.5, h.sign(), atol=1e-6) and torch.allclose(h @ h.T, torch.eye(8), atol=1e-6)
    # brute force Sylvester entry: (-1)^popcount(i & j)
    for i, j in itertools.product(range(8), range(8)):
        assert round(float(h[i, j]) * 8**0.5) == (-1) ** bin(i & j).count("1")
    x = _kv(4)
    torch.testing.assert_close(rotate(rotate(x)), x, rtol=0, atol=1e-5)
    with pytest.raises(DynapruneError, match="power-of-two"):
        hadamard(48)


def test_rotated_spec_is_the_rotated_quantizer_rotated_back() -> None:
    x = _kv(5, t=32)
    spec = gq.KVQuantSpec(3, 3, 16, 8, rotate="kv")
    k, v = gq.fake_quantize_kv(x, x, spec)
    plain = gq.KVQuantSpec(3, 3, 16, 8)
    rk, rv = gq.fake_quantize_kv(x @ hadamard(16), x @ hadamard(16), plain)
    torch.testing.assert_close(k, rk @ hadamard(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, rv @ hadamard(16), rtol=0, atol=1e-5)
    # keys only: values equal the unrotated quantizer's exactly
    only_k = gq.KVQuantSpec(3, 3, 16, 8, rotate="k")
    _, v_only = gq.dequantize_kv(*gq.quantize_kv(x, x, only_k), only_k, 16)
    assert torch.equal(v_only, gq.fake_quantize_kv(x, x, plain)[1])


def test_bad_scale_bits_and_rotation() -> None:
    with pytest.raises(DynapruneError, match="scale bits"):
        gq.KVQuantSpec(4, 4, 64, 64, scale_bits=4)
    with pytest.raises(DynapruneError, match="rotate"):
        gq.KVQuantSpec(4, 4, 64, 64, rotate="q")

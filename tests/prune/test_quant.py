"""Linear symmetric and progressive quantization (Sec. III-D) against integer/numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.prune.quant import (
    fake_quantize,
    max_code,
    progressive_attention_probs,
    quantize_symmetric,
    quantized_attention_probs,
    quantized_values,
    split_msb_lsb,
)

PAPER_SETTINGS = [(4, 4), (6, 4), (8, 4), (10, 4), (12, 4)]


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------- static quantization


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
@pytest.mark.parametrize("dim", [-1, None])
def test_quantize_matches_numpy(bits: int, dim: int | None) -> None:
    x = _randn(3, 5, 7, seed=bits)
    x[0, 0] = 0.0  # an all-zero row gets scale 1 and codes 0
    got = quantize_symmetric(x, bits, dim)
    xn = x.numpy().astype(np.float32)
    amax = np.abs(xn).max(axis=-1, keepdims=True) if dim == -1 else np.abs(xn).max()
    qmax = max(1, 2 ** (bits - 1) - 1)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(xn / scale), -qmax, qmax).astype(np.int32)  # numpy also rounds half to even
    assert got.codes.dtype == torch.int32 and got.bits == bits
    np.testing.assert_array_equal(got.codes.numpy(), codes)
    np.testing.assert_array_equal(got.scale.numpy(), scale)
    assert int(got.codes.abs().max()) <= qmax == max_code(bits)


def test_sixteen_bits_error_bound() -> None:
    # Stated bound: |x - Q16(x)| <= scale / 2 * (1 + 2^-10) + 2^-23 |x|, with scale = max|x| / 32767:
    # half a quantization step plus float32 rounding of x / scale and of codes * scale.
    for seed, magnitude in [(0, 1.0), (1, 1e-3), (2, 1e4)]:
        x = _randn(4, 64, 96, seed=seed, scale=magnitude)
        q = quantize_symmetric(x, 16)
        error = (q.dequantize() - x).abs()
        bound = q.scale / 2 * (1 + 2**-10) + x.abs() * 2**-23
        assert bool((error <= bound).all())
        assert float((error / q.scale).max()) > 0.45  # the bound is tight: errors do reach half a step


def test_fake_quantize_dtype_and_idempotence() -> None:
    x = _randn(2, 8, 16)
    once = fake_quantize(x, 8)
    assert torch.equal(fake_quantize(once, 8), once)
    assert fake_quantize(x.to(torch.bfloat16), 8).dtype == torch.float32
    with pytest.raises(ValueError):
        max_code(17)


# ---------------------------------------------------------------------------- MSB / LSB split


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_split_reconstructs_exactly(msb_bits: int, lsb_bits: int, seed: int) -> None:
    if msb_bits + lsb_bits > 16:
        msb_bits = 16 - lsb_bits
    x = _randn(3, 11, seed=seed)
    split = split_msb_lsb(x, msb_bits, lsb_bits)
    reference = quantize_symmetric(x, msb_bits + lsb_bits)
    assert torch.equal(split.full(), reference.dequantize())  # MSB + LSB: bit for bit
    # the integer layout, by hand: c = msb * 2^L + lsb, msb signed M-bit, lsb unsigned L-bit
    for code, msb, lsb in zip(
        reference.codes.flatten().tolist(), split.msb.flatten().tolist(), split.lsb.flatten().tolist(), strict=True
    ):
        assert msb * 2**lsb_bits + lsb == code
        assert 0 <= lsb < 2**lsb_bits
        assert -(2 ** (msb_bits - 1)) <= msb <= 2 ** (msb_bits - 1) - 1
        assert msb == code // 2**lsb_bits  # top bits of the two's complement = floor division
    # MSB-only: the M-bit mid-rise value, on a grid of step 2^L * scale, unbiased within half a step
    msb_only = split.msb_only()
    step = split.scale * 2**lsb_bits
    grid = msb_only / step - 0.5
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    assert bool(((msb_only - x).abs() <= step / 2 + split.scale / 2 + 1e-5 * x.abs().amax()).all())


@pytest.mark.parametrize(("msb_bits", "lsb_bits"), PAPER_SETTINGS)
def test_more_bits_less_error(msb_bits: int, lsb_bits: int) -> None:
    x = _randn(64, 64, seed=msb_bits)
    split = split_msb_lsb(x, msb_bits, lsb_bits)
    msb_error = (split.msb_only() - x).abs().mean()
    full_error = (split.full() - x).abs().mean()
    assert full_error < msb_error / 4
    # MSB-only is about as good as direct M-bit quantization (mid-rise vs mid-tread grid)
    direct = (fake_quantize(x, msb_bits) - x).abs().mean()
    assert msb_error < 1.5 * direct


# ---------------------------------------------------------------------------- progressive attention


def _qk(batch=2, heads=4, kv_heads=2, n_q=5, n_k=9, dim=8, seed=0, sharp=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen) * sharp
    k = torch.randn(batch, kv_heads, n_k, dim, generator=gen)
    return q, k


@pytest.mark.parametrize(("msb_bits", "lsb_bits"), PAPER_SETTINGS)
def test_threshold_zero_never_recomputes(msb_bits: int, lsb_bits: int) -> None:
    q, k = _qk(seed=msb_bits)
    got = progressive_attention_probs(q, k, 8**-0.5, msb_bits, lsb_bits, 0.0)
    assert not got.needs_lsb.any() and got.rows_needing_lsb == 0 and got.lsb_fraction == 0.0
    q_msb = split_msb_lsb(q, msb_bits, lsb_bits).msb_only()
    k_msb = split_msb_lsb(k, msb_bits, lsb_bits).msb_only().repeat_interleave(2, dim=1)
    expected = ((q_msb @ k_msb.transpose(-1, -2)) * 8**-0.5).softmax(-1)
    assert torch.equal(got.probs, expected)
    n_key_rows = 2 * 2 * 9
    assert got.key_bits_fetched == n_key_rows * 8 * msb_bits
    assert got.key_bits_full == n_key_rows * 8 * (msb_bits + lsb_bits)
    assert got.query_bits_fetched == 2 * 4 * 5 * 8 * msb_bits


@pytest.mark.parametrize(("msb_bits", "lsb_bits"), PAPER_SETTINGS)
def test_threshold_one_always_recomputes_and_equals_full_quantized(msb_bits: int, lsb_bits: int) -> None:
    q, k = _qk(seed=10 + msb_bits, sharp=30.0)  # sharp rows reach max probability 1.0 in float32
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    got = progressive_attention_probs(q, k, 8**-0.5, msb_bits, lsb_bits, 1.0, mask)
    assert got.needs_lsb.all() and got.lsb_fraction == 1.0
    assert torch.equal(got.probs, quantized_attention_probs(q, k, 8**-0.5, msb_bits + lsb_bits, mask))
    assert got.key_bits_fetched == got.key_bits_full


def test_rows_follow_the_threshold_rule() -> None:
    q, k = _qk(batch=3, heads=4, kv_heads=4, n_q=6, n_k=12, seed=5, sharp=2.0)
    scale, threshold = 8**-0.5, 0.3
    mask = torch.ones(3, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False  # padded keys in row 1
    got = progressive_attention_probs(q, k, scale, 4, 4, threshold, mask)
    msb_path = progressive_attention_probs(q, k, scale, 4, 4, 0.0, mask).probs
    full_path = quantized_attention_probs(q, k, scale, 8, mask)
    assert 0 < got.rows_needing_lsb < got.rows  # a mix, so the test means something
    for b in range(3):
        for h in range(4):
            for i in range(6):
                needs = float(msb_path[b, h, i].max()) < threshold
                assert bool(got.needs_lsb[b, h, i]) == needs
                assert torch.equal(got.probs[b, h, i], (full_path if needs else msb_path)[b, h, i])
    # bits, by hand: per (batch, KV head) its visible K rows, MSBs always, LSBs if any row needed them
    key_bits = 0
    for b in range(3):
        visible = 9 if b == 1 else 12
        for h in range(4):
            key_bits += visible * 8 * (4 + (4 if got.needs_lsb[b, h].any() else 0))
    assert got.key_bits_fetched == key_bits
    assert got.query_bits_fetched == (got.rows * 4 + got.rows_needing_lsb * 4) * 8
    assert got.rows == 3 * 4 * 6


def test_gqa_key_lsb_counted_per_group_and_static_query() -> None:
    q, k = _qk(batch=1, heads=4, kv_heads=2, n_q=1, n_k=6, seed=7)
    got = progressive_attention_probs(q, k, 8**-0.5, 6, 4, 0.5, query_bits=16)
    groups_needing = got.needs_lsb.reshape(1, 2, 2).any(-1).sum()
    assert got.key_bits_fetched == 2 * 6 * 8 * 6 + int(groups_needing) * 6 * 8 * 4
    assert got.query_bits_fetched == 4 * 8 * 16
    static_q = fake_quantize(q, 16)
    k_msb = split_msb_lsb(k, 6, 4).msb_only().repeat_interleave(2, dim=1)
    msb_probs = ((static_q @ k_msb.transpose(-1, -2)) * 8**-0.5).softmax(-1)
    assert torch.equal(got.needs_lsb, msb_probs.amax(-1) < 0.5)


def test_quantized_values() -> None:
    v = _randn(2, 3, 5, 4)
    got = quantized_values(v, 6)
    assert torch.equal(got.values, fake_quantize(v, 6)) and got.bits_fetched == v.numel() * 6


def test_bad_arguments() -> None:
    q, k = _qk()
    with pytest.raises(ValueError):
        progressive_attention_probs(q, k, 1.0, 4, 4, 1.5)
    with pytest.raises(ValueError):
        split_msb_lsb(q, 12, 8)
    with pytest.raises(ValueError):
        split_msb_lsb(q, 4, 0)

"""Progressive quantization on group-quantized K (per channel) and V (per token), prune/quant.py,
against brute-force nearest-level references (element by element) and groupquant's fake_quantize."""

from __future__ import annotations

import pytest
import torch

from dynaprune.prune import groupquant
from dynaprune.prune.quant import (
    bits_fetched,
    progressive_output,
    progressive_probs,
    quantize_key_channels,
    quantize_value_tokens,
    quantized_key_slots,
    residual_keys,
    residual_output,
)

SCALE = 8**-0.5


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _keys(b=2, h=3, n=16, d=8, seed=0) -> torch.Tensor:
    k = _randn(b, h, n, d, seed=seed)
    k[..., 1] *= 20.0  # an outlier channel, as Llama keys have
    return k


def _nearest_reference(x: torch.Tensor, msb: int, lsb: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force, element by element: the MSB value is the nearest of the group's 2^M grid points
    ``zero + j scale`` (the fp16 scale and zero-point groupquant stores for an M-bit group), the MSB + LSB
    value the nearest of the 2^L cell centres ``msb + (l + 1/2) scale / 2^L - scale / 2``."""
    _, scale, zero = groupquant.quantize_groups(x, msb, group)
    g = x.float().unflatten(-1, (-1, group))
    msb_out, full_out = torch.empty_like(g), torch.empty_like(g)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in g.shape)):
        idx = tuple(idx.tolist())
        s, z, value = float(scale[idx[:-1]]), float(zero[idx[:-1]]), float(g[idx])
        m = min((z + j * s for j in range(2**msb)), key=lambda level: abs(level - value))
        cells = [m + (j + 0.5) * s / 2**lsb - s / 2 for j in range(2**lsb)]
        msb_out[idx], full_out[idx] = m, min(cells, key=lambda level: abs(level - value))
    return msb_out.flatten(-2), full_out.flatten(-2)


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


@pytest.mark.parametrize(("msb", "lsb"), [(3, 4), (4, 4), (6, 4), (2, 2)])
def test_keys_per_channel_msb_is_round_to_nearest_and_lsb_refines(msb: int, lsb: int) -> None:
    k = _keys(b=1, h=2, n=8, d=4, seed=msb)
    got = quantize_key_channels(k, msb, lsb, group=4)
    ref_msb, ref_full = (_per_channel(t) for t in _nearest_reference(_per_channel(k), msb, lsb, 4))
    torch.testing.assert_close(got.msb_only, ref_msb, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.full, ref_full, rtol=0, atol=1e-5)
    # the MSBs alone: groupquant's M-bit quantization along the tokens of each channel
    torch.testing.assert_close(got.msb_only, _per_channel(groupquant.fake_quantize(_per_channel(k), msb, 4)),
                               rtol=0, atol=1e-5)
    # per channel: the outlier channel does not widen the others' steps
    step = (k[..., 0].amax() - k[..., 0].amin()) / (2**msb - 1)
    assert (got.msb_only[..., 0] - k[..., 0]).abs().max() <= step / 2 * 1.01


@pytest.mark.parametrize(("msb", "lsb"), [(3, 4), (4, 4), (6, 4), (4, 2)])
def test_msb_plus_lsb_is_within_a_direct_m_plus_l_bit_quantizers_bound(msb: int, lsb: int) -> None:
    """Every group: |MSB + LSB - x| <= (its range) / (2 (2^(M+L) - 1)) x (2^(M+L) - 1) / ((2^M - 1) 2^L),
    the direct (M+L)-bit round-to-nearest bound times a factor of at most 1.14 (fp16 scales: +1%)."""
    v = _randn(2, 3, 16, 64, seed=11, scale=3.0)
    got = quantize_value_tokens(v, msb, lsb, group=16)
    g, err = v.unflatten(-1, (-1, 16)), (got.full - v).abs().unflatten(-1, (-1, 16)).amax(-1)
    direct = (g.amax(-1) - g.amin(-1)) / (2 * (2 ** (msb + lsb) - 1))
    factor = (2 ** (msb + lsb) - 1) / ((2**msb - 1) * 2**lsb)
    assert factor <= 1.14 and bool((err <= direct * factor * 1.01 + 1e-6).all())
    # and the mean error is of the direct quantizer's size (times the factor; a group's min and max, exact
    # on the direct grid, fall on the boundary of two LSB cells here: up to 1.3x more)
    ours, direct_mean = (got.full - v).abs().mean(), (groupquant.fake_quantize(v, msb + lsb, 16) - v).abs().mean()
    assert float(ours) <= float(direct_mean) * factor * 1.3
    msb_err = (got.msb_only - v).abs().amax()
    assert float(err.amax()) < float(msb_err) / 2 ** (lsb - 1)  # the LSBs refine


def test_partial_groups_and_padding_keys_do_not_change_the_range() -> None:
    k = _keys(b=2, h=1, n=10, d=4, seed=3)
    valid = torch.ones(2, 1, 10, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding of batch row 1
    padded = k.clone()
    padded[1, :, :3] = 1e4  # garbage in the padding slots
    got = quantize_key_channels(padded, 4, 4, group=4, key_valid=valid)
    # brute force per (batch, group): the real keys of the group alone, the nearest-level reference on them
    for b, start in ((0, 0), (0, 4), (0, 8), (1, 0), (1, 4), (1, 8)):
        real = [j for j in range(start, min(start + 4, 10)) if valid[b, 0, j]]
        if not real:
            continue
        ref_msb, ref_full = (_per_channel(t) for t in _nearest_reference(_per_channel(k[b, :, real]), 4, 4, len(real)))
        torch.testing.assert_close(got.msb_only[b, :, real], ref_msb, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.full[b, :, real], ref_full, rtol=0, atol=1e-5)


def test_values_per_token_against_the_reference() -> None:
    v = _randn(2, 3, 5, 8, seed=4)
    got = quantize_value_tokens(v, 4, 4, group=4)
    ref_msb, ref_full = _nearest_reference(v, 4, 4, 4)
    torch.testing.assert_close(got.msb_only, ref_msb, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.full, ref_full, rtol=0, atol=1e-5)
    static = quantize_value_tokens(v, 4, 0, group=4)
    assert torch.equal(static.full, static.msb_only) and torch.equal(static.full, got.msb_only)


def test_rotation_quantizes_the_rotated_tensor_and_rotates_back() -> None:
    """quant_rotate: the reference on x H, read back times H (H orthonormal, its own inverse)."""
    d = 8
    h = torch.ones(1, 1)
    while h.shape[0] < d:  # Sylvester, built here independently of prune/hadamard.py
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / d**0.5
    k, v = _keys(1, 2, 8, d, seed=12), _randn(1, 2, 5, d, seed=13)
    got_k = quantize_key_channels(k, 3, 3, group=4, rotate=True)
    ref_msb, ref_full = (_per_channel(t) @ h for t in _nearest_reference(_per_channel(k @ h), 3, 3, 4))
    torch.testing.assert_close(got_k.msb_only, ref_msb, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k.full, ref_full, rtol=0, atol=1e-5)
    got_v = quantize_value_tokens(v, 3, 3, group=4, rotate=True)
    ref_msb, ref_full = (t @ h for t in _nearest_reference(v @ h, 3, 3, 4))
    torch.testing.assert_close(got_v.msb_only, ref_msb, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_v.full, ref_full, rtol=0, atol=1e-5)


def test_value_residual_reads_the_incomplete_group_in_full_precision() -> None:
    lq = lk = 9
    probs = torch.rand(1, 2, lq, lk, generator=torch.Generator().manual_seed(14)).tril()
    v, v_read = _randn(1, 2, lk, 8, seed=15), _randn(1, 2, lk, 8, seed=16)
    slots = quantized_key_slots(lq, lk, 4, causal=True)
    got = residual_output(probs @ v_read, probs, v_read, v, slots)
    for i in range(lq):  # row by row: fp values outside the quantized slots
        used = torch.stack([v_read[..., j, :] if slots[i, j] else v[..., j, :] for j in range(lk)], -2)
        torch.testing.assert_close(got[..., i, :], (probs[..., i, None, :] @ used)[..., 0, :], rtol=1e-5, atol=1e-6)
    assert torch.equal(residual_output(probs @ v_read, probs, v_read, v, None), probs @ v_read)


def test_causal_slots_brute_force_and_no_future_leak() -> None:
    lq, lk, g = 7, 12, 4
    slots = quantized_key_slots(lq, lk, g, causal=True)
    for i in range(lq):
        s = lk - lq + i
        for j in range(lk):  # key j read quantized iff its whole group exists at query slot s
            assert bool(slots[i, j]) == ((j // g + 1) * g <= s + 1)
    assert quantized_key_slots(lq, lk, g, causal=False) is None
    assert residual_keys(lk, g, True) == 0 and residual_keys(13, g, True) == 1 and residual_keys(13, g, False) == 0
    # a key changed at slot t changes no probability of a query before t
    q, k = _randn(1, 2, lk, 8, seed=1), _keys(1, 2, lk, 8, seed=2)
    mask = torch.ones(lk, lk, dtype=torch.bool).tril()[None, None]
    slots = quantized_key_slots(lk, lk, g, causal=True)
    before = progressive_probs(q, quantize_key_channels(k, 4, 4, g), k, SCALE, 0.3, mask, slots).probs
    for t in (5, 9):
        k2 = k.clone()
        k2[:, :, t] += 50.0
        after = progressive_probs(q, quantize_key_channels(k2, 4, 4, g), k2, SCALE, 0.3, mask, slots).probs
        assert torch.equal(after[:, :, :t], before[:, :, :t])
        assert not torch.equal(after[:, :, t:], before[:, :, t:])


def _softmax_rows(q, keys, k_fp, slots, mask):
    """Row by row: scores from quantized keys where slots say so, fp keys elsewhere."""
    b, h, lq, _ = q.shape
    out = torch.zeros(b, h, lq, keys.shape[2])
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                row = torch.stack([
                    q[bi, hi, i] @ (keys[bi, hi, j] if slots is None or slots[i, j] else k_fp[bi, hi, j])
                    for j in range(keys.shape[2])]) * SCALE
                row = row.masked_fill(~mask[0, 0, i], float("-inf"))
                out[bi, hi, i] = row.softmax(-1)
    return out


def test_row_decision_brute_force() -> None:
    lq = lk = 10
    q, k, v = _randn(2, 3, lq, 8, seed=5, scale=2.0), _keys(2, 3, lk, 8, seed=6), _randn(2, 3, lk, 8, seed=7)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril()[None, None]
    slots = quantized_key_slots(lq, lk, 4, causal=True)
    keys, values = quantize_key_channels(k, 4, 4, 4), quantize_value_tokens(v, 4, 4, 4)
    threshold = float(progressive_probs(q, keys, k, SCALE, 0.0, mask, slots).max_prob.median())  # a mix of rows
    got = progressive_probs(q, keys, k, SCALE, threshold, mask, slots)
    out = progressive_output(got.probs, values, got.needs_lsb)
    msb = _softmax_rows(q, keys.msb_only, k, slots, mask)
    full = _softmax_rows(q, keys.full, k, slots, mask)
    assert 0 < int(got.needs_lsb.sum()) < got.needs_lsb.numel()  # a mix, so the test means something
    for b in range(2):
        for h in range(3):
            for i in range(lq):
                needs = float(msb[b, h, i].max()) < threshold
                assert bool(got.needs_lsb[b, h, i]) == needs
                want = (full if needs else msb)[b, h, i]
                torch.testing.assert_close(got.probs[b, h, i], want, rtol=1e-5, atol=1e-6)
                v_used = values.full if needs else values.msb_only
                torch.testing.assert_close(out[b, h, i], got.probs[b, h, i] @ v_used[b, h], rtol=1e-5, atol=1e-6)


def test_threshold_zero_is_the_msb_reference_and_one_the_full_reconstruction() -> None:
    """Non-causal (every key quantized): T = 0 equals softmax over the round-to-nearest M-bit keys and
    the M-bit values (pure MSB); T = 1 recomputes every row with MSB + LSB K and V."""
    q, k, v = _randn(1, 2, 6, 8, seed=8), _keys(1, 2, 8, 8, seed=9), _randn(1, 2, 8, 8, seed=10)
    keys, values = quantize_key_channels(k, 4, 4, 4), quantize_value_tokens(v, 4, 4, 4)
    k_msb, k_full = (_per_channel(t) for t in _nearest_reference(_per_channel(k), 4, 4, 4))
    v_msb, v_full = _nearest_reference(v, 4, 4, 4)
    none = progressive_probs(q, keys, k, SCALE, 0.0)
    assert not none.needs_lsb.any()
    expected = ((q @ k_msb.transpose(-1, -2)) * SCALE).softmax(-1)
    torch.testing.assert_close(none.probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(progressive_output(none.probs, values, none.needs_lsb), expected @ v_msb,
                               rtol=1e-5, atol=1e-5)
    sharp = progressive_probs(q * 40, keys, k, SCALE, 1.0)  # max probabilities of exactly 1.0 too
    assert sharp.needs_lsb.all()
    expected = ((q * 40 @ k_full.transpose(-1, -2)) * SCALE).softmax(-1)
    torch.testing.assert_close(sharp.probs, expected, rtol=1e-4, atol=1e-5)
    out = progressive_output(sharp.probs, values, sharp.needs_lsb)
    torch.testing.assert_close(out, expected @ v_full, rtol=1e-4, atol=1e-4)


def test_bits_of_one_decode_step_by_hand() -> None:
    """One query over 130 keys, groups of 64: 128 keys at M bits + 32/64 bits of scale and zero-point,
    the 2 newest at 16; V rows at M + 32/64; LSBs (4 bits) of K and V where the head's row needed them;
    Q at 16."""
    q, k = torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 130, 64)
    needs = torch.tensor([[[True], [False], [False]]])
    got = bits_fetched(q, k, key_bits=4, lsb_bits=4, value_bits=4, value_lsb_bits=4, query_bits=16,
                       key_overhead=0.5, value_overhead=0.5, key_residual=2, needs_lsb=needs)
    assert got["rows"] == 3 and got["rows_needing_lsb"] == 1
    assert got["query_bits_fetched"] == 3 * 64 * 16
    assert got["key_bits_fetched"] == 3 * (128 * 64 * 4.5 + 2 * 64 * 16) + 128 * 64 * 4
    assert got["value_bits_fetched"] == 3 * 130 * 64 * 4.5 + 130 * 64 * 4
    assert got["key_bits_dense16"] == got["value_bits_dense16"] == 3 * 130 * 64 * 16
    # the value residual: the 2 newest V rows at 16 bits, without LSBs
    res = bits_fetched(q, k, key_bits=4, lsb_bits=4, value_bits=4, value_lsb_bits=4, query_bits=16,
                       key_overhead=0.5, value_overhead=0.5, key_residual=2, value_residual=2, needs_lsb=needs)
    assert res["value_bits_fetched"] == 3 * (128 * 64 * 4.5 + 2 * 64 * 16) + 128 * 64 * 4
    assert res["key_bits_fetched"] == got["key_bits_fetched"]


def test_bad_threshold() -> None:
    q, k = _randn(1, 1, 2, 8), _keys(1, 1, 4, 8)
    with pytest.raises(ValueError):
        progressive_probs(q, quantize_key_channels(k, 4, 4, 4), k, SCALE, 1.5)

"""HDP tensor functions against independent oracles: Python-loop references, exact dense fixed point,
error bounds, brute-force counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaprune.errors import DynapruneError
from dynaprune.prune.hdp import (
    FRACTIONAL_PRODUCTS_PER_MAC,
    HDPConfig,
    approximate_scores,
    block_importance,
    block_keep_mask,
    calibrate_block_ratio,
    calibrate_head_threshold,
    calibrate_scale,
    dense_fixed_point_scores,
    diagonal_blocks,
    expand_block_mask,
    hdp_attention,
    integer_scores,
    parse_fixed_bits,
    row_thresholds,
    score_error_bound,
    select_blocks,
    to_fixed_point,
    valid_pairs,
)

# ------------------------------------------------------------------ brute-force block reference


def reference_blocks(scores, b, rho, valid, causal, score="max", keep_first=False):
    """Row-balanced block selection with plain Python loops: returns (importance, valid, kept) dicts."""
    lq, lk = len(scores), len(scores[0])
    nbq, nbk = -(-lq // b), -(-lk // b)
    importance, is_valid = {}, {}
    for bi in range(nbq):
        for bj in range(nbk):
            members = [scores[i][j] for i in range(bi * b, min(lq, bi * b + b))
                       for j in range(bj * b, min(lk, bj * b + b)) if valid[i][j]]
            value = {"abs_sum": abs(sum(members)), "sum": sum(members), "max": max(members, default=0)}[score]
            importance[bi, bj], is_valid[bi, bj] = value, bool(members)
    forced = set()
    if causal:
        for i in range(lq):
            j = i + lk - lq
            if 0 <= j < lk:
                forced.add((i // b, j // b))
    if keep_first:
        forced |= {(bi, 0) for bi in range(nbq)}
    kept = {}
    for bi in range(nbq):
        row = [importance[bi, bj] for bj in range(nbk) if is_valid[bi, bj]]
        if row:
            mean = float(sum(row)) / len(row)
            hi, lo = float(max(row)), float(min(row))
            theta = mean + rho * (hi - mean) if rho >= 0 else mean + rho * (mean - lo)
            theta = {-1.0: lo, 1.0: hi}.get(rho, theta)  # the ends are the row's min and max exactly
            theta = min(max(theta, lo), hi)
        for bj in range(nbk):
            kept[bi, bj] = is_valid[bi, bj] and (importance[bi, bj] >= theta or (bi, bj) in forced)
        if row and not any(kept[bi, bj] for bj in range(nbk)):
            for bj in range(nbk):
                kept[bi, bj] = is_valid[bi, bj] and importance[bi, bj] == max(row)
    return importance, is_valid, kept


@st.composite
def block_cases(draw):
    lq = draw(st.integers(1, 11))
    lk = draw(st.integers(1, 11))
    b = draw(st.integers(1, lk))
    small = draw(st.booleans())  # small ranges make many tied importances
    values = st.integers(-2, 2) if small else st.integers(-60, 60)
    scores = [[draw(values) for _ in range(lk)] for _ in range(lq)]
    rho = draw(st.one_of(st.sampled_from([-1.0, -0.5, 0.0, 1 / 3, 0.5, 1.0]), st.floats(-1, 1)))
    causal = draw(st.booleans())
    pad = [draw(st.booleans()) or j == lk - 1 for j in range(lk)] if draw(st.booleans()) else [True] * lk
    return scores, b, rho, causal, pad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_cases())
def test_block_selection_equals_python_reference(case):
    scores, b, rho, causal, pad = case
    lq, lk = len(scores), len(scores[0])
    valid_ref = [[pad[j] and (not causal or j <= i + lk - lq) for j in range(lk)] for i in range(lq)]
    valid = valid_pairs(lq, lk, causal=causal, key_padding_mask=torch.tensor([pad]))[0, 0]
    assert valid.tolist() == valid_ref

    s = torch.tensor(scores, dtype=torch.float64)
    importance, valid_blocks = block_importance(s, b, valid)
    kept, valid_blocks2 = select_blocks(s, rho, b, valid, causal=causal)
    ref_imp, ref_valid, ref_kept = reference_blocks(scores, b, rho, valid_ref, causal)
    nbq, nbk = importance.shape
    assert {(i, j): float(importance[i, j]) for i in range(nbq) for j in range(nbk)} == ref_imp
    assert {(i, j): bool(valid_blocks[i, j]) for i in range(nbq) for j in range(nbk)} == ref_valid
    assert torch.equal(valid_blocks, valid_blocks2)
    assert {(i, j): bool(kept[i, j]) for i in range(nbq) for j in range(nbk)} == ref_kept
    # every block row with a valid block keeps one; causal: every query row keeps its own key
    assert bool((kept.any(-1) == valid_blocks.any(-1)).all())
    if causal:
        elements = valid & expand_block_mask(kept, b, lq, lk)
        for i in range(lq):
            j = i + lk - lq
            if 0 <= j < lk and pad[j]:
                assert bool(elements[i, j])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_cases(), st.sampled_from(["abs_sum", "sum", "max"]), st.booleans())
def test_block_scores_and_keep_first_equal_python_reference(case, score, keep_first):
    scores, b, rho, causal, pad = case
    lq, lk = len(scores), len(scores[0])
    valid_ref = [[pad[j] and (not causal or j <= i + lk - lq) for j in range(lk)] for i in range(lq)]
    valid = valid_pairs(lq, lk, causal=causal, key_padding_mask=torch.tensor([pad]))[0, 0]
    s = torch.tensor(scores, dtype=torch.float64)
    importance, valid_blocks = block_importance(s, b, valid, score)
    kept, _ = select_blocks(s, rho, b, valid, causal=causal, score=score, keep_first_block=keep_first)
    ref_imp, ref_valid, ref_kept = reference_blocks(scores, b, rho, valid_ref, causal, score, keep_first)
    nbq, nbk = importance.shape
    assert {(i, j): float(importance[i, j]) for i in range(nbq) for j in range(nbk)} == ref_imp
    assert {(i, j): bool(kept[i, j]) for i in range(nbq) for j in range(nbk)} == ref_kept


def test_signed_scores_rank_negative_blocks_low_while_abs_sum_keeps_them():
    # one row, two keys per block: a block of large negative logits (no probability) and a positive one
    s = torch.tensor([[-9.0, -9.0, 3.0, 2.0, 0.0, 1.0]])
    for score, expected in (("abs_sum", [True, False, False]), ("sum", [False, True, False]),
                            ("max", [False, True, False])):
        kept, _ = select_blocks(s, 1.0, 2, score=score)
        assert kept[0].tolist() == expected, score


def test_query_padding_rows_take_no_part():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    config = HDPConfig(block_ratio=0.3, block_score="max")
    out, stats = hdp_attention(q, k, v, config, key_padding_mask=pad, query_padding_mask=pad)
    ref, ref_stats = hdp_attention(q[1:, :, :4], k[1:, :, :4], v[1:, :, :4], config)
    # the short example alone, unpadded, gives the same kept blocks and counts as its padded rows
    # (its own abs-max fixed-point scale differs: compare decisions and counts, not outputs bit for bit)
    assert torch.equal(stats.pairs_valid[1], ref_stats.pairs_valid[0])
    assert torch.equal(stats.blocks_valid[1], ref_stats.blocks_valid[0])
    assert float(out[1, :, 4:].abs().max()) == 0.0
    with pytest.raises(DynapruneError, match="query_padding_mask"):
        hdp_attention(q, k, v, config, query_padding_mask=pad[:, :3])


def test_threshold_ties_are_kept_with_ge_and_dropped_with_gt():
    importance = torch.tensor([[0.0, 2.0, 4.0, 2.0]])
    valid = torch.ones_like(importance, dtype=torch.bool)
    theta = row_thresholds(importance, 0.0, valid)  # mean = 2: two blocks sit exactly on it
    assert theta.tolist() == [2.0]
    assert block_keep_mask(importance, theta, valid).tolist() == [[False, True, True, True]]
    assert block_keep_mask(importance, theta, valid, inclusive=False).tolist() == [[False, False, True, False]]
    # rho = 1: theta = max; both tied best blocks survive; rho = -1 keeps all
    tied = torch.tensor([[4.0, 1.0, 4.0]])
    ones = torch.ones_like(tied, dtype=torch.bool)
    assert block_keep_mask(tied, row_thresholds(tied, 1.0, ones), ones).tolist() == [[True, False, True]]
    assert block_keep_mask(tied, row_thresholds(tied, 1.0, ones), ones, inclusive=False).tolist() == [
        [True, False, True]
    ]  # nothing passes '>' max: the row falls back to its best blocks
    assert bool(block_keep_mask(tied, row_thresholds(tied, -1.0, ones), ones).all())


def test_negative_ratio_uses_min_side_and_one_block_rows():
    importance = torch.tensor([[1.0, 3.0, 8.0]])  # mean 4, min 1, max 8
    valid = torch.ones_like(importance, dtype=torch.bool)
    assert row_thresholds(importance, -0.5, valid).tolist() == [4 - 0.5 * 3]
    assert row_thresholds(importance, 0.5, valid).tolist() == [4 + 0.5 * 4]
    one = torch.tensor([[5.0]])
    assert bool(block_keep_mask(one, row_thresholds(one, 1.0, one > 0), one > 0).all())
    empty_row = torch.tensor([[1.0, 2.0]])
    assert row_thresholds(empty_row, 0.0, torch.zeros(1, 2, dtype=torch.bool)).tolist() == [math.inf]


def test_expand_block_mask_crops_partial_edge_blocks():
    mask = torch.tensor([[True, False], [False, True]])
    out = expand_block_mask(mask, 3, 5, 4)
    assert out.shape == (5, 4)
    assert out[:3, :3].all() and not out[:3, 3].any() and out[3:, 3].all() and not out[3:, :3].any()


def test_diagonal_blocks_follow_bottom_right_alignment():
    # decode step: one query aligned with the last of 5 keys
    assert diagonal_blocks(1, 5, 2).tolist() == [[False, False, True]]
    assert diagonal_blocks(4, 4, 2).tolist() == [[True, False], [False, True]]


# --------------------------------------------------------------------------------- fixed point


def test_fixed_point_split_truncates_toward_zero():
    x = torch.tensor([2.75, -2.75, 0.5, -0.5, 0.0])
    fp = to_fixed_point(x, 4, 4, scale=1.0)
    assert fp.int_part.tolist() == [2, -2, 0, 0, 0]
    assert fp.frac_part.tolist() == [0.75, -0.75, 0.5, -0.5, 0.0]
    assert torch.equal(fp.dequantize(), x.double())
    assert fp.saturated == 0


@pytest.mark.parametrize(("int_bits", "frac_bits"), [(1, 4), (4, 4), (8, 8), (3, 13), (15, 1)])
def test_fixed_point_range_rounding_bound_and_signs(int_bits, frac_bits):
    torch.manual_seed(int_bits * 100 + frac_bits)
    x = torch.randn(64, 32) * 3
    fp = to_fixed_point(x, int_bits, frac_bits)
    step = 2.0**-frac_bits
    assert fp.saturated == 0
    assert float(fp.int_part.abs().max()) <= 2 ** (int_bits - 1) - 1
    assert float(fp.frac_part.abs().max()) <= 1 - step
    assert torch.equal(fp.frac_part / step, torch.round(fp.frac_part / step))  # multiples of 2**-F
    assert bool((fp.int_part * fp.frac_part >= 0).all())  # same sign
    err = (x.double() - fp.dequantize()).abs().max()
    assert float(err) <= fp.scale * step / 2 * (1 + 1e-9)


def test_given_scale_saturates_and_counts():
    fp = to_fixed_point(torch.tensor([100.0, -100.0, 1.0]), 4, 4, scale=1.0)
    assert fp.saturated == 2
    assert fp.dequantize().tolist() == [7.9375, -7.9375, 1.0]
    assert calibrate_scale([torch.tensor([1.0, -3.0]), torch.tensor([2.0])], 4, 4) == 3.0 / 7.9375


@pytest.mark.parametrize("approx", [False, True])
def test_scores_within_stated_bound_of_exact_fp32(approx):
    torch.manual_seed(1)
    q, k = torch.randn(3, 20, 16), torch.randn(3, 24, 16) * 2
    q_fp, k_fp = to_fixed_point(q, 4, 12), to_fixed_point(k, 4, 12)
    bound = score_error_bound(q_fp, k_fp, q, approx=approx, softmax_scale=0.25)
    fixed = approximate_scores(q_fp, k_fp, approx) * (q_fp.scale * k_fp.scale * 0.25)
    exact64 = (q.double() @ k.double().mT) * 0.25
    assert bool(((fixed - exact64).abs() <= bound * (1 + 1e-9)).all())
    exact32 = (q @ k.mT) * 0.25  # fp32 matmul adds its own rounding: ~1e-6 relative to |q||k|
    fp32_slack = 1e-5 * (q.abs() @ k.abs().mT).double() * 0.25
    assert bool(((fixed - exact32.double()).abs() <= bound + fp32_slack).all())
    if not approx:
        assert float(bound.max()) < 5e-3  # F = 12: the bound is small, so the check is meaningful


def test_approximation_drops_exactly_the_frac_frac_term():
    torch.manual_seed(2)
    q_fp, k_fp = to_fixed_point(torch.randn(10, 8), 3, 6), to_fixed_point(torch.randn(12, 8), 3, 6)
    dense = dense_fixed_point_scores(q_fp, k_fp)
    assert torch.equal(approximate_scores(q_fp, k_fp, approx=False), dense)
    assert torch.equal(approximate_scores(q_fp, k_fp, approx=True), dense - q_fp.frac_part @ k_fp.frac_part.mT)
    assert torch.equal(integer_scores(q_fp, k_fp), torch.round(integer_scores(q_fp, k_fp)))


def test_errors_shrink_with_fraction_bits_exact_and_with_integer_bits_approximate():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16)

    def err(i, f, approx):
        _, stats = hdp_attention(q, k, v, HDPConfig(int_bits=i, frac_bits=f, approx=approx))
        return float(stats.score_err_max.max()), float(stats.prob_err_max.max())

    exact = [err(4, f, False) for f in (2, 4, 8, 12)]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(exact, exact[1:], strict=False))
    approx = [err(i, 8, True) for i in (2, 4, 6, 8)]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(approx, approx[1:], strict=False))
    # the dropped frac x frac term does not shrink with F: it is < 1 unit per product whatever F is
    assert err(4, 12, True)[0] > 0.5 * err(4, 6, True)[0]


# ----------------------------------------------------------------------------- attention path


def dense_fixed_point_attention(q, k, v, int_bits, frac_bits, scale, causal, pad):
    """Independent oracle: quantize by hand, dense product, masked softmax, V."""

    def quantize(x):
        limit = 2 ** (int_bits + frac_bits - 1) - 1
        s = float(x.double().abs().max()) / (limit / 2**frac_bits)
        return torch.round(x.double() / s * 2**frac_bits).clamp(-limit, limit) / 2**frac_bits, s

    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    (qu, sq), (ku, sk) = quantize(q), quantize(k)
    scores = (qu @ ku.mT) * (sq * sk * scale)
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        mask = mask.tril(lk - lq)
    mask = mask & pad[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    return (probs @ v.double()).to(v.dtype)


@pytest.mark.parametrize(
    ("causal", "hkv", "lq", "lk", "bits"),
    [(False, 4, 9, 9, (4, 4)), (True, 2, 9, 9, (8, 8)), (True, 1, 3, 10, (2, 14)), (False, 4, 7, 12, (1, 5))],
)
def test_approx_off_nothing_pruned_equals_dense_fixed_point_exactly(causal, hkv, lq, lk, bits):
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, hkv, lk, 8), torch.randn(2, hkv, lk, 8)
    pad = torch.ones(2, lk, dtype=torch.bool)
    if not causal:
        pad[1, -2:] = False
    config = HDPConfig(int_bits=bits[0], frac_bits=bits[1], approx=False, block_ratio=-1.0, head_threshold=0.0)
    out, stats = hdp_attention(q, k, v, config, scale=0.3, causal=causal, key_padding_mask=pad)
    assert torch.equal(out, dense_fixed_point_attention(q, k, v, *bits, 0.3, causal, pad))
    assert bool((stats.pairs_kept == stats.pairs_valid).all()) and bool(stats.head_kept.all())
    assert float(stats.skipped_by_near_zero.sum()) == 0 and float(stats.frac_frac_dropped.sum()) == 0


def brute_force_counts(q_fp, k_fp, valid, kept):
    """Near-zero products (both integer parts zero) over kept pairs, and theta_head, with loops."""
    b, h, lq, d = q_fp.int_part.shape
    lk = k_fp.int_part.shape[2]
    near, theta = torch.zeros(b, h), torch.zeros(b, h, dtype=torch.float64)
    qi, ki = q_fp.int_part.tolist(), k_fp.int_part.tolist()
    for bb in range(b):
        for hh in range(h):
            for i in range(lq):
                for j in range(lk):
                    if not valid[0, 0, i, j]:
                        continue
                    theta[bb, hh] += abs(sum(qi[bb][hh][i][t] * ki[bb][hh][j][t] for t in range(d)))
                    if kept[bb, hh, i, j]:
                        near[bb, hh] += sum(qi[bb][hh][i][t] == 0 and ki[bb][hh][j][t] == 0 for t in range(d))
    return near, theta


@pytest.mark.parametrize("causal", [False, True])
def test_counts_against_brute_force_and_work_identity(causal):
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 3, 10, 6), torch.randn(2, 3, 10, 6), torch.randn(2, 3, 10, 6)
    config = HDPConfig(int_bits=2, frac_bits=6, block_size=3, block_ratio=0.2)
    _, probe = hdp_attention(q, k, v, config, causal=causal)
    tau = float(probe.head_importance.flatten().sort().values[2])  # prunes the two weakest heads
    config = HDPConfig(int_bits=2, frac_bits=6, block_size=3, block_ratio=0.2, head_threshold=tau)
    out, stats = hdp_attention(q, k, v, config, causal=causal)

    q_fp, k_fp = to_fixed_point(q, 2, 6), to_fixed_point(k, 2, 6)
    valid = valid_pairs(10, 10, causal=causal)
    blocks, _ = select_blocks(integer_scores(q_fp, k_fp) * valid, 0.2, 3, valid, causal=causal)
    kept = valid & expand_block_mask(blocks, 3, 10, 10) & stats.head_kept[..., None, None]
    near, theta = brute_force_counts(q_fp, k_fp, valid, kept)

    assert torch.equal(stats.head_importance, theta)
    assert torch.equal(stats.head_kept, theta >= tau) and int((~stats.head_kept).sum()) == 2
    assert torch.equal(stats.skipped_by_near_zero, (2 * near).long())
    assert float(near.sum()) > 0  # I = 2 makes many integer parts zero
    assert torch.equal(stats.pairs_kept, kept.sum((-2, -1)))
    d = 6
    n_valid = 10 * 11 // 2 if causal else 100
    assert bool((stats.pairs_valid == n_valid).all())  # pairs above the diagonal are no work at all
    assert torch.equal(stats.skipped_by_head, FRACTIONAL_PRODUCTS_PER_MAC * n_valid * d * (~stats.head_kept))
    total = (
        stats.qk_frac_mults
        + stats.skipped_by_head
        + stats.skipped_by_block
        + stats.skipped_by_near_zero
        + stats.frac_frac_dropped
    )
    assert torch.equal(total, FRACTIONAL_PRODUCTS_PER_MAC * stats.pairs_valid * d)
    assert torch.equal(stats.frac_frac_dropped, stats.pairs_kept * d)
    assert bool((out[~stats.head_kept] == 0).all())
    assert bool((out[stats.head_kept].abs().sum(-1) > 0).all())  # every kept query row kept a key
    assert stats.head_sparsity == pytest.approx(2 / 6)
    summary = stats.summary()
    assert summary["qk_dense_mults"] == 6 * n_valid * d
    assert 0 < summary["block_sparsity"] < 1


def test_block_pruned_output_matches_masked_reference():
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    config = HDPConfig(int_bits=4, frac_bits=8, block_ratio=0.5)
    out, stats = hdp_attention(q, k, v, config, scale=0.5)
    q_fp, k_fp = to_fixed_point(q, 4, 8), to_fixed_point(k, 4, 8)
    blocks, _ = select_blocks(integer_scores(q_fp, k_fp), 0.5, 2)
    keep = expand_block_mask(blocks, 2, 8, 8)
    scores = approximate_scores(q_fp, k_fp) * (q_fp.scale * k_fp.scale * 0.5)
    reference = torch.softmax(scores.masked_fill(~keep, -math.inf), -1) @ v.double()
    assert torch.equal(out, reference.float())
    assert torch.equal(stats.blocks_kept, blocks.sum((-2, -1)))
    assert bool((stats.blocks_valid == 16).all())


def test_per_call_block_sparsity_target():
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 4, 64, 16), torch.randn(1, 4, 64, 16)
    _, stats = hdp_attention(q, k, v, HDPConfig(block_sparsity=0.6))
    assert stats.summary()["block_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert -1 <= stats.block_ratio <= 1
    _, quiet = hdp_attention(q, k, v, HDPConfig(block_sparsity=0.6), measure_error=False)
    assert quiet.score_err_max is None and "score_err_max" not in quiet.summary()
    assert torch.equal(quiet.blocks_kept, stats.blocks_kept)


def test_decode_step_with_fewer_queries_than_block():
    torch.manual_seed(8)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, stats = hdp_attention(q, k, v, HDPConfig(block_size=4, block_ratio=1.0), causal=True)
    assert torch.isfinite(out).all() and bool((stats.pairs_valid == 7).all())
    assert bool((stats.blocks_valid == 2).all()) and bool((stats.blocks_kept >= 1).all())


# --------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7])
def test_block_ratio_calibration_hits_target(target, causal):
    gen = torch.Generator().manual_seed(9)
    samples = [torch.randint(-40, 41, (4, 48, 48), generator=gen).double() for _ in range(3)]
    result = calibrate_block_ratio(samples, target, block_size=2, causal=causal)
    assert abs(result.achieved - target) <= 0.01
    kept = valid = 0
    for s in samples:  # applying rho_B again reproduces the reported sparsity
        mask = valid_pairs(48, 48, causal=causal)[0, 0]
        k_blocks, v_blocks = select_blocks(s * mask, result.value, 2, mask, causal=causal)
        kept, valid = kept + int(k_blocks.sum()), valid + int(v_blocks.expand_as(k_blocks).sum())
    assert 1 - kept / valid == pytest.approx(result.achieved)


def test_block_ratio_calibration_out_of_reach():
    samples = [torch.ones(8, 8)]  # all blocks tie: sparsity is 0 whatever rho_B is
    with pytest.raises(DynapruneError, match="out of reach"):
        calibrate_block_ratio(samples, 0.5)


def test_head_threshold_calibration():
    theta = torch.arange(100, dtype=torch.float64).roll(37) * 3.5
    result = calibrate_head_threshold(theta, 0.25)
    assert result.achieved == 0.25 and result.value == 25 * 3.5
    assert float((theta < result.value).double().mean()) == 0.25
    assert calibrate_head_threshold([theta[:50], theta[50:]], 0.0).value == 0.0
    with pytest.raises(DynapruneError, match="out of reach"):
        calibrate_head_threshold(torch.tensor([1.0, 1.0, 1.0, 5.0]), 0.5)  # ties: 0 or 0.75 only


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"block_size": -2},
        {"int_bits": 0},
        {"frac_bits": 17},
        {"int_bits": 9, "frac_bits": 8},
        {"head_threshold": -1.0},
        {"head_threshold": math.inf},
        {"block_sparsity": 1.0},
        {"block_sparsity": -0.1},
        {"block_ratio": 1.5},
        {"block_ratio": math.nan},
        {"block_ratio": 0.1, "block_sparsity": 0.5},
        {"q_scale": 0.0},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(DynapruneError):
        HDPConfig(**kwargs)


def test_bad_inputs():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(DynapruneError, match="larger than the sequence"):
        hdp_attention(q, q, q, HDPConfig(block_size=5, block_ratio=0.0))
    with pytest.raises(DynapruneError, match="larger than the sequence"):
        block_importance(torch.zeros(4, 4), 5)
    with pytest.raises(DynapruneError, match="in 1..16"):
        to_fixed_point(q, 0, 4)
    with pytest.raises(DynapruneError, match=r"\[0, 1\)"):
        calibrate_block_ratio([torch.zeros(4, 4)], 1.0)
    with pytest.raises(DynapruneError, match=r"\[0, 1\)"):
        calibrate_head_threshold(torch.ones(4), -0.2)
    with pytest.raises(DynapruneError, match="multiple"):
        hdp_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), HDPConfig())
    assert parse_fixed_bits("4.12") == (4, 12)
    for text in ("8", "a.b", "9.8", "0.4", "4.-1"):
        with pytest.raises(DynapruneError):
            parse_fixed_bits(text)
    # block size larger than the sequence is harmless when block pruning is off
    out, _ = hdp_attention(q, q, q, HDPConfig(block_size=64))
    assert out.shape == q.shape


def test_default_block_score_is_max_everywhere():
    """Issue 15: max, chosen on STS-B train (benchmarks/results/hdp-block-score-select.json). The recipe
    keeps its own copy of the default (it stays torch-free), so the two must be checked against each other."""
    from dynaprune.calibrate.hdp import CalibrationSpec
    from dynaprune.prune.hdp import DEFAULT_BLOCK_SCORE
    from dynaprune.prune.recipe import Recipe

    assert DEFAULT_BLOCK_SCORE == "max"
    assert HDPConfig().block_score == Recipe().block_score == CalibrationSpec(0.5).block_score == "max"
    assert Recipe.parse("block=0.2,block_score=max") == Recipe.parse("block=0.2")
    assert "block_score=abs_sum" in str(Recipe.parse("block=0.2,block_score=abs_sum"))

"""The HDP attention: fixed point, early head pruning, row-balanced block pruning and the approximation in
one faithful accuracy pass (masks, not speed), with its work counts and errors.

HDP (arXiv 2407.12893) Sec. III; summary (``shared/seeds/hdp-summary.md``) "Method Summary": block pruning,
early head pruning and the approximation, decided on integer scores at run time without retraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.hdp.approximation import approximate_scores, near_zero_products
from dynaprune.prune.hdp.blocks import (
    _block_importance,
    _check_block_size,
    _forced,
    block_keep_mask,
    expand_block_mask,
    row_thresholds,
    valid_pairs,
)
from dynaprune.prune.hdp.calibration import _bisect_ratio, _block_sparsity_curve, _BlockRows
from dynaprune.prune.hdp.config import FRACTIONAL_PRODUCTS_PER_MAC, HDPConfig
from dynaprune.prune.hdp.fixed_point import _F64, integer_scores, to_fixed_point
from dynaprune.prune.hdp.heads import early_head_keep, head_importance


@dataclass(frozen=True)
class HDPStats:
    """What one HDP attention call did, per batch element and head: tensors of shape (B, H).

    Multiplications are scalar multiplies of the QK^T stage unless named pv_. ``qk_int_mults`` is the
    integer pass every head pays; the fractional stage would need 3 partial products per (pair, dim)
    exactly (FRACTIONAL_PRODUCTS_PER_MAC), and
        3 * pairs_valid * D == qk_frac_mults + skipped_by_head + skipped_by_block
                               + skipped_by_near_zero + frac_frac_dropped.
    Errors compare with exact scores (float64 product of the inputs, times the softmax scale) over
    valid pairs, before any pruning: they measure the fixed point + approximation alone.
    """

    head_dim: int
    block_ratio: float | None  # rho_B used (given, or picked for this call); None = no block pruning
    head_importance: torch.Tensor  # theta_head
    head_kept: torch.Tensor  # bool
    blocks_valid: torch.Tensor
    blocks_kept: torch.Tensor  # by the block rule alone (also counted in pruned heads)
    pairs_valid: torch.Tensor  # query-key pairs inside the causal / padding masks
    pairs_kept: torch.Tensor  # after head and block pruning
    qk_int_mults: torch.Tensor
    qk_frac_mults: torch.Tensor
    skipped_by_head: torch.Tensor
    skipped_by_block: torch.Tensor
    skipped_by_near_zero: torch.Tensor
    frac_frac_dropped: torch.Tensor
    pv_mults: torch.Tensor
    score_err_max: torch.Tensor | None  # None when hdp_attention(measure_error=False)
    score_err_mean: torch.Tensor | None
    prob_err_max: torch.Tensor | None
    prob_err_mean: torch.Tensor | None

    @property
    def qk_dense_mults(self) -> torch.Tensor:
        return self.pairs_valid * self.head_dim

    @property
    def block_sparsity(self) -> torch.Tensor:
        """1 - kept / valid blocks per (B, H), by the block rule."""
        return 1.0 - self.blocks_kept / self.blocks_valid.clamp_min(1)

    @property
    def head_sparsity(self) -> float:
        return 1.0 - float(self.head_kept.float().mean())

    def summary(self) -> dict[str, float]:
        """Scalars for JSON: sparsities, multiplication totals and worst / mean errors."""
        total = {
            name: float(getattr(self, name).sum())
            for name in (
                "qk_dense_mults",
                "qk_int_mults",
                "qk_frac_mults",
                "skipped_by_head",
                "skipped_by_block",
                "skipped_by_near_zero",
                "frac_frac_dropped",
                "pv_mults",
            )
        }
        pairs = float(self.pairs_valid.sum())
        errors = {}
        if self.score_err_max is not None:
            errors = {
                "score_err_max": float(self.score_err_max.max()),
                "score_err_mean": float((self.score_err_mean * self.pairs_valid).sum()) / max(1.0, pairs),
                "prob_err_max": float(self.prob_err_max.max()),
                "prob_err_mean": float((self.prob_err_mean * self.pairs_valid).sum()) / max(1.0, pairs),
            }
        return {
            "block_ratio": math.nan if self.block_ratio is None else self.block_ratio,
            "block_sparsity": 1.0 - float(self.blocks_kept.sum()) / max(1.0, float(self.blocks_valid.sum())),
            "head_sparsity": self.head_sparsity,
            "pair_sparsity": 1.0 - float(self.pairs_kept.sum()) / max(1.0, pairs),
            **total,
            "pv_dense_mults": total["qk_dense_mults"],
            **errors,
        }


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over kept entries; a row with nothing kept gives zeros (not NaN)."""
    probs = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)
    return torch.where(keep.any(-1, keepdim=True), probs, 0.0)


def hdp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HDPConfig,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    measure_error: bool = True,
) -> tuple[torch.Tensor, HDPStats]:
    """Faithful HDP attention (accuracy path, masks not speed): returns (out (B, H, Lq, D), stats).

    q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H a multiple of Hkv (K/V groups repeated, as in
    ``runtime.attention``); ``scale`` is the softmax scale (default D**-0.5); key_padding_mask (B, Lk)
    True for real keys; query_padding_mask (B, Lq) True for real queries (padding rows take no part
    in any decision or count and output zeros). Pruned blocks are -inf before the softmax; pruned heads
    output zeros; a query row with no kept key outputs zeros. Computed in float64, returned in v's
    dtype. ``measure_error`` adds the exact float64 scores and two more softmaxes (about double the
    cost) for the error stats. Scores are ``units * (q.scale * k.scale * scale)`` with one combined factor.
    """
    _check_shapes(q, k, v, key_padding_mask)
    b, h, lq, d = q.shape
    if query_padding_mask is not None and tuple(query_padding_mask.shape) != (b, lq):
        raise DynapruneError(
            f"query_padding_mask must be (batch, queries) = {(b, lq)}, got {tuple(query_padding_mask.shape)}"
        )
    lk = k.shape[2]
    if config.block_pruning:
        _check_block_size(config.block_size, lk)
    if h != k.shape[1]:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    softmax_scale = d**-0.5 if scale is None else float(scale)

    q_fp = to_fixed_point(q, config.int_bits, config.frac_bits, config.q_scale)
    k_fp = to_fixed_point(k, config.int_bits, config.frac_bits, config.k_scale)
    valid = valid_pairs(lq, lk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if query_padding_mask is not None:
        valid = valid & query_padding_mask.to(device=valid.device, dtype=torch.bool)[:, None, :, None]
    int_scores = integer_scores(q_fp, k_fp) * valid  # masked pairs take no part in any decision

    # early head pruning: decided on S_I alone, before any fractional product
    theta = head_importance(int_scores)
    head_kept = early_head_keep(theta, config.head_threshold)

    # row-balanced block pruning
    importance, valid_blocks = _block_importance(int_scores, config.block_size, valid, config.block_score)
    rho = config.block_ratio
    if config.block_pruning:
        rows = _BlockRows(
            importance, valid_blocks, _forced(int_scores, config.block_size, causal, config.keep_first_block)
        )
        if rho is None:  # per-call target: one rho_B for all heads of this call
            rho = _bisect_ratio(_block_sparsity_curve([rows]), config.block_sparsity).value
        block_kept = block_keep_mask(
            importance, row_thresholds(importance, rho, valid_blocks), valid_blocks, always_keep=rows.forced
        )
        kept_pairs = valid & expand_block_mask(block_kept, config.block_size, lq, lk)
    else:
        block_kept = valid_blocks
        kept_pairs = valid.expand(b, h, lq, lk)
    kept_pairs = kept_pairs & head_kept[..., None, None]

    # approximation and the output
    factor = q_fp.scale * k_fp.scale * softmax_scale
    scores = approximate_scores(q_fp, k_fp, config.approx) * factor
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):  # pruning-aware fine-tuning
        # straight-through: the fixed-point scores' value, the exact scores' gradient (x - x == 0 exactly)
        exact = (q.to(_F64) @ k.to(_F64).mT) * softmax_scale
        scores = scores + (exact - exact.detach())
    probs = masked_softmax(scores, kept_pairs)
    out = (probs @ v.to(_F64)).to(v.dtype)

    # counts
    pairs_valid = valid.expand(b, h, lq, lk).sum((-2, -1))
    pairs_kept = kept_pairs.sum((-2, -1))
    pairs_in_kept_heads = pairs_valid * head_kept
    near_zero_on = config.approx and config.near_zero
    near_zero = (near_zero_products(q_fp, k_fp) * kept_pairs).sum((-2, -1)) if near_zero_on else 0 * pairs_kept
    per_mac = FRACTIONAL_PRODUCTS_PER_MAC
    frac_frac_dropped = pairs_kept * d if config.approx else 0 * pairs_kept
    skipped_by_near_zero = (2 * near_zero).to(torch.int64)

    # errors of fixed point + approximation against the exact product, over valid pairs
    errors: dict[str, torch.Tensor | None] = dict.fromkeys(
        ("score_err_max", "score_err_mean", "prob_err_max", "prob_err_mean")
    )
    if measure_error:
        exact = (q.detach().to(_F64) @ k.detach().to(_F64).mT) * softmax_scale
        n_valid = pairs_valid.clamp_min(1)
        score_err = (scores - exact).abs() * valid
        all_valid = valid.expand_as(scores)
        prob_err = (masked_softmax(scores, all_valid) - masked_softmax(exact, all_valid)).abs()
        errors = {
            "score_err_max": score_err.amax((-2, -1)),
            "score_err_mean": score_err.sum((-2, -1)) / n_valid,
            "prob_err_max": prob_err.amax((-2, -1)),
            "prob_err_mean": prob_err.sum((-2, -1)) / n_valid,
        }

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t.expand(b, h, *t.shape[-2:]).sum((-2, -1))

    stats = HDPStats(
        head_dim=d,
        block_ratio=rho if config.block_pruning else None,
        head_importance=theta,
        head_kept=head_kept,
        blocks_valid=blocks(valid_blocks),
        blocks_kept=blocks(block_kept),
        pairs_valid=pairs_valid,
        pairs_kept=pairs_kept,
        qk_int_mults=pairs_valid * d,
        qk_frac_mults=(per_mac - 1 if config.approx else per_mac) * pairs_kept * d - skipped_by_near_zero,
        skipped_by_head=per_mac * (pairs_valid - pairs_in_kept_heads) * d,
        skipped_by_block=per_mac * (pairs_in_kept_heads - pairs_kept) * d,
        skipped_by_near_zero=skipped_by_near_zero,
        frac_frac_dropped=frac_frac_dropped,
        pv_mults=pairs_kept * d,
        **errors,
    )
    return out, stats


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DynapruneError("q, k and v must be (batch, heads, length, head_dim) tensors")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise DynapruneError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise DynapruneError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise DynapruneError("empty sequence: q and k need at least one position")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise DynapruneError(
            f"key_padding_mask must be (batch, keys) = {(k.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}"
        )

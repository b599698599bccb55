"""HDP threshold calibration on score samples: rho_B for a target block sparsity (bisection over the block
rule) and tau_H for a target head sparsity (exact, over the distinct theta_head).

HDP (arXiv 2407.12893) Sec. III ("the thresholds are calibrated"); summary (``shared/seeds/hdp-summary.md``)
Mechanism 2's break condition: a poorly calibrated tau_H prunes important heads. Calibration on a model's
data (which runs the model) lives above the runtime, in ``dynaprune.calibrate.hdp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.hdp.blocks import _forced, block_importance, block_keep_mask, row_thresholds, valid_pairs
from dynaprune.prune.hdp.config import DEFAULT_BLOCK_SCORE, _check_target

_F64 = torch.float64


@dataclass(frozen=True)
class Calibration:
    """A calibrated knob (rho_B or tau_H) and the sparsity it gives on the calibration samples."""

    value: float
    achieved: float
    target: float


@dataclass(frozen=True)
class _BlockRows:
    """One sample's block rows, precomputed so each bisection step is a comparison."""

    importance: torch.Tensor
    valid: torch.Tensor
    forced: torch.Tensor | None

    def kept(self, rho: float) -> int:
        keep = block_keep_mask(
            self.importance, row_thresholds(self.importance, rho, self.valid), self.valid, always_keep=self.forced
        )
        return int(keep.sum())


def _block_sparsity_curve(rows: Sequence[_BlockRows]):
    total = sum(int(r.valid.expand(r.importance.shape).sum()) for r in rows)
    if total == 0:
        raise DynapruneError("the calibration samples hold no valid block")
    return lambda rho: 1.0 - sum(r.kept(rho) for r in rows) / total


def _bisect_ratio(sparsity_at, target: float, steps: int = 60) -> Calibration:
    """Smallest-gap rho in [-1, 1] for a non-decreasing sparsity(rho); ties go to less pruning."""
    lo, hi = -1.0, 1.0
    s_lo, s_hi = sparsity_at(lo), sparsity_at(hi)
    if target <= s_lo:
        return Calibration(lo, s_lo, target)
    if target > s_hi:
        return Calibration(hi, s_hi, target)
    for _ in range(steps):  # invariant: s(lo) < target <= s(hi)
        mid = (lo + hi) / 2
        s_mid = sparsity_at(mid)
        if s_mid < target:
            lo, s_lo = mid, s_mid
        else:
            hi, s_hi = mid, s_mid
    return Calibration(lo, s_lo, target) if target - s_lo <= s_hi - target else Calibration(hi, s_hi, target)


def calibrate_block_ratio(
    score_samples: Sequence[torch.Tensor],
    target_sparsity: float,
    *,
    block_size: int = 2,
    causal: bool = False,
    valid_masks: Sequence[torch.Tensor | None] | None = None,
    tolerance: float = 0.01,
    score: str = DEFAULT_BLOCK_SCORE,
    keep_first_block: bool = False,
) -> Calibration:
    """rho_B whose block sparsity over all ``score_samples`` (integer scores (..., Lq, Lk)) is nearest the target.

    Bisection on rho_B in [-1, 1] (sparsity is non-decreasing in rho_B) to 2**-60, then the nearer
    of the two brackets. Block sparsity = 1 - kept / valid blocks, forced diagonal blocks included.
    Raises when the nearest reachable sparsity is more than ``tolerance`` away: ties (many blocks of one
    importance) or too few blocks make sparsity jump, and rho_B = 1 keeps every row's best block(s).
    """
    _check_target(target_sparsity, "target block sparsity")
    samples = list(score_samples)
    if not samples:
        raise DynapruneError("no integer-score samples to calibrate the block ratio on")
    masks = list(valid_masks) if valid_masks is not None else [None] * len(samples)
    if len(masks) != len(samples):
        raise DynapruneError(f"{len(masks)} valid masks for {len(samples)} score samples")
    rows = []
    for scores, valid in zip(samples, masks, strict=True):
        if causal:
            causal_valid = valid_pairs(*scores.shape[-2:], causal=True, device=scores.device)[0, 0]
            valid = causal_valid if valid is None else valid & causal_valid
        importance, valid_blocks = block_importance(scores, block_size, valid, score)
        rows.append(_BlockRows(importance, valid_blocks, _forced(scores, block_size, causal, keep_first_block)))
    result = _bisect_ratio(_block_sparsity_curve(rows), target_sparsity)
    if abs(result.achieved - target_sparsity) > tolerance:
        raise DynapruneError(
            f"block sparsity {target_sparsity:g} is out of reach on these samples: the nearest is "
            f"{result.achieved:.4f} (rho_B = {result.value:.4f}); rho_B = 1 keeps each row's best block(s) "
            "and tied importances move together"
        )
    return result


def calibrate_head_threshold(
    head_importances: torch.Tensor | Sequence[torch.Tensor], target_head_sparsity: float, *, tolerance: float = 0.01
) -> Calibration:
    """tau_H whose head sparsity (share of theta_head < tau_H) over the samples is nearest the target.

    Exact, not iterative: candidates are 0 and every distinct theta (tau = theta_k prunes exactly the
    heads below theta_k); the nearest wins, ties go to the smaller tau. Never prunes every head.
    Raises when the nearest is more than ``tolerance`` away (granularity 1/N, or tied thetas).
    """
    _check_target(target_head_sparsity, "target head sparsity")
    tensors = [head_importances] if isinstance(head_importances, torch.Tensor) else list(head_importances)
    theta = torch.cat([t.detach().reshape(-1).to(_F64) for t in tensors]) if tensors else torch.empty(0)
    if theta.numel() == 0:
        raise DynapruneError("no head importances to calibrate the head threshold on")
    if not bool(torch.isfinite(theta).all()) or bool((theta < 0).any()):
        raise DynapruneError("head importances must be finite and >= 0")
    distinct, counts = torch.unique(theta, return_counts=True)  # ascending
    below = torch.cumsum(counts, 0) - counts  # heads strictly below each distinct value
    taus = torch.cat([torch.zeros(1, dtype=_F64), distinct])
    sparsity = torch.cat([torch.zeros(1, dtype=_F64), below.to(_F64)]) / theta.numel()
    best = int(torch.argmin((sparsity - target_head_sparsity).abs()))  # first = smallest tau on ties
    result = Calibration(float(taus[best]), float(sparsity[best]), target_head_sparsity)
    if abs(result.achieved - target_head_sparsity) > tolerance:
        raise DynapruneError(
            f"head sparsity {target_head_sparsity:g} is out of reach on {theta.numel()} head samples: "
            f"the nearest is {result.achieved:.4f} (tau_H = {result.value:g})"
        )
    return result

"""HDP early head pruning: theta_head = sum |S_I| over the head, pruned iff theta_head < tau_H.

HDP (arXiv 2407.12893) Sec. III; summary (``shared/seeds/hdp-summary.md``) Mechanism 2: "After computing
IntegerQ x IntegerK, absolute sum of all values (theta_Head) is compared to threshold tau_H; if below
threshold, head is pruned and remaining computations skipped". theta_head is the plain sum, so it grows
with Lq * Lk: a tau_H is calibrated per length regime (``calibrate_head_threshold``).
"""

from __future__ import annotations

import torch

from dynaprune.prune.hdp.config import _check_head_threshold


def head_importance(int_scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """theta_head = sum |S_I| over every valid (query, key) pair of the head: (..., Lq, Lk) -> (...)."""
    magnitudes = int_scores.abs()
    if valid is not None:
        magnitudes = magnitudes * valid
    return magnitudes.sum((-2, -1))


def early_head_keep(theta: torch.Tensor, head_threshold: float | None) -> torch.Tensor:
    """Heads to keep: theta_head >= tau_H (a head is pruned iff theta_head < tau_H); None keeps all."""
    if head_threshold is None:
        return torch.ones_like(theta, dtype=torch.bool)
    _check_head_threshold(head_threshold)
    return theta >= head_threshold

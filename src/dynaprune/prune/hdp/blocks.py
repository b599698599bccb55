"""HDP row-balanced block pruning: valid pairs, block importance from S_I, per-row thresholds and the kept blocks.

HDP (arXiv 2407.12893) Sec. III; summary (``shared/seeds/hdp-summary.md``) Mechanism 1: "Each 2x2 block in
the attention score matrix is pruned if its absolute sum falls below a row-specific threshold calculated
using min, max, and mean importance values". Our readings (threshold formula, ties, forced blocks, edge
blocks, ``block_score``) are listed in the package docstring.
"""

from __future__ import annotations

import math

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.hdp.config import (
    ALWAYS_KEEP_DIAGONAL,
    DEFAULT_BLOCK_SCORE,
    KEEP_AT_THRESHOLD,
    _check_block_ratio,
    check_block_score,
)

_F64 = torch.float64


def valid_pairs(
    lq: int,
    lk: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (B or 1, 1, Lq, Lk): True where query i may attend key j.

    Causal follows ``runtime.attention``: the last query is aligned with the last key, so query i sees
    keys j <= i + (Lk - Lq) (this also serves decode steps over a KV cache).
    """
    valid = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        valid = valid & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask.to(device=valid.device, dtype=torch.bool)[:, None, None, :]
    return valid


def diagonal_blocks(lq: int, lk: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (nbq, nbk): the blocks that contain a diagonal element (query i, key i + Lk - Lq)."""
    nbq, nbk = -(-lq // block_size), -(-lk // block_size)
    rows = torch.arange(lq, device=device)
    cols = rows + (lk - lq)
    inside = (cols >= 0) & (cols < lk)
    mask = torch.zeros(nbq, nbk, dtype=torch.bool, device=device)
    mask[rows[inside] // block_size, cols[inside] // block_size] = True
    return mask


def expand_block_mask(block_mask: torch.Tensor, block_size: int, lq: int, lk: int) -> torch.Tensor:
    """(..., nbq, nbk) block mask -> (..., Lq, Lk) element mask (edge blocks cropped)."""
    return block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :lq, :lk]


def block_importance(
    int_scores: torch.Tensor, block_size: int, valid: torch.Tensor | None = None, score: str = DEFAULT_BLOCK_SCORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of each b x b block of S_I (HDP Sec. III, block pruning) and which blocks hold a valid element.

    ``score`` (BLOCK_SCORES): ``abs_sum`` = |sum of the block's S_I| (the paper), ``sum`` = signed sum,
    ``max`` = largest valid S_I of the block. int_scores (..., Lq, Lk); valid broadcastable to it.
    Returns (..., nbq, nbk) importance and a bool (..., nbq, nbk) validity. Edge blocks are padded
    logically: padding and masked elements add 0 to a sum and never win a max (a block with no valid
    element has importance 0).
    """
    _check_block_size(block_size, int_scores.shape[-1])
    check_block_score(score)
    return _block_importance(int_scores, block_size, valid, score)


def _block_importance(
    int_scores: torch.Tensor, block_size: int, valid: torch.Tensor | None, score: str = DEFAULT_BLOCK_SCORE
) -> tuple[torch.Tensor, torch.Tensor]:
    # unchecked: a block wider than the sequence is one logically padded block (block pruning off)
    lq, lk = int_scores.shape[-2:]
    if valid is None:
        valid = torch.ones(lq, lk, dtype=torch.bool, device=int_scores.device)
    valid = valid.expand(int_scores.shape)
    nbq, nbk = -(-lq // block_size), -(-lk // block_size)
    pad = (0, nbk * block_size - lk, 0, nbq * block_size - lq)

    def blocks(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        t = torch.nn.functional.pad(t, pad, value=fill)
        return t.unflatten(-1, (nbk, block_size)).unflatten(-3, (nbq, block_size))

    valid_blocks = blocks(valid.to(_F64)).sum((-3, -1)) > 0
    if score == "max":
        top = blocks(int_scores.to(_F64).masked_fill(~valid, -math.inf), -math.inf).amax((-3, -1))
        return torch.where(valid_blocks, top, 0.0), valid_blocks
    total = blocks(int_scores.to(_F64) * valid).sum((-3, -1))
    return (total.abs() if score == "abs_sum" else total), valid_blocks


def row_thresholds(importance: torch.Tensor, block_ratio: float, valid_blocks: torch.Tensor) -> torch.Tensor:
    """Per block row: theta from the valid blocks' min, mean, max (module docstring). (..., nbq, nbk) -> (..., nbq).

    Rows without a valid block get +inf (nothing to keep).
    """
    _check_block_ratio(block_ratio)
    valid_blocks = valid_blocks.expand(importance.shape)
    count = valid_blocks.sum(-1)
    mean = (importance * valid_blocks).sum(-1) / count.clamp_min(1)  # exact sum of integers, one rounding
    top = importance.masked_fill(~valid_blocks, -math.inf).amax(-1)
    bottom = importance.masked_fill(~valid_blocks, math.inf).amin(-1)
    if block_ratio >= 0:
        theta = mean + block_ratio * (top - mean)
    else:
        theta = mean + block_ratio * (mean - bottom)
    if block_ratio in (-1.0, 1.0):  # the ends exactly (mean +- (mean - min) can round above the min)
        theta = bottom if block_ratio < 0 else top
    theta = torch.minimum(torch.maximum(theta, bottom), top)  # rounding must not pass the row's max
    return theta.masked_fill(count == 0, math.inf)


def block_keep_mask(
    importance: torch.Tensor,
    thresholds: torch.Tensor,
    valid_blocks: torch.Tensor,
    *,
    always_keep: torch.Tensor | None = None,
    inclusive: bool = KEEP_AT_THRESHOLD,
) -> torch.Tensor:
    """Blocks kept: valid and (importance reaches the row threshold, or forced by ``always_keep``).

    A row with valid blocks but none kept (only possible with ``inclusive=False``) keeps its best
    block(s), ties included.
    """
    valid_blocks = valid_blocks.expand(importance.shape)
    passes = importance >= thresholds[..., None] if inclusive else importance > thresholds[..., None]
    if always_keep is not None:
        passes = passes | always_keep
    keep = passes & valid_blocks
    empty = valid_blocks.any(-1) & ~keep.any(-1)
    top = importance.masked_fill(~valid_blocks, -math.inf).amax(-1, keepdim=True)
    return keep | (empty[..., None] & valid_blocks & (importance == top))


def select_blocks(
    int_scores: torch.Tensor,
    block_ratio: float,
    block_size: int,
    valid: torch.Tensor | None = None,
    *,
    causal: bool = False,
    score: str = DEFAULT_BLOCK_SCORE,
    keep_first_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rule end to end: (kept blocks, valid blocks), both bool (..., nbq, nbk)."""
    importance, valid_blocks = block_importance(int_scores, block_size, valid, score)
    thresholds = row_thresholds(importance, block_ratio, valid_blocks)
    forced = forced_blocks(
        *int_scores.shape[-2:], block_size, causal=causal, keep_first_block=keep_first_block, device=int_scores.device
    )
    return block_keep_mask(importance, thresholds, valid_blocks, always_keep=forced), valid_blocks


def forced_blocks(
    lq: int,
    lk: int,
    block_size: int,
    *,
    causal: bool,
    keep_first_block: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Bool (nbq, nbk) blocks kept whatever their importance (None: none): the diagonal blocks of causal
    attention (``ALWAYS_KEEP_DIAGONAL``) and, with ``keep_first_block``, key block 0 in every row."""
    forced = None
    if causal and ALWAYS_KEEP_DIAGONAL:
        forced = diagonal_blocks(lq, lk, block_size, device=device)
    if keep_first_block:
        first = torch.zeros(-(-lq // block_size), -(-lk // block_size), dtype=torch.bool, device=device)
        first[:, 0] = True
        forced = first if forced is None else forced | first
    return forced


def _forced(int_scores: torch.Tensor, block_size: int, causal: bool, keep_first_block: bool = False):
    return forced_blocks(
        *int_scores.shape[-2:], block_size, causal=causal, keep_first_block=keep_first_block, device=int_scores.device
    )


def _check_block_size(block_size: int, lk: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DynapruneError(f"block_size must be a positive integer, got {block_size!r}")
    if block_size > lk:
        raise DynapruneError(f"block_size {block_size} is larger than the sequence ({lk} keys)")

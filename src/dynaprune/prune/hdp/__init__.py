"""Hybrid Dynamic Pruning (HDP, arXiv 2407.12893) as pure tensor functions: the faithful accuracy path.

Source: HDP, arXiv 2407.12893, Sec. III; its summary is ``shared/seeds/hdp-summary.md`` ("Method Summary",
Mechanisms 1-3). One module per idea:
  * ``config``: the knobs (``HDPConfig``) and their validation;
  * ``fixed_point``: Q and K split into integer and fraction parts, integer scores (all mechanisms);
  * ``blocks``: row-balanced block pruning (Mechanism 1);
  * ``heads``: early head pruning (Mechanism 2);
  * ``approximation``: the integer + fraction score approximation and near-zero products (Mechanism 3);
  * ``calibration``: rho_B and tau_H from score samples (model-level calibration: ``dynaprune.calibrate.hdp``);
  * ``attention``: all of it in one attention call with its counts (``hdp_attention``).

What is implemented (section names follow the paper's method description, Sec. III):
  * fixed point: Q and K are split into an integer part and a fraction part (``to_fixed_point``);
  * integer scores ``S_I = Q_I K_I^T`` are computed first and decide everything below;
  * early head pruning: ``theta_head = sum |S_I|`` over the whole head (all valid query-key pairs of
    one batch element and head); a head with ``theta_head < tau_H`` is pruned before any fractional
    work and outputs zero;
  * row-balanced block pruning: ``S_I`` is cut into ``b x b`` blocks, importance = |sum of the block's
    integer scores|, and every block row keeps the blocks whose importance reaches a threshold made
    from that row's min, mean and max with ratio ``rho_B``;
  * approximation: ``S = S_I + Q_I K_F^T + Q_F K_I^T`` (the fraction x fraction term dropped), with
    near-zero pruning of the products whose two integer parts are both zero.

Our reading of the details the paper leaves open (each one is a named constant or argument below):
  * threshold: ``theta = mean + rho_B (max - mean)`` for ``rho_B >= 0`` and
    ``theta = mean + rho_B (mean - min)`` for ``rho_B < 0``, so ``rho_B`` in [-1, 1] sweeps theta from
    the row's min (keep all) to its max (keep the best block(s)); theta is clamped to [min, max] so
    floating-point rounding can never push it past the row's best block;
  * ``KEEP_AT_THRESHOLD``: a block whose importance equals the threshold is kept (``>=``); ties are
    therefore all kept or all pruned, never broken by position;
  * every block row that has a valid block keeps at least one block (its best ones, ties included);
  * causal decoders: blocks entirely above the diagonal are not valid: they take no part in a row's
    statistics and count as neither work nor pruned work; ``ALWAYS_KEEP_DIAGONAL`` keeps every block
    that holds a diagonal element, so every query row keeps at least its own key;
  * L not a multiple of b: blocks are padded logically; only real elements are summed or counted
    (a partial edge block is not rescaled);
  * ``theta_head`` is the plain sum (so it grows with Lq * Lk: a tau_H is calibrated per length regime);
  * ``block_score`` (``BLOCK_SCORES``): how a block's integer scores make its importance. ``abs_sum``
    (the paper's "absolute sum", DESIGN.md) = |sum of S_I|; ``sum`` = the signed sum; ``max`` (the
    default, ``DEFAULT_BLOCK_SCORE``) = the largest S_I in the block. Scores are pre-softmax logits: a
    block of large *negative* scores gets almost no probability, yet ``abs_sum`` ranks it as important.
    The default was chosen on STS-B *train* (``benchmarks/hdp_block_score_select.py``: 300 pairs, rho_B
    calibrated on 64 other train pairs): mean Spearman over block sparsities 0.5-0.9 max 0.755,
    sum 0.707, abs_sum 0.253 (at 75%: 0.756, 0.709, 0.137). ``max`` is one comparator per element in
    hardware. (An earlier exploration on 300 STS-B *dev* pairs, per-call 75% sparsity, had found the same
    order: abs_sum 0.069, sum 0.794, max 0.912; dev is the reporting split, so it no longer decides.)
  * ``keep_first_block``: always keep key block 0 (the [CLS] / first-token column, an attention sink)
    in every row. Off by default: it costs budget; with ``sum`` it helps (0.794 -> 0.882 at 75%), with
    ``max`` it hurts (0.912 -> 0.894), because max already keeps the sink column when it matters;
  * padding: with ``query_padding_mask`` (encoder batches), padding query rows take no part in any
    decision or count and output zeros (the model ignores them); otherwise they would be counted as
    block rows and inflate the block sparsity of a right-padded batch.

Numbers: everything is computed in float64 on integer codes, so integer scores, the fractional terms
and the dense fixed-point product are exact (for head_dim < 2**23), which is what makes
"approx=off, nothing pruned == dense fixed point" hold bit for bit.
"""

from __future__ import annotations

from dynaprune.prune.hdp.approximation import (
    approximate_scores,
    dense_fixed_point_scores,
    near_zero_products,
    score_error_bound,
)
from dynaprune.prune.hdp.attention import HDPStats, hdp_attention, masked_softmax
from dynaprune.prune.hdp.blocks import (
    block_importance,
    block_keep_mask,
    diagonal_blocks,
    expand_block_mask,
    forced_blocks,
    row_thresholds,
    select_blocks,
    valid_pairs,
)
from dynaprune.prune.hdp.calibration import Calibration, calibrate_block_ratio, calibrate_head_threshold
from dynaprune.prune.hdp.config import (
    ALWAYS_KEEP_DIAGONAL,
    BLOCK_SCORES,
    DEFAULT_BLOCK_SCORE,
    FRACTIONAL_PRODUCTS_PER_MAC,
    KEEP_AT_THRESHOLD,
    MAX_WORD_BITS,
    HDPConfig,
    check_block_score,
    check_fixed_bits,
    parse_fixed_bits,
)
from dynaprune.prune.hdp.fixed_point import FixedPoint, calibrate_scale, integer_scores, max_fixed_value, to_fixed_point
from dynaprune.prune.hdp.heads import early_head_keep, head_importance

__all__ = [
    "ALWAYS_KEEP_DIAGONAL",
    "BLOCK_SCORES",
    "DEFAULT_BLOCK_SCORE",
    "FRACTIONAL_PRODUCTS_PER_MAC",
    "KEEP_AT_THRESHOLD",
    "MAX_WORD_BITS",
    "Calibration",
    "FixedPoint",
    "HDPConfig",
    "HDPStats",
    "approximate_scores",
    "block_importance",
    "block_keep_mask",
    "calibrate_block_ratio",
    "calibrate_head_threshold",
    "calibrate_scale",
    "check_block_score",
    "check_fixed_bits",
    "dense_fixed_point_scores",
    "diagonal_blocks",
    "early_head_keep",
    "expand_block_mask",
    "forced_blocks",
    "hdp_attention",
    "head_importance",
    "integer_scores",
    "masked_softmax",
    "max_fixed_value",
    "near_zero_products",
    "parse_fixed_bits",
    "row_thresholds",
    "score_error_bound",
    "select_blocks",
    "to_fixed_point",
    "valid_pairs",
]

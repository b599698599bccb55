"""Hybrid Dynamic Pruning (HDP, arXiv 2407.12893) as pure tensor functions: the faithful accuracy path.

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
    (default, the paper's "absolute sum", DESIGN.md) = |sum of S_I|; ``sum`` = the signed sum; ``max`` =
    the largest S_I in the block. Scores are pre-softmax logits: a block of large *negative* scores gets
    almost no probability, yet ``abs_sum`` ranks it as important. Measured on MiniLM / STS-B (300 dev
    pairs, dense Spearman 0.933, per-call 75% block sparsity, b = 2): abs_sum 0.069, sum 0.794,
    max 0.912; at 50%: 0.561, 0.922, 0.918. ``max`` is one comparator per element in hardware;
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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch

from dynaprune.errors import DynapruneError

KEEP_AT_THRESHOLD: Final = True
"""Block rule comparison: keep ``importance >= theta`` (True) or ``importance > theta`` (False)."""

ALWAYS_KEEP_DIAGONAL: Final = True
"""Causal attention keeps every block that contains a diagonal (query i, its own key) element."""

BLOCK_SCORES: Final = ("abs_sum", "sum", "max")
"""Block importance from its integer scores: |sum| (paper, default), signed sum, or max (module docstring)."""

FRACTIONAL_PRODUCTS_PER_MAC: Final = 3
"""Fractional partial products of one q_d * k_d in the exact split: Q_I K_F, Q_F K_I and Q_F K_F."""

MAX_WORD_BITS: Final = 16

_F64 = torch.float64


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HDPConfig:
    """Knobs of HDP; recipe keys in brackets.

    int_bits, frac_bits [fixed=I.F]: fixed-point word of I + F <= 16 bits, sign included in I.
    block_size [block_size=b]: b x b blocks (the paper uses 2; kernels want 32/64/128).
    block_ratio [block=RHO]: rho_B in [-1, 1]; None = no block pruning.
    block_sparsity [block_sparsity=S]: a target in [0, 1) instead of rho_B: each call picks its own
        rho_B (bisection on that call's integer scores, shared by all its heads). Give one or neither.
    head_threshold [hdp_head=TAU]: tau_H >= 0 in integer-score units; None = no head pruning.
    approx [approx=on|off]: drop the fraction x fraction term (off = exact fixed-point scores).
    near_zero: skip the products whose two integer parts are zero (only with approx: it changes nothing
        in the result then, it only saves work).
    block_score [block_score=abs_sum|sum|max]: block importance from its integer scores (BLOCK_SCORES).
    keep_first_block [block_keep_first=on|off]: every row always keeps key block 0 ([CLS] column).
    q_scale, k_scale: per-tensor fixed-point scales (real value = scale * (int + frac)); None = each
        call uses the tensor's own abs-max so the largest value fills the integer range.
    """

    int_bits: int = 8
    frac_bits: int = 8
    block_size: int = 2
    block_ratio: float | None = None
    block_sparsity: float | None = None
    head_threshold: float | None = None
    approx: bool = True
    near_zero: bool = True
    q_scale: float | None = None
    k_scale: float | None = None
    block_score: str = "abs_sum"
    keep_first_block: bool = False

    def __post_init__(self) -> None:
        check_fixed_bits(self.int_bits, self.frac_bits)
        check_block_score(self.block_score)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise DynapruneError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.block_ratio is not None:
            _check_block_ratio(self.block_ratio)
            if self.block_sparsity is not None:
                raise DynapruneError("give block=RHO or block_sparsity=S, not both")
        if self.block_sparsity is not None:
            _check_target(self.block_sparsity, "block_sparsity")
        if self.head_threshold is not None:
            _check_head_threshold(self.head_threshold)
        for name in ("q_scale", "k_scale"):
            _check_scale(getattr(self, name), name)

    @property
    def block_pruning(self) -> bool:
        return self.block_ratio is not None or self.block_sparsity is not None


def parse_fixed_bits(text: str) -> tuple[int, int]:
    """``"I.F"`` (recipe ``fixed=I.F``) -> (int_bits, frac_bits), validated."""
    parts = text.strip().split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DynapruneError(f"fixed must look like I.F (integer bits . fraction bits), e.g. 8.8, got {text!r}")
    int_bits, frac_bits = int(parts[0]), int(parts[1])
    check_fixed_bits(int_bits, frac_bits)
    return int_bits, frac_bits


def check_fixed_bits(int_bits: int, frac_bits: int) -> None:
    for name, bits in (("integer", int_bits), ("fraction", frac_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_WORD_BITS:
            raise DynapruneError(f"fixed-point {name} bits must be an integer in 1..16, got {bits!r}")
    if int_bits + frac_bits > MAX_WORD_BITS:
        raise DynapruneError(
            f"fixed-point word too wide: {int_bits} integer + {frac_bits} fraction bits > {MAX_WORD_BITS}"
        )


def check_block_score(score: str) -> None:
    if score not in BLOCK_SCORES:
        raise DynapruneError(f"block score must be one of {', '.join(BLOCK_SCORES)}, got {score!r}")


def _check_block_ratio(rho: float) -> None:
    if not isinstance(rho, (int, float)) or not -1.0 <= rho <= 1.0:  # also rejects NaN
        raise DynapruneError(f"block ratio rho_B must be in [-1, 1], got {rho!r}")


def _check_target(target: float, name: str) -> None:
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise DynapruneError(f"{name} must be in [0, 1), got {target!r}")


def _check_head_threshold(tau: float) -> None:
    if not isinstance(tau, (int, float)) or not 0.0 <= tau < math.inf:
        raise DynapruneError(f"head threshold tau_H must be a finite number >= 0, got {tau!r}")


def _check_scale(scale: float | None, name: str) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or not 0.0 < scale < math.inf):
        raise DynapruneError(f"{name} must be a finite number > 0, got {scale!r}")


# ------------------------------------------------------------------------------------ fixed point


@dataclass(frozen=True)
class FixedPoint:
    """A tensor as ``scale * (int_part + frac_part)``.

    The word is two's-complement-sized: I + F bits, the sign counted in I; codes are symmetric,
    |code| <= 2**(I+F-1) - 1, so |int_part| <= 2**(I-1) - 1 and |frac_part| <= 1 - 2**-F.
    Negative numbers split by truncation toward zero: -2.75 -> int -2, frac -0.75. Both parts carry
    the value's sign, and "near zero" (int_part == 0) means |value| < 1 unit, symmetric around 0.
    int_part and frac_part are float64 holding exact integers / multiples of 2**-F.
    """

    int_part: torch.Tensor
    frac_part: torch.Tensor
    scale: float
    int_bits: int
    frac_bits: int
    saturated: int  # how many values were clipped to the largest code (0 with the abs-max scale)

    @property
    def units(self) -> torch.Tensor:
        """The fixed-point value in units of ``scale`` (int_part + frac_part, exact)."""
        return self.int_part + self.frac_part

    def dequantize(self) -> torch.Tensor:
        return self.units * self.scale


def max_fixed_value(int_bits: int, frac_bits: int) -> float:
    """Largest representable magnitude in units: 2**(I-1) - 2**-F."""
    return (2 ** (int_bits + frac_bits - 1) - 1) / 2**frac_bits


def calibrate_scale(samples: torch.Tensor | Sequence[torch.Tensor], int_bits: int, frac_bits: int) -> float:
    """Per-tensor scale that maps the largest |value| seen in ``samples`` onto the largest code."""
    check_fixed_bits(int_bits, frac_bits)
    tensors = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not tensors or all(t.numel() == 0 for t in tensors):
        raise DynapruneError("no samples to calibrate the fixed-point scale on")
    absmax = max(float(t.detach().abs().max()) for t in tensors if t.numel())
    if not math.isfinite(absmax):
        raise DynapruneError("samples for the fixed-point scale contain inf or NaN")
    return absmax / max_fixed_value(int_bits, frac_bits) if absmax > 0 else 1.0


def to_fixed_point(x: torch.Tensor, int_bits: int, frac_bits: int, scale: float | None = None) -> FixedPoint:
    """Quantize ``x`` to I.F fixed point (round to nearest, saturating) and split it.

    Error bound (no saturation, which the abs-max default guarantees): |x - dequantize| <= scale * 2**-(F+1).
    """
    check_fixed_bits(int_bits, frac_bits)
    _check_scale(scale, "scale")
    x64 = x.detach().to(_F64)
    if not bool(torch.isfinite(x64).all()):
        raise DynapruneError("cannot quantize a tensor with inf or NaN")
    if scale is None:
        scale = calibrate_scale(x64, int_bits, frac_bits) if x64.numel() else 1.0
    one = 2.0**frac_bits
    limit = 2 ** (int_bits + frac_bits - 1) - 1
    codes = torch.round(x64 / scale * one)
    saturated = int((codes.abs() > limit).sum())
    codes = codes.clamp(-limit, limit)
    int_part = torch.trunc(codes / one)  # division by a power of two: exact
    frac_part = codes / one - int_part
    return FixedPoint(int_part, frac_part, float(scale), int_bits, frac_bits, saturated)


# ------------------------------------------------------------------------------------ scores


def integer_scores(q_fp: FixedPoint, k_fp: FixedPoint) -> torch.Tensor:
    """S_I = Q_I K_I^T (..., Lq, Lk), exact integers in float64, in units of q.scale * k.scale."""
    return q_fp.int_part @ k_fp.int_part.mT


def approximate_scores(q_fp: FixedPoint, k_fp: FixedPoint, approx: bool = True) -> torch.Tensor:
    """S_I + Q_I K_F^T + Q_F K_I^T (+ Q_F K_F^T when ``approx`` is False), exact, in scale units.

    Near-zero pruning needs no special case here: where both integer parts are zero the two kept
    cross terms are zero already, so skipping them changes nothing; ``near_zero_products`` counts them.
    """
    scores = integer_scores(q_fp, k_fp) + q_fp.int_part @ k_fp.frac_part.mT + q_fp.frac_part @ k_fp.int_part.mT
    if not approx:
        scores = scores + q_fp.frac_part @ k_fp.frac_part.mT
    return scores


def dense_fixed_point_scores(q_fp: FixedPoint, k_fp: FixedPoint) -> torch.Tensor:
    """(Q_I + Q_F)(K_I + K_F)^T in scale units: what approx=off must reproduce exactly."""
    return q_fp.units @ k_fp.units.mT


def near_zero_products(q_fp: FixedPoint, k_fp: FixedPoint) -> torch.Tensor:
    """Per (query, key): how many of the D products q_d * k_d have both integer parts zero."""
    return (q_fp.int_part == 0).to(_F64) @ (k_fp.int_part == 0).to(_F64).mT


def score_error_bound(
    q_fp: FixedPoint, k_fp: FixedPoint, q: torch.Tensor, *, approx: bool, softmax_scale: float = 1.0
) -> torch.Tensor:
    """Elementwise bound on |exact q.k - fixed-point score| (..., Lq, Lk), both times ``softmax_scale``.

    Rounding: |q - q^| <= dq = q.scale 2**-(F+1), same for k, so
        |q.k - q^.k^| <= dk sum_d |q_d| + dq sum_d |k^_d|      (unsaturated tensors)
    and approx adds the dropped term: q.scale k.scale |Q_F K_F^T| <= q.scale k.scale sum_d |q_F||k_F|.
    Note that the dropped term does not shrink with F (|frac| < 1 unit whatever F is); it shrinks as
    I grows, because a unit is then a smaller part of the range.
    """
    dq = q_fp.scale * 2.0 ** -(q_fp.frac_bits + 1)
    dk = k_fp.scale * 2.0 ** -(k_fp.frac_bits + 1)
    q_l1 = q.detach().to(_F64).abs().sum(-1, keepdim=True)  # (..., Lq, 1)
    k_l1 = k_fp.dequantize().abs().sum(-1)[..., None, :]  # (..., 1, Lk)
    bound = dk * q_l1 + dq * k_l1
    if approx:
        bound = bound + q_fp.scale * k_fp.scale * (q_fp.frac_part.abs() @ k_fp.frac_part.abs().mT)
    return bound * softmax_scale


# ----------------------------------------------------------------------------------------- masks


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


# ------------------------------------------------------------------------- early head pruning


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


# ----------------------------------------------------------------------- row-balanced blocks


def block_importance(
    int_scores: torch.Tensor, block_size: int, valid: torch.Tensor | None = None, score: str = "abs_sum"
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
    int_scores: torch.Tensor, block_size: int, valid: torch.Tensor | None, score: str = "abs_sum"
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
    score: str = "abs_sum",
    keep_first_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rule end to end: (kept blocks, valid blocks), both bool (..., nbq, nbk)."""
    importance, valid_blocks = block_importance(int_scores, block_size, valid, score)
    thresholds = row_thresholds(importance, block_ratio, valid_blocks)
    forced = forced_blocks(*int_scores.shape[-2:], block_size, causal=causal, keep_first_block=keep_first_block,
                           device=int_scores.device)
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
    return forced_blocks(*int_scores.shape[-2:], block_size, causal=causal, keep_first_block=keep_first_block,
                         device=int_scores.device)


def _check_block_size(block_size: int, lk: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DynapruneError(f"block_size must be a positive integer, got {block_size!r}")
    if block_size > lk:
        raise DynapruneError(f"block_size {block_size} is larger than the sequence ({lk} keys)")


# ---------------------------------------------------------------------------------- calibration


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
    score: str = "abs_sum",
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


# ----------------------------------------------------------------------------- the whole path


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
    probs = masked_softmax(scores, kept_pairs)
    out = (probs @ v.detach().to(_F64)).to(v.dtype)

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

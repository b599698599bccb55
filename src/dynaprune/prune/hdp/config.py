"""HDP's knobs: the recipe-level configuration and the validation of every knob.

HDP (arXiv 2407.12893) Sec. III; the summary (``shared/seeds/hdp-summary.md``, "Method Summary" and
"Why This Works", Mechanisms 1-3) names the three knobs this holds: the block ratio rho_B (Mechanism 1),
the head threshold tau_H (Mechanism 2) and the integer / fraction split of the approximation
(Mechanism 3). The readings of what the paper leaves open are in the package docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from dynaprune.errors import DynapruneError

KEEP_AT_THRESHOLD: Final = True
"""Block rule comparison: keep ``importance >= theta`` (True) or ``importance > theta`` (False)."""

ALWAYS_KEEP_DIAGONAL: Final = True
"""Causal attention keeps every block that contains a diagonal (query i, its own key) element."""

BLOCK_SCORES: Final = ("abs_sum", "sum", "max")
"""Block importance from its integer scores: |sum| (the paper's), signed sum, or max (package docstring)."""

DEFAULT_BLOCK_SCORE: Final = "max"
"""Chosen on STS-B *train* (benchmarks/hdp_block_score_select.py, results/hdp-block-score-select.json):
mean Spearman over block sparsities 0.5-0.9 max 0.755, sum 0.707, abs_sum 0.253."""

FRACTIONAL_PRODUCTS_PER_MAC: Final = 3
"""Fractional partial products of one q_d * k_d in the exact split: Q_I K_F, Q_F K_I and Q_F K_F."""

MAX_WORD_BITS: Final = 16


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
    block_score: str = DEFAULT_BLOCK_SCORE
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

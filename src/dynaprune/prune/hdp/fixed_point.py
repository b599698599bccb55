"""HDP fixed point: Q and K as ``scale * (int_part + frac_part)`` and the integer scores S_I = Q_I K_I^T.

HDP (arXiv 2407.12893) Sec. III; summary (``shared/seeds/hdp-summary.md``) Mechanisms 1-3: every
pruning decision is taken on the integer parts alone, the fraction parts only enter the approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.hdp.config import _check_scale, check_fixed_bits

_F64 = torch.float64


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

"""The scales and zero-points of a group-quantized K/V block, stored in fp16 or in 8 bits.

KIVI (Liu et al. 2024, Sec. 3) keeps one fp16 scale and one fp16 zero-point per group; at 2-3 bits and
groups of 32 tokens they are a third of the bytes. ``scale_bits=8`` stores them the way QLoRA's double
quantization does (Dettmers et al. 2023, Sec. 3): a row of scales (or zero-points) becomes 8-bit codes
over [base, base + 255 step], with one fp16 ``step`` and one fp16 ``base`` per row. A row is ``rows``
consecutive positions along dim -2 times the last dim (keys: one G-token block's D channels; values: the
``rows`` tokens of a block times their channel groups).

What stays exact: the zero-point is rounded DOWN on the 8-bit grid and the scale UP (computed after the
rounded zero), so every element of a group still lies in [zero, zero + (2^B - 1) scale] with the values
really stored, and an element's round-trip error stays at most its (8-bit) scale / 2. The price is a
slightly wider range than fp16 scales give, which the caller measures (``benchmarks/kv_quant.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError

SCALE_BITS = (8, 16)


def check_scale_bits(bits: int, what: str = "scale bits") -> int:
    if isinstance(bits, bool) or bits not in SCALE_BITS:
        raise DynapruneError(f"{what} must be 8 or 16, got {bits!r}")
    return bits


def _down(x: torch.Tensor) -> torch.Tensor:
    """fp16 of ``x`` rounded down (so its fp32 value is <= x)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _up(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


@dataclass
class Scales:
    """Scales or zero-points as stored: ``values`` fp16 (16 bits) or uint8 codes (8 bits) shaped (..., P, n);
    for 8 bits, ``step`` and ``base`` fp16 (..., P / rows, 1): one pair per ``rows`` positions of dim -2."""

    values: torch.Tensor
    step: torch.Tensor | None = None
    base: torch.Tensor | None = None
    rows: int = 1

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def bits(self) -> int:
        return 16 if self.step is None else 8

    def float(self) -> torch.Tensor:
        """The fp32 values dequantization uses (for 8 bits: ``code * step + base``)."""
        if self.step is None:
            return self.values.float()
        r = self.values.unflatten(-2, (-1, self.rows)).flatten(-2).float()
        return (r * self.step.float() + self.base.float()).unflatten(-1, (self.rows, -1)).flatten(-3, -2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.step, self.base) if t is not None)

    def cat(self, other: Scales, dim: int) -> Scales:
        if other.bits != self.bits or other.rows != self.rows:
            raise DynapruneError("cannot join scales stored differently")
        if self.step is None:
            return Scales(torch.cat([self.values, other.values], dim))
        return Scales(
            torch.cat([self.values, other.values], dim),
            torch.cat([self.step, other.step], dim),
            torch.cat([self.base, other.base], dim),
            self.rows,
        )


def _grid(x: torch.Tensor, rows: int, up: bool) -> Scales:
    """8-bit codes of ``x`` (..., P, n) per row of ``rows`` x n: every stored value >= x (``up``) or <= x."""
    if x.shape[-2] % rows:
        raise DynapruneError(f"{x.shape[-2]} positions do not split into scale rows of {rows}")
    r = x.unflatten(-2, (-1, rows)).flatten(-2)
    lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    base = _down(lo)
    step = _up((hi - base.float()) / 255)
    step = torch.where(step.float() * 255 + base.float() < hi, torch.nextafter(step, torch.full_like(step, 1.0)), step)
    if not (torch.isfinite(step).all() and torch.isfinite(base).all()):
        raise DynapruneError("K/V scales outside the fp16 range cannot be stored in 8 bits")
    safe = torch.where(step == 0, torch.ones_like(step), step).float()
    q = (r - base.float()) / safe
    codes = (torch.ceil(q) if up else torch.floor(q)).clamp_(0, 255)
    value = codes * step.float() + base.float()
    codes = (codes + (value < r).float() if up else codes - (value > r).float()).clamp_(0, 255)
    shaped = codes.to(torch.uint8).unflatten(-1, (rows, -1)).flatten(-3, -2)
    return Scales(shaped, step, base, rows)


def covering(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, scale_bits: int = 16, rows: int = 1
) -> tuple[Scales, Scales]:
    """(scale, zero) of groups with minima ``lo`` and maxima ``hi`` (..., P, n), stored in ``scale_bits``:
    zero <= lo and zero + (2^bits - 1) scale >= hi in the fp32 arithmetic of dequantization."""
    check_scale_bits(scale_bits)
    qmax = (1 << bits) - 1
    if scale_bits == 16:
        zero = _down(lo)
        scale = ((hi - zero.float()) / qmax).to(torch.float16)  # nearest, then one step up if short
        short = scale.float() * qmax + zero.float() < hi
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
            raise DynapruneError("K/V values outside the fp16 range cannot be group-quantized")
        return Scales(scale), Scales(zero)
    zero = _grid(lo, rows, up=False)
    z = zero.float()
    scale = _grid((hi - z) / qmax, rows, up=True)
    s = scale.float()
    short = s * qmax + z < hi  # fp32 rounding of the product: one more code where there is room
    if bool(short.any()):
        bumped = (scale.values.int() + short.int()).clamp(max=255).to(torch.uint8)
        scale = Scales(bumped, scale.step, scale.base, rows)
    return scale, zero

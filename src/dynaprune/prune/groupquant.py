"""Group quantization of K and V for a packed KV cache (KIVI, Liu et al. 2024, Sec. 3).

Asymmetric min/max quantization to B bits (1..16): a group of elements shares one scale and one
zero-point, stored in fp16 (or in 8 bits, ``prune/scalequant.py``; K and V may be Hadamard-rotated first,
``prune/hadamard.py``); an element is stored as the code ``round((x - zero) / scale)`` in
[0, 2^B - 1] and read back as ``code * scale + zero``. Keys are quantized PER CHANNEL (each channel's
scale and zero over a group of G consecutive tokens: Llama keys have outlier channels, and a
per-token group would spend its range on them) and values PER TOKEN (groups of G channels).

The zero-point is rounded DOWN to fp16 and the scale UP (``scalequant.covering``), so every element of a group
lies in [zero, zero + (2^B - 1) scale] with the fp16 values really stored: no code is clipped and the
round-trip error of an element is at most scale / 2 (plus fp32 rounding), an exact bound.

Packing (``pack_bits``): B in {1, 2, 4} puts 8 / B codes in a byte; B = 8 and 16 are one and two bytes a
code; B = 3, 5, 6, 7 (and 9..15) are packed as one little-endian bit stream across byte boundaries,
ceil(M B / 8) bytes for a row of M codes, so no bits are wasted on a wider width. ``nbytes`` counts what
is really stored: the packed code bytes, the fp16 scales and the fp16 zero-points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError
from dynaprune.prune.hadamard import rotate
from dynaprune.prune.scalequant import Scales, check_scale_bits, covering

MAX_BITS = 16


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise DynapruneError(f"{what} must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return bits


def check_group(group: int, length: int | None = None, what: str = "group") -> int:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise DynapruneError(f"{what} must be a positive integer, got {group!r}")
    if length is not None and length % group:
        raise DynapruneError(f"{what}={group} does not divide {length}")
    return group


# ---------------------------------------------------------------------- quantize / dequantize
def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., N) in groups of ``group`` consecutive elements of the last dim.

    Returns codes (..., N / group, group) int32 in [0, 2^bits - 1], scale and zero (..., N / group) fp16.
    """
    check_bits(bits)
    check_group(group, x.shape[-1])
    g = x.float().unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = covering(lo, hi, bits)
    return _codes(g, scale.values.float(), zero.values.float(), bits), scale.values, zero.values


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``code * scale + zero`` in fp32, flattened back to (..., N)."""
    out = codes.float() * scale.float()[..., None] + zero.float()[..., None]
    return out.flatten(-2)


def fake_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim (groups of ``group`` elements), in x's dtype."""
    return dequantize_groups(*quantize_groups(x, bits, group)).to(x.dtype)


# ---------------------------------------------------------------------- bit packing
def packed_bytes(m: int, bits: int) -> int:
    """Bytes a row of ``m`` codes of ``bits`` bits takes once packed."""
    return -(-m * bits // 8)


# bits -> (bytes, codes) of a word of lcm(bits, 8) <= 56 bits: the same little-endian bit stream, unpacked with
# a few shifts per word instead of one per bit
WORD_BITS = {3: (3, 8), 5: (5, 8), 6: (3, 4), 7: (7, 8)}


def _word_dtype(n_bytes: int) -> torch.dtype:
    return torch.int32 if n_bytes <= 3 else torch.int64  # 24-bit words fit (and shift faster) in int32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., M) in [0, 2^bits) into uint8 (..., ceil(M bits / 8)), little-endian."""
    check_bits(bits)
    m = codes.shape[-1]
    c = codes.to(torch.int32)
    if bits % 8 == 0:  # 8 or 16: whole bytes, low byte first
        parts = [(c >> (8 * i)) & 0xFF for i in range(bits // 8)]
        return torch.stack(parts, dim=-1).flatten(-2).to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4: 8 / bits codes in a byte
        per = 8 // bits
        c = F.pad(c, (0, (-m) % per)).unflatten(-1, (-1, per))
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    if bits in WORD_BITS:  # 3, 5, 6, 7: whole words of lcm(bits, 8) bits (e.g. 4 codes of 6 bits in 3 bytes)
        n_bytes, n_codes = WORD_BITS[bits]
        words = F.pad(c, (0, (-m) % n_codes)).unflatten(-1, (-1, n_codes)).to(_word_dtype(n_bytes))
        words = (words << (torch.arange(n_codes, dtype=words.dtype, device=c.device) * bits)).sum(-1, dtype=words.dtype)
        out = (words[..., None] >> (torch.arange(n_bytes, dtype=words.dtype, device=c.device) * 8)) & 0xFF
        return out.flatten(-2)[..., : packed_bytes(m, bits)].to(torch.uint8)
    # 9..15: one bit stream across byte boundaries
    bit_index = torch.arange(bits, dtype=torch.int32, device=c.device)
    stream = ((c[..., None] >> bit_index) & 1).flatten(-2)
    stream = F.pad(stream, (0, (-stream.shape[-1]) % 8)).unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, dtype=torch.int32, device=c.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 codes (..., m)."""
    check_bits(bits)
    if packed.shape[-1] != packed_bytes(m, bits):
        raise DynapruneError(f"{packed.shape[-1]} packed bytes cannot hold {m} codes of {bits} bits")
    p = packed.to(torch.int32)
    if bits % 8 == 0:
        parts = p.unflatten(-1, (-1, bits // 8))
        shifts = torch.arange(bits // 8, dtype=torch.int32, device=p.device) * 8
        return (parts << shifts).sum(-1)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        return ((p[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :m]
    if bits in WORD_BITS:  # the words of pack_bits, read back with shifts (no bit-by-bit stream)
        n_bytes, n_codes = WORD_BITS[bits]
        words = F.pad(packed, (0, (-packed.shape[-1]) % n_bytes)).unflatten(-1, (-1, n_bytes))
        words = words.to(_word_dtype(n_bytes))
        words = (words << (torch.arange(n_bytes, dtype=words.dtype, device=p.device) * 8)).sum(-1, dtype=words.dtype)
        shifts = torch.arange(n_codes, dtype=words.dtype, device=p.device) * bits
        codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.flatten(-2)[..., :m].to(torch.int32)
    stream = ((p[..., None] >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).flatten(-2)
    stream = stream[..., : m * bits].unflatten(-1, (m, bits))
    return (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1)


# ---------------------------------------------------------------------- K and V in cache layout
ROTATIONS = ("", "k", "v", "kv")


@dataclass(frozen=True)
class KVQuantSpec:
    """How a packed cache stores K and V: bits of each, tokens per key group (per channel), channels per
    value group (per token); ``scale_bits`` 16 (fp16 scales and zero-points) or 8 (``prune/scalequant.py``);
    ``rotate``: which of K / V are stored Hadamard-rotated (``prune/hadamard.py``): "", "k", "v" or "kv"."""

    key_bits: int
    value_bits: int
    key_group: int
    value_group: int
    scale_bits: int = 16
    rotate: str = ""

    def __post_init__(self) -> None:
        check_bits(self.key_bits, "key bits")
        check_bits(self.value_bits, "value bits")
        check_group(self.key_group, what="key group")
        check_group(self.value_group, what="value group")
        check_scale_bits(self.scale_bits)
        if self.rotate not in ROTATIONS:
            raise DynapruneError(f"rotate must be one of {ROTATIONS}, got {self.rotate!r}")


@dataclass
class PackedGroups:
    """Packed codes (uint8), scales and zero-points (:class:`~dynaprune.prune.scalequant.Scales`) of a
    quantized K or V block.

    Keys: codes (B, H, blocks, bytes of G x D codes), scale / zero (B, H, blocks, D), one block = G tokens.
    Values: codes (B, H, T, bytes of D codes), scale / zero (B, H, T, D / G)."""

    codes: torch.Tensor
    scale: Scales
    zero: Scales
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        """Bytes really stored: codes + scales + zero-points (8-bit ones with their fp16 step and base)."""
        return self.codes.numel() * self.codes.element_size() + self.scale.nbytes + self.zero.nbytes

    def cat(self, other: PackedGroups, dim: int) -> PackedGroups:
        return PackedGroups(
            torch.cat([self.codes, other.codes], dim),
            self.scale.cat(other.scale, dim),
            self.zero.cat(other.zero, dim),
            other.bits,
            other.group,
        )


def _codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 codes of groups ``g`` (..., G) with fp32 ``scale`` / ``zero`` (...)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: every code 0
    return torch.round((g - zero[..., None]) / safe[..., None]).clamp_(0, (1 << bits) - 1).to(torch.int32)


def quantize_keys(k: torch.Tensor, bits: int, group: int, scale_bits: int = 16) -> PackedGroups:
    """Keys (B, H, T, D), T a multiple of ``group``: per channel, over groups of ``group`` tokens; with
    ``scale_bits=8`` a block's D scales (and D zero-points) share one fp16 step and base."""
    check_bits(bits)
    b, h, t, d = k.shape
    check_group(group, t, "key group (tokens)")
    g = k.float().transpose(-1, -2).unflatten(-1, (-1, group))  # (B, H, D, T/G, G): a channel's groups
    scale, zero = covering(g.amin(-1).transpose(-1, -2), g.amax(-1).transpose(-1, -2), bits, scale_bits)
    codes = _codes(g, scale.float().transpose(-1, -2), zero.float().transpose(-1, -2), bits)
    blocks = codes.permute(0, 1, 3, 2, 4).reshape(b, h, t // group, d * group)  # one row per G-token block
    return PackedGroups(pack_bits(blocks, bits), scale, zero, bits, group)


def dequantize_keys(p: PackedGroups, head_dim: int) -> torch.Tensor:
    """(B, H, blocks x G, D) fp32 keys of :func:`quantize_keys`."""
    b, h, n_blocks, _ = p.codes.shape
    codes = unpack_bits(p.codes, p.bits, head_dim * p.group).view(b, h, n_blocks, head_dim, p.group)
    x = codes.float() * p.scale.float()[..., None] + p.zero.float()[..., None]  # (B, H, blocks, D, G)
    return x.transpose(-1, -2).reshape(b, h, n_blocks * p.group, head_dim)


def quantize_values(v: torch.Tensor, bits: int, group: int, scale_bits: int = 16, rows: int = 1) -> PackedGroups:
    """Values (B, H, T, D): per token, over groups of ``group`` channels (``group`` divides D); with
    ``scale_bits=8`` the scales of ``rows`` consecutive tokens (T a multiple of it) share a step and base."""
    check_bits(bits)
    check_group(group, v.shape[-1], "value group (channels)")
    g = v.float().unflatten(-1, (-1, group))  # (B, H, T, D/G, G)
    scale, zero = covering(g.amin(-1), g.amax(-1), bits, scale_bits, rows)
    codes = _codes(g, scale.float(), zero.float(), bits)
    return PackedGroups(pack_bits(codes.flatten(-2), bits), scale, zero, bits, group)


def dequantize_values(p: PackedGroups, head_dim: int) -> torch.Tensor:
    """(B, H, T, D) fp32 values of :func:`quantize_values`."""
    codes = unpack_bits(p.codes, p.bits, head_dim).unflatten(-1, (-1, p.group))
    return dequantize_groups(codes, p.scale.float(), p.zero.float())


def quantize_kv(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec) -> tuple[PackedGroups, PackedGroups]:
    """K and V (B, H, T, D) as ``spec`` stores them (rotated first where it says so); T a multiple of the
    key group, which is also the token row of the values' 8-bit scales."""
    k = rotate(k) if "k" in spec.rotate else k
    v = rotate(v) if "v" in spec.rotate else v
    return (
        quantize_keys(k, spec.key_bits, spec.key_group, spec.scale_bits),
        quantize_values(v, spec.value_bits, spec.value_group, spec.scale_bits, spec.key_group),
    )


def dequantize_kv(
    k: PackedGroups, v: PackedGroups, spec: KVQuantSpec, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 K and V of :func:`quantize_kv` (rotated back)."""
    dk, dv = dequantize_keys(k, head_dim), dequantize_values(v, head_dim)
    return (rotate(dk) if "k" in spec.rotate else dk), (rotate(dv) if "v" in spec.rotate else dv)


def fake_quantize_kv(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantize-dequantize reference of what a packed cache returns (for fp16 scales and no rotation
    through the generic :func:`fake_quantize`, no packing involved)."""
    if spec.scale_bits == 16 and not spec.rotate:
        by_channel = fake_quantize(k.transpose(-1, -2), spec.key_bits, spec.key_group).transpose(-1, -2)
        return by_channel, fake_quantize(v, spec.value_bits, spec.value_group)
    dk, dv = dequantize_kv(*quantize_kv(k, v, spec), spec, k.shape[-1])
    return dk.to(k.dtype), dv.to(v.dtype)

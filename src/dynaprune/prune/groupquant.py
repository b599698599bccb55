"""Group quantization of K and V for a packed KV cache (KIVI, Liu et al. 2024, Sec. 3).

Asymmetric min/max quantization to B bits (1..16): a group of elements shares one scale and one
zero-point, both stored in fp16; an element is stored as the code ``round((x - zero) / scale)`` in
[0, 2^B - 1] and read back as ``code * scale + zero``. Keys are quantized PER CHANNEL (each channel's
scale and zero over a group of G consecutive tokens: Llama keys have outlier channels, and a
per-token group would spend its range on them) and values PER TOKEN (groups of G channels).

The zero-point is rounded DOWN to fp16 and the scale UP (``_fp16_range``), so every element of a group
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
def _fp16_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) with zero <= lo and zero + qmax * scale >= hi in the fp32 arithmetic of
    ``dequantize_groups``: zero rounded down, scale rounded up (one fp16 step past nearest suffices)."""
    qmax = (1 << bits) - 1
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, float("-inf"))), zero)
    scale = ((hi - zero.float()) / qmax).to(torch.float16)
    short = scale.float() * qmax + zero.float() < hi
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise DynapruneError("K/V values outside the fp16 range cannot be group-quantized")
    return scale, zero


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., N) in groups of ``group`` consecutive elements of the last dim.

    Returns codes (..., N / group, group) int32 in [0, 2^bits - 1], scale and zero (..., N / group) fp16.
    """
    check_bits(bits)
    check_group(group, x.shape[-1])
    g = x.float().unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = _fp16_range(lo, hi, bits)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # a constant group: every code 0
    codes = torch.round((g - zero.float()[..., None]) / safe[..., None]).clamp_(0, (1 << bits) - 1)
    return codes.to(torch.int32), scale, zero


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
    # 3, 5, 6, 7, 9..15: one bit stream across byte boundaries
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
    stream = ((p[..., None] >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).flatten(-2)
    stream = stream[..., : m * bits].unflatten(-1, (m, bits))
    return (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1)


# ---------------------------------------------------------------------- K and V in cache layout
@dataclass(frozen=True)
class KVQuantSpec:
    """How a packed cache stores K and V: bits of each, tokens per key group (per channel), channels per
    value group (per token)."""

    key_bits: int
    value_bits: int
    key_group: int
    value_group: int

    def __post_init__(self) -> None:
        check_bits(self.key_bits, "key bits")
        check_bits(self.value_bits, "value bits")
        check_group(self.key_group, what="key group")
        check_group(self.value_group, what="value group")


@dataclass
class PackedGroups:
    """Packed codes (uint8), fp16 scales and zero-points of a quantized K or V block.

    Keys: codes (B, H, blocks, bytes of G x D codes), scale / zero (B, H, blocks, D), one block = G tokens.
    Values: codes (B, H, T, bytes of D codes), scale / zero (B, H, T, D / G)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        """Bytes really stored: codes + scales + zero-points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> PackedGroups:
    """Keys (B, H, T, D), T a multiple of ``group``: per channel, over groups of ``group`` tokens."""
    b, h, t, d = k.shape
    check_group(group, t, "key group (tokens)")
    by_channel = k.transpose(-1, -2)  # (B, H, D, T): a channel's groups run along the tokens
    codes, scale, zero = quantize_groups(by_channel, bits, group)  # codes (B, H, D, T/G, G)
    blocks = codes.permute(0, 1, 3, 2, 4).reshape(b, h, t // group, d * group)  # one row per G-token block
    return PackedGroups(pack_bits(blocks, bits), scale.transpose(-1, -2).contiguous(),
                        zero.transpose(-1, -2).contiguous(), bits, group)


def dequantize_keys(p: PackedGroups, head_dim: int) -> torch.Tensor:
    """(B, H, blocks x G, D) fp32 keys of :func:`quantize_keys`."""
    b, h, n_blocks, _ = p.codes.shape
    codes = unpack_bits(p.codes, p.bits, head_dim * p.group).view(b, h, n_blocks, head_dim, p.group)
    x = codes.float() * p.scale.float()[..., None] + p.zero.float()[..., None]  # (B, H, blocks, D, G)
    return x.transpose(-1, -2).reshape(b, h, n_blocks * p.group, head_dim)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> PackedGroups:
    """Values (B, H, T, D): per token, over groups of ``group`` channels (``group`` divides D)."""
    check_group(group, v.shape[-1], "value group (channels)")
    codes, scale, zero = quantize_groups(v, bits, group)  # codes (B, H, T, D/G, G)
    return PackedGroups(pack_bits(codes.flatten(-2), bits), scale, zero, bits, group)


def dequantize_values(p: PackedGroups, head_dim: int) -> torch.Tensor:
    """(B, H, T, D) fp32 values of :func:`quantize_values`."""
    codes = unpack_bits(p.codes, p.bits, head_dim).unflatten(-1, (-1, p.group))
    return dequantize_groups(codes, p.scale, p.zero)


def fake_quantize_kv(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantize-dequantize reference of what a packed cache returns (no packing involved)."""
    by_channel = fake_quantize(k.transpose(-1, -2), spec.key_bits, spec.key_group).transpose(-1, -2)
    return by_channel, fake_quantize(v, spec.value_bits, spec.value_group)

"""Progressive quantization (SpAtten, Wang et al. HPCA 2021, Sec. III-D).

Linear symmetric quantization of the attention inputs. Progressive: fetch only the MSBs of Q and K,
compute the attention probabilities; "if the max of computed probability is smaller than a threshold,
indicating the distribution is flat, we will fetch LSBs for inputs and recompute the attention
probabilities for once". Flat rows are the ones where quantization error matters (error ~ p(1-p),
Eq. 2); rows dominated by a few tokens keep their MSB-only result.

Our bit layout (the paper stores "MSBs continuously and LSBs continuously in DRAM", not the layout):
a value is quantized once at M + L bits, integer code c with |c| <= 2^(M+L-1) - 1 and one scale per
row (``dim=-1``: per token and head) or per tensor (``dim=None``). The MSBs are the top M bits of c's
two's complement, ``c >> L`` (M-bit signed), the LSBs the low L bits, ``c & (2^L - 1)`` (unsigned), so
MSB + LSB rebuild c exactly and equal :func:`quantize_symmetric` at M + L bits bit for bit. With the
MSBs alone the missing LSBs are filled with ``10..0`` (half an MSB step), so MSB-only is the M-bit
mid-rise quantizer ``((c >> L) + 1/2) * 2^L * scale``: unbiased, and within half an MSB step plus half
an LSB step of x (zero-filling would shift every value down by half a step).

The published SpAtten GPT-2 traces quantize K progressively (6 MSB + 4 LSB bits, threshold 0.05),
V statically at the MSB width (6 bits) and leave Q at 16 bits; ``query_bits=16`` and
:func:`quantized_values` with ``bits=msb_bits`` reproduce that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Quantized(NamedTuple):
    """Integer codes and the scale that maps them back: x ~ codes * scale."""

    codes: torch.Tensor  # int32, |codes| <= max_code(bits)
    scale: torch.Tensor  # broadcastable to codes (keepdim over the reduced dim)
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


class MsbLsb(NamedTuple):
    """An (M + L)-bit quantization split into its M most and L least significant bits."""

    msb: torch.Tensor  # int32, signed M-bit: codes >> L
    lsb: torch.Tensor  # int32, unsigned L-bit: codes & (2^L - 1)
    scale: torch.Tensor  # scale of the (M + L)-bit code
    msb_bits: int
    lsb_bits: int

    def full(self) -> torch.Tensor:
        """MSB + LSB: exactly ``quantize_symmetric(x, M + L).dequantize()``."""
        codes = (self.msb << self.lsb_bits) + self.lsb
        return codes.to(self.scale.dtype) * self.scale

    def msb_only(self) -> torch.Tensor:
        """MSBs alone, missing LSBs filled with half their range: the M-bit mid-rise value."""
        codes = (self.msb << self.lsb_bits) + (1 << (self.lsb_bits - 1))
        return codes.to(self.scale.dtype) * self.scale


class ProgressiveProbs(NamedTuple):
    """Progressive attention probabilities and what they cost (counts are Python ints)."""

    probs: torch.Tensor  # (B, H, Lq, Lk)
    needs_lsb: torch.Tensor  # (B, H, Lq) bool: rows recomputed with MSB + LSB
    rows: int
    rows_needing_lsb: int
    key_bits_fetched: int  # visible K rows x D x (M, + L for KV heads where any row needed LSBs)
    key_bits_full: int  # the same K rows fetched at M + L bits (static quantization at full width)
    query_bits_fetched: int  # Q rows x D x (M, + L where needed), or x query_bits if Q is static

    @property
    def lsb_fraction(self) -> float:
        return self.rows_needing_lsb / self.rows if self.rows else 0.0


class QuantizedValues(NamedTuple):
    values: torch.Tensor
    bits_fetched: int


def max_code(bits: int) -> int:
    """Largest code of a symmetric ``bits``-bit quantizer: 2^(bits-1) - 1 (1 bit: ternary, 1)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    return max(1, 2 ** (bits - 1) - 1)


def quantize_symmetric(x: torch.Tensor, bits: int, dim: int | None = -1) -> Quantized:
    """Linear symmetric quantization: ``codes = round(x / scale)``, ``scale = max|x| / max_code(bits)``.

    dim: the dim reduced for the scale (``-1``: one scale per row, e.g. per token and head of
    (B, H, L, D)); ``None``: one scale for the whole tensor. An all-zero slice gets scale 1 (codes 0).
    Error bound: ``|x - dequantize| <= scale / 2`` up to float rounding of x / scale and of the
    product (a few ulps of x), i.e. half a quantization step.
    """
    qmax = max_code(bits)
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    amax = work.abs().amax() if dim is None else work.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(work / scale).clamp(-qmax, qmax).to(torch.int32)
    return Quantized(codes, scale, bits)


def fake_quantize(x: torch.Tensor, bits: int, dim: int | None = -1) -> torch.Tensor:
    """x quantized and dequantized at ``bits`` (same dtype as the float32-or-wider working copy)."""
    return quantize_symmetric(x, bits, dim).dequantize()


def split_msb_lsb(x: torch.Tensor, msb_bits: int, lsb_bits: int, dim: int | None = -1) -> MsbLsb:
    """Quantize at ``msb_bits + lsb_bits`` and split each code into its MSBs and LSBs."""
    if msb_bits < 1 or lsb_bits < 1 or msb_bits + lsb_bits > 16:
        raise ValueError(f"need msb_bits, lsb_bits >= 1 and at most 16 in total, got {msb_bits}+{lsb_bits}")
    quantized = quantize_symmetric(x, msb_bits + lsb_bits, dim)
    msb = quantized.codes >> lsb_bits  # arithmetic shift: floor division for negative codes too
    lsb = quantized.codes & ((1 << lsb_bits) - 1)
    return MsbLsb(msb, lsb, quantized.scale, msb_bits, lsb_bits)


def quantized_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bits: int,
    mask: torch.Tensor | None = None,
    dim: int | None = -1,
) -> torch.Tensor:
    """Static quantization: softmax of (Q_b K_b^T) * scale with Q and K quantized at ``bits``."""
    return _attention_probs(fake_quantize(q, bits, dim), fake_quantize(k, bits, dim), scale, mask)


def progressive_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    msb_bits: int,
    lsb_bits: int,
    threshold: float,
    mask: torch.Tensor | None = None,
    *,
    query_bits: int | None = None,
    dim: int | None = -1,
) -> ProgressiveProbs:
    """Attention probabilities from the MSBs, recomputed with MSB + LSB for flat rows.

    q: (B, H, Lq, D); k: (B, Hkv, Lk, D), H a multiple of Hkv. mask: bool broadcastable to
    (B, H, Lq, Lk), True where a query may attend. A row (batch, head, query) needs its LSBs when its
    max MSB-only probability is below ``threshold``; ``threshold = 0`` never recomputes, and
    ``threshold >= 1`` always does (a max probability can round to exactly 1.0, which ``<`` would
    skip), giving exactly :func:`quantized_attention_probs` at M + L bits.
    query_bits: None = Q goes through the same MSB/LSB progression as K; an int = Q quantized
    statically at that width (16 in the published SpAtten traces, where Q never leaves the chip).
    K's LSBs are counted once per (batch, KV head) when any of its rows needs them: in the
    summarization stage K sits in on-chip SRAM and is reused by every query.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads = k.shape[1]
    k_split = split_msb_lsb(k, msb_bits, lsb_bits, dim)
    if query_bits is None:
        q_split = split_msb_lsb(q, msb_bits, lsb_bits, dim)
        q_msb, q_full = q_split.msb_only(), q_split.full
    else:
        q_static = fake_quantize(q, query_bits, dim)
        q_msb, q_full = q_static, lambda: q_static

    probs = _attention_probs(q_msb, k_split.msb_only(), scale, mask)
    if threshold >= 1.0:
        needs_lsb = torch.ones(probs.shape[:-1], dtype=torch.bool, device=probs.device)
    else:
        needs_lsb = probs.amax(dim=-1) < threshold
    if bool(needs_lsb.any()):
        full = _attention_probs(q_full(), k_split.full(), scale, mask)
        probs = torch.where(needs_lsb.unsqueeze(-1), full, probs)

    # bits: K rows visible to at least one query of the KV group, MSBs always, LSBs where needed
    group = n_heads // n_kv_heads
    if mask is None:
        key_rows = torch.full((batch, n_kv_heads), k.shape[2], dtype=torch.long, device=q.device)
    else:
        visible = mask.to(torch.bool).expand(probs.shape).any(dim=-2)  # (B, H, Lk)
        key_rows = visible.unflatten(1, (n_kv_heads, group)).any(dim=2).sum(-1)  # (B, Hkv)
    group_needs_lsb = needs_lsb.any(dim=-1).unflatten(1, (n_kv_heads, group)).any(dim=2)
    key_msb = int(key_rows.sum()) * head_dim * msb_bits
    key_lsb = int(key_rows[group_needs_lsb].sum()) * head_dim * lsb_bits
    n_rows = needs_lsb.numel()
    n_lsb_rows = int(needs_lsb.sum())
    if query_bits is None:
        query_bits_fetched = (n_rows * msb_bits + n_lsb_rows * lsb_bits) * head_dim
    else:
        query_bits_fetched = n_rows * head_dim * query_bits
    return ProgressiveProbs(
        probs=probs,
        needs_lsb=needs_lsb,
        rows=n_rows,
        rows_needing_lsb=n_lsb_rows,
        key_bits_fetched=key_msb + key_lsb,
        key_bits_full=int(key_rows.sum()) * head_dim * (msb_bits + lsb_bits),
        query_bits_fetched=query_bits_fetched,
    )


def quantized_values(v: torch.Tensor, bits: int, dim: int | None = -1) -> QuantizedValues:
    """V quantized statically at ``bits`` (the published traces use the K MSB width), with the bits
    fetched for all of V; local value pruning's ``v_rows_fetched * D * bits`` is the pruned figure."""
    return QuantizedValues(fake_quantize(v, bits, dim), v.numel() * bits)


def bits_fetched(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_bits: int = 16,
    lsb_bits: int = 0,
    value_bits: int = 16,
    mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    needs_lsb: torch.Tensor | None = None,
    fetched_values: torch.Tensor | None = None,
) -> dict[str, int]:
    """Bits of Q, K and V one attention call fetches, and the same rows at 16 bits, counted one way.

    q, k: (B, H, L, D) with one K/V head per query head. Rows counted, per head: Q over the real
    queries (``query_mask`` (B, Lq), default all), K and V over the keys visible to at least one real
    query (``mask`` broadcastable to (B, H, Lq, Lk), default all). Q and K at ``key_bits`` (the MSBs of
    a progressive setting), plus ``lsb_bits`` for the Q rows that ``needs_lsb`` (B, H, Lq) marks and
    for all K rows of a head where any real row needed them (K is fetched once per head and call);
    V at ``value_bits`` over the rows ``fetched_values`` (B, H, Lk) marks (local value pruning), else
    every visible row. Returns the ``runtime.summary.LayerStats`` field names.
    """
    batch, heads, n_queries, head_dim = q.shape
    real = torch.ones(batch, heads, n_queries, dtype=torch.bool, device=q.device)
    if query_mask is not None:
        real = real & query_mask.to(device=q.device, dtype=torch.bool)[:, None, :]
    visible = torch.ones(batch, heads, n_queries, k.shape[2], dtype=torch.bool, device=q.device)
    if mask is not None:
        visible = visible & mask.to(torch.bool)
    key_rows = (visible & real[..., None]).any(dim=-2)  # (B, H, Lk)
    needs = real & needs_lsb if needs_lsb is not None else torch.zeros_like(real)
    values = key_rows if fetched_values is None else key_rows & fetched_values
    n_real, n_lsb, n_keys = int(real.sum()), int(needs.sum()), int(key_rows.sum())
    keys_with_lsb = int(key_rows.sum(-1)[needs.any(dim=-1)].sum())
    return {
        "rows": n_real,
        "rows_needing_lsb": n_lsb,
        "query_bits_fetched": (n_real * key_bits + n_lsb * lsb_bits) * head_dim,
        "query_bits_dense16": n_real * head_dim * 16,
        "key_bits_fetched": (n_keys * key_bits + keys_with_lsb * lsb_bits) * head_dim,
        "key_bits_dense16": n_keys * head_dim * 16,
        "value_bits_fetched": int(values.sum()) * head_dim * value_bits,
        "value_bits_dense16": n_keys * head_dim * 16,
    }


def _attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax((q k^T) * scale) over keys, GQA groups repeated, masked keys at probability 0."""
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.to(torch.bool), float("-inf"))
    return scores.softmax(dim=-1)

"""Progressive quantization (SpAtten, Wang et al. HPCA 2021, Sec. III-D) on group-quantized K and V.

SpAtten fetches the MSBs of the attention inputs first, computes the probabilities and, "if the max of
computed probability is smaller than a threshold, indicating the distribution is flat", fetches the LSBs
and recomputes. The paper quantizes linearly and symmetrically; one scale per row wastes the MSBs of
Llama keys on their outlier channels (KIVI, Liu et al. 2024, Sec. 3), so here K and V are quantized the
KIVI way with ``prune/groupquant.py`` (asymmetric, fp16 scale and zero-point per group): keys PER
CHANNEL over groups of G consecutive tokens, values PER TOKEN over groups of G channels.

Bit layout (MSB first, then a refinement): the MSBs are a round-to-nearest M-bit group quantization of
its own (``groupquant.quantize_groups`` at M bits: code m in [0, 2^M - 1], fp16 scale s and zero-point z,
read back as ``m s + z``, error at most s / 2). The L LSBs refine the residual ``x - (m s + z)``, which
lies in [-s/2, s/2], on a mid-rise grid of 2^L cells of width s / 2^L: code l = floor((r + s/2) 2^L / s)
read back as ``(l + 1/2) s / 2^L - s/2``; MSB + LSB is within s / 2^(L+1) of x, i.e. within
(2^(M+L) - 1) / ((2^M - 1) 2^L) (1.06 at 4+4) of a direct (M+L)-bit quantizer's bound. The LSB step is
derived from the MSB scale: the LSBs need no scale of their own. (Before, the MSBs were the top bits of
one (M+L)-bit code, a truncation.) ``rotate`` (QuaRot-style, ``prune/hadamard.py``): K and/or V are
Hadamard-rotated along the head dimension before they are quantized and rotated back when read.

Residual (KIVI Sec. 3.3 keeps its newest tokens in full precision, keys AND values): with
``value_residual`` a causal query also reads the values of its incomplete key group in full precision
(the same slots as its keys; ``residual_output``).

Q is not quantized: in decode it is computed on chip and never fetched (the published SpAtten GPT-2
traces also leave Q at 16 bits); it is counted at 16 bits.

Causality: a key group's scale and zero-point are known only once its G tokens exist. In a causal call
query i (key slot s = Lk - Lq + i) reads the keys of the complete groups, slots ``j < floor((s + 1) / G)
G``, quantized and the newer ones (its own incomplete group, KIVI's full-precision residual) in full
precision, exactly what a token-by-token decode with a packed cache would read; no scale ever sees a
future token. Encoders (non-causal) quantize every key, the last group partial.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynaprune.prune.groupquant import dequantize_groups, quantize_groups
from dynaprune.prune.hadamard import rotate as hadamard_rotate

DEFAULT_GROUP = 64  # tokens per key group and channels per value group (KIVI's / transformers' default)
SCALE_ZERO_BITS = 32  # an fp16 scale and an fp16 zero-point per group


class MsbLsb(NamedTuple):
    """A tensor quantized at M + L bits, read back with all its bits and with the MSBs alone."""

    full: torch.Tensor  # MSB + LSB: the M-bit quantization refined by the L-bit residual code
    msb_only: torch.Tensor  # the MSBs alone: the M-bit round-to-nearest group quantization


class ProgressiveProbs(NamedTuple):
    """Attention probabilities (rows recomputed with MSB + LSB where flat) and the row decision."""

    probs: torch.Tensor  # (B, H, Lq, Lk)
    needs_lsb: torch.Tensor  # (B, H, Lq) bool: rows recomputed with MSB + LSB
    max_prob: torch.Tensor  # (B, H, Lq) max probability of the MSB-only pass (the decision's input)


def group_sizes(head_dim: int, group: int | None) -> tuple[int, int]:
    """(tokens per key group, channels per value group): ``group``, or 64 capped at head_dim."""
    if group is None:
        return DEFAULT_GROUP, min(DEFAULT_GROUP, head_dim)
    return group, group


def msb_lsb_groups(x: torch.Tensor, msb_bits: int, lsb_bits: int, group: int) -> MsbLsb:
    """``x`` (..., N) in groups of ``group`` consecutive elements: the M-bit round-to-nearest group
    quantization (MSBs) and its L-bit residual refinement (module docstring), both read back in fp32."""
    codes, scale, zero = quantize_groups(x, msb_bits, group)
    msb = dequantize_groups(codes, scale, zero)
    if lsb_bits == 0:
        return MsbLsb(msb, msb)
    step = scale.float()[..., None]  # (..., N / group, 1): one MSB step
    cells = 1 << lsb_bits
    residual = (x.float() - msb).unflatten(-1, (-1, group))
    safe = torch.where(step == 0, torch.ones_like(step), step)  # a constant group: residual 0, read back 0
    lsb = torch.floor((residual / safe + 0.5) * cells).clamp_(0, cells - 1)
    refined = (lsb + 0.5) * (step / cells) - step / 2
    return MsbLsb(msb + refined.flatten(-2), msb)


def _rotated(x: torch.Tensor, rotate: bool) -> torch.Tensor:
    return hadamard_rotate(x) if rotate else x.float()


def quantize_key_channels(k: torch.Tensor, msb_bits: int, lsb_bits: int, group: int,
                          key_valid: torch.Tensor | None = None, rotate: bool = False) -> MsbLsb:
    """Keys (B, H, Lk, D) per channel over groups of ``group`` consecutive tokens (the last group may be
    partial), at ``msb_bits + lsb_bits``. key_valid: bool broadcastable to (B, H, Lk), False for padding
    keys, which take no part in a group's range (they read back as anything in it). ``rotate``: quantize
    ``k H`` (Hadamard along the head dim) and read back ``(.) H``."""
    b, h, lk, d = k.shape
    x = _rotated(k, rotate).transpose(-1, -2)  # (B, H, D, Lk): a channel's groups run along the tokens
    pad = (-lk) % group
    valid = torch.ones(1, 1, lk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid.bool()
    valid = torch.nn.functional.pad(valid.expand(b, h, lk), (0, pad), value=False)[:, :, None, :]  # (B,H,1,Lk')
    x = torch.nn.functional.pad(x, (0, pad))
    grouped, valid = x.unflatten(-1, (-1, group)), valid.unflatten(-1, (-1, group))
    # padding and invalid slots take the group's smallest real value: its range stays that of the real keys
    fill = grouped.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    fill = torch.where(torch.isfinite(fill), fill, torch.zeros_like(fill))
    x = torch.where(valid, grouped, fill).flatten(-2)
    parts = (t[..., :lk].transpose(-1, -2) for t in msb_lsb_groups(x, msb_bits, lsb_bits, group))
    return MsbLsb(*(_rotated(t, rotate).to(k.dtype) if rotate else t.to(k.dtype) for t in parts))


def quantize_value_tokens(v: torch.Tensor, msb_bits: int, lsb_bits: int, group: int,
                          rotate: bool = False) -> MsbLsb:
    """Values (B, H, L, D) per token over groups of ``group`` channels (``group`` divides D); ``rotate``
    as for the keys."""
    parts = msb_lsb_groups(_rotated(v, rotate), msb_bits, lsb_bits, group)
    return MsbLsb(*(_rotated(t, rotate).to(v.dtype) if rotate else t.to(v.dtype) for t in parts))


def quantized_key_slots(lq: int, lk: int, group: int, causal: bool, device=None) -> torch.Tensor | None:
    """(Lq, Lk) bool, True where query i reads key slot j quantized (j in a group complete at query i's
    slot Lk - Lq + i); None when every key is read quantized (non-causal)."""
    if not causal:
        return None
    slot = torch.arange(lk - lq, lk, device=device)
    complete = (slot + 1) // group * group  # keys below this are in complete groups
    return torch.arange(lk, device=device)[None, :] < complete[:, None]


def residual_keys(lk: int, group: int, causal: bool) -> int:
    """Key slots the call's last query reads in full precision (its incomplete group)."""
    return lk % group if causal else 0


def _fp_scores(q: torch.Tensor, k_fp: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor | None:
    """q k^T with the full-precision keys, needed only where some query reads a key outside ``slots``."""
    if slots is None or bool(slots.all()):
        return None
    return q @ k_fp.transpose(-1, -2)


def _probs(q: torch.Tensor, k_quant: torch.Tensor, fp_scores: torch.Tensor | None, slots: torch.Tensor | None,
           scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale): quantized keys where ``slots``, full precision elsewhere; masked keys 0."""
    scores = q @ k_quant.transpose(-1, -2)
    if fp_scores is not None:
        scores = torch.where(slots, scores, fp_scores)
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.to(torch.bool), float("-inf"))
    return scores.softmax(dim=-1)


def attention_probs(q: torch.Tensor, k_quant: torch.Tensor, k_fp: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Static quantization: probabilities from the quantized keys (full precision outside ``slots``).
    q: (B, H, Lq, D), keys (B, H, Lk, D) with one K head per query head; mask broadcastable to
    (B, H, Lq, Lk), True = attend."""
    return _probs(q, k_quant, _fp_scores(q, k_fp, slots), slots, scale, mask)


def progressive_probs(q: torch.Tensor, keys: MsbLsb, k_fp: torch.Tensor, scale: float, threshold: float,
                      mask: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> ProgressiveProbs:
    """Probabilities from the key MSBs; a row (batch, head, query) whose max probability is below
    ``threshold`` is recomputed with MSB + LSB. ``threshold = 0`` never recomputes; ``threshold >= 1``
    always does (a max probability can round to exactly 1.0, which ``<`` would skip)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    fp_scores = _fp_scores(q, k_fp, slots)
    probs = _probs(q, keys.msb_only, fp_scores, slots, scale, mask)
    max_prob = probs.amax(dim=-1)
    if threshold >= 1.0:
        needs_lsb = torch.ones(probs.shape[:-1], dtype=torch.bool, device=probs.device)
    else:
        needs_lsb = max_prob < threshold  # NaN rows (queries that see no key) never fetch
    if bool(needs_lsb.all()):
        probs = _probs(q, keys.full, fp_scores, slots, scale, mask)
    elif bool(needs_lsb.any()):
        probs = torch.where(needs_lsb.unsqueeze(-1), _probs(q, keys.full, fp_scores, slots, scale, mask), probs)
    return ProgressiveProbs(probs, needs_lsb, max_prob)


def progressive_output(probs: torch.Tensor, values: MsbLsb, needs_lsb: torch.Tensor | None) -> torch.Tensor:
    """probs @ V: the V MSBs for rows that did not need LSBs, MSB + LSB for those that did."""
    if needs_lsb is None or not bool(needs_lsb.any()):
        return probs @ values.msb_only
    if bool(needs_lsb.all()):
        return probs @ values.full
    return torch.where(needs_lsb.unsqueeze(-1), probs @ values.full, probs @ values.msb_only)


def residual_output(out: torch.Tensor, probs: torch.Tensor, v_read: torch.Tensor, v_fp: torch.Tensor,
                    slots: torch.Tensor | None) -> torch.Tensor:
    """``out`` (= probs @ v_read) with the values outside ``slots`` (Lq, Lk) read in full precision
    instead: each query's incomplete key group (KIVI's full-precision residual, values too)."""
    if slots is None or bool(slots.all()):
        return out
    fp_part = probs.masked_fill(slots, 0.0)
    return out + fp_part @ (v_fp.to(v_read.dtype) - v_read)


def bits_fetched(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_bits: int = 16,
    lsb_bits: int = 0,
    value_bits: int = 16,
    query_bits: int | None = None,
    value_lsb_bits: int = 0,
    key_overhead: float = 0.0,
    value_overhead: float = 0.0,
    key_residual: int = 0,
    value_residual: int = 0,
    mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    needs_lsb: torch.Tensor | None = None,
    fetched_values: torch.Tensor | None = None,
) -> dict[str, int]:
    """Bits of Q, K and V one attention call fetches, and the same rows at 16 bits, counted one way.

    q, k: (B, H, L, D) with one K/V head per query head. Rows counted, per head: Q over the real
    queries (``query_mask`` (B, Lq), default all), K and V over the keys visible to at least one real
    query (``mask`` broadcastable to (B, H, Lq, Lk), default all). Q at ``query_bits`` (None: at
    ``key_bits`` plus ``lsb_bits`` for the rows ``needs_lsb`` (B, H, Lq) marks). K at ``key_bits`` (the
    MSBs) plus ``key_overhead`` bits an element for the scales and zero-points, plus ``lsb_bits`` for
    all K rows of a head where any real row needed them (K is fetched once per head and call); the last
    ``key_residual`` key slots (not yet in a complete group) at 16 bits. V at ``value_bits`` +
    ``value_overhead`` (+ ``value_lsb_bits`` in the heads that fetched LSBs) over the rows
    ``fetched_values`` (B, H, Lk) marks (local value pruning), else every visible row; the last
    ``value_residual`` of them at 16 bits. Returns the
    ``runtime.summary.LayerStats`` field names.
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
    head_lsb = needs.any(dim=-1)  # (B, H): heads that fetched LSBs in this call
    values = key_rows if fetched_values is None else key_rows & fetched_values
    n_quant_slots = k.shape[2] - key_residual
    quant_rows, residual_rows = key_rows[..., :n_quant_slots], key_rows[..., n_quant_slots:]
    n_real, n_lsb, n_keys = int(real.sum()), int(needs.sum()), int(key_rows.sum())
    n_quant = int(quant_rows.sum())
    keys_with_lsb = int(quant_rows.sum(-1)[head_lsb].sum())
    if query_bits is None:
        query_fetched = (n_real * key_bits + n_lsb * lsb_bits) * head_dim
    else:
        query_fetched = n_real * query_bits * head_dim
    key_fetched = (n_quant * (key_bits + key_overhead) + keys_with_lsb * lsb_bits
                   + int(residual_rows.sum()) * 16) * head_dim
    n_vq = k.shape[2] - value_residual
    vq, v_res = values[..., :n_vq], values[..., n_vq:]
    values_with_lsb = int(vq.sum(-1)[head_lsb].sum())
    value_fetched = (int(vq.sum()) * (value_bits + value_overhead) + values_with_lsb * value_lsb_bits
                     + int(v_res.sum()) * 16) * head_dim
    return {
        "rows": n_real,
        "rows_needing_lsb": n_lsb,
        "query_bits_fetched": query_fetched,
        "query_bits_dense16": n_real * head_dim * 16,
        "key_bits_fetched": round(key_fetched),
        "key_bits_dense16": n_keys * head_dim * 16,
        "value_bits_fetched": round(value_fetched),
        "value_bits_dense16": n_keys * head_dim * 16,
    }

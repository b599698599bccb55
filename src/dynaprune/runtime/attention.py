"""The single attention entry point of every model.

Models call ``attention(q, k, v, ...)`` for every layer and ``ctx.between_layers(...)`` after every
block. With the default dense ``RunContext`` both are plain dense computation (SDPA) and the identity,
so models stay ignorant of pruning: pruning contexts subclass ``RunContext`` and override ``attend``
(ask for probabilities, drop heads, quantize) and ``between_layers`` (gather surviving tokens).

Every context counts the work it really did (``WorkCounter``): real query tokens and real
(query, key) pairs per layer, which ``runtime.cost`` turns into FLOPs and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynaprune.runtime.head_skipping import HeadPlan
from dynaprune.runtime.masks import SlidingWindow, build_mask, count_pairs, heads_key_mask, windowed_pairs
from dynaprune.runtime.work import WorkCounter, padded_pairs

__all__ = ["WorkCounter", "RunContext", "SlidingWindow", "attention", "build_mask", "count_pairs", "heads_key_mask",
           "padded_pairs", "windowed_pairs"]


@dataclass
class AttentionRecord:
    """What one attention call produced, kept only when the context asks for it."""

    layer: int
    probs: torch.Tensor | None = None  # (B, Hq, Lq, Lk) attention probabilities
    head_outputs: torch.Tensor | None = None  # (B, Hq, Lq, D) per-head outputs before o_proj


def expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each K/V group for its query heads (GQA), so k and v have q's head count."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    key_bias: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention through SDPA's fused kernels when no probabilities are needed (GQA without copying K/V).

    An all-real padding mask is dropped, so a causal prefill takes SDPA's mask-free causal kernel.
    ``key_bias`` (B, Lk): added to every query's logit of that key (a float mask, still the fused kernel)."""
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    lq, lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    key_padding_mask = heads_key_mask(key_padding_mask, q.shape[1])
    if causal and key_padding_mask is None and lq == lk and lq > 1 and key_bias is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # window: a sliding-window layer
    mask = build_mask(lq, lk, key_padding_mask, causal, q.device, window, heads=q.shape[1])
    if key_bias is not None:  # masked keys at -inf, the others at their bias
        bias = key_bias[:, None, None, :].to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def received_pairs(batch: int, heads: int, lq: int, lk: int, causal: bool, element_size: int,
                   block_bytes: int = 1 << 25) -> int:
    """(query, key, head) scores ``attention_with_received`` evaluates: whole query blocks against the
    keys their last query can see (the same blocking as that function)."""
    rows = max(1, block_bytes // max(1, batch * heads * lk * element_size))
    per_head = 0
    for q0 in range(0, lq, rows):
        q1 = min(lq, q0 + rows)
        per_head += (q1 - q0) * ((lk - (lq - q1)) if causal else lk)
    return batch * heads * per_head


def _foldable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, L, D) itself if matmul can treat it as (B H) matrices of rows of D contiguous
    numbers without a copy, else a contiguous copy."""
    B, H, L, D = t.shape
    if t.stride(3) == 1 and t.stride(2) == D and (B == 1 or H == 1 or t.stride(0) == H * t.stride(1)):
        return t
    return t.contiguous()


def attention_with_received(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    query_mask: torch.Tensor | None = None,
    block_bytes: int = 1 << 25,
    per_kv_head: bool = False,
    key_bias: torch.Tensor | None = None,
    window: int | None = None,
    batch_block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention that returns the outputs (B, Hq, Lq, D) and the attention each key received,
    summed over heads and real queries (B, Lk) fp32 — SpAtten's token importance of this call — without
    keeping the full (B, H, Lq, Lk) probabilities.

    Same numbers as ``probs = softmax(q k^T * scale)`` with masked keys at -inf, fully masked rows at 0,
    ``out = probs @ v`` and ``received = probs.sum(heads, real queries)`` (masked keys get 0). Queries
    are processed in blocks of about ``block_bytes`` of scores; a causal block only reads the keys its
    last query can see (half the work of a full score matrix). GQA: each K/V group serves its query
    heads through a reshape, never a copy of K/V. ``per_kv_head``: ``received`` is (B, Hkv, Lk), summed
    over the query heads of each KV group only. ``key_padding_mask`` may be (B, Hkv, Lk) (per-head cache).
    ``key_bias`` (B, Lk) is added to the logits of each key (proportional attention of merged tokens).

    Without a causal mask or a window, a large batch runs in chunks of batch rows whose score blocks
    stay in cache (about ``batch_block_bytes``, default ``BATCH_BLOCK_BYTES``; 0: one chunk), each with
    the query blocks of the whole batch, so every number is the one the whole batch gives
    (:func:`_batch_chunks`).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = max(1, block_bytes // max(1, B * Hq * Lk * q.element_size()))
    batch_block_bytes = BATCH_BLOCK_BYTES if batch_block_bytes is None else batch_block_bytes
    if not causal and window is None and batch_block_bytes > 0:
        chunk = max(2, batch_block_bytes // max(1, min(rows, Lq) * Hq * Lk * q.element_size()))
        if chunk < B:
            return _batch_chunks(q, k, v, scale, key_padding_mask, query_mask, rows, chunk, per_kv_head, key_bias)
    # once: a Q/K/V whose batch and head dims cannot fold into one would be copied by every block's
    # matmul. A KV cache's K/V (a slice of the length dim of its buffer) folds as it is: copying it
    # would move the whole cache at every decode step.
    q5, k, v = q.contiguous().view(B, Hkv, G, Lq, D), _foldable(k), _foldable(v)
    weight = torch.ones(B, Lq, dtype=q.dtype, device=q.device) if query_mask is None else query_mask.to(q.dtype)
    out = torch.empty(B, Hkv, G, Lq, D, dtype=q.dtype, device=q.device)
    received = torch.zeros(B, *((Hkv,) if per_kv_head else ()), Lk, dtype=torch.promote_types(q.dtype, torch.float32),
                           device=q.device)
    key_ok = None
    if key_padding_mask is not None:
        m = key_padding_mask.to(torch.bool)
        key_ok = m[:, :, None, None, :] if m.dim() == 3 else m[:, None, None, None, :]
    for q0 in range(0, Lq, rows):
        q1 = min(Lq, q0 + rows)
        n = q1 - q0
        end = Lk - (Lq - q1) if causal else Lk  # keys the block's last query can see
        scores = (q5[:, :, :, q0:q1].reshape(B, Hkv, G * n, D) @ k[:, :, :end].transpose(-1, -2))
        scores = scores.view(B, Hkv, G, n, end).mul_(scale)
        if key_bias is not None:
            scores += key_bias[:, None, None, None, :end].to(scores.dtype)
        ok = key_ok[..., :end] if key_ok is not None else None
        if causal and (n > 1 or isinstance(window, SlidingWindow)):  # query i sees keys up to i + (Lk - Lq)
            tri = torch.arange(end, device=q.device) <= torch.arange(q0, q1, device=q.device)[:, None] + (Lk - Lq)
            if isinstance(window, SlidingWindow):  # by original position (after token pruning)
                tri = tri & window.visible()[:, :, None, q0:q1, :end].to(q.device)
            elif window is not None:  # a sliding-window layer: no key older than window - 1 before the query
                tri &= torch.arange(end, device=q.device) > torch.arange(q0, q1, device=q.device)[:, None] + (
                    Lk - Lq - window)
            ok = tri if ok is None else ok & tri
        if ok is not None:
            scores.masked_fill_(~ok, float("-inf"))
        probs = scores.softmax(dim=-1)
        if ok is not None:
            dead = ~ok.any(dim=-1, keepdim=True)  # queries that see no key: rows of 0, not NaN
            if bool(dead.any()):
                probs.masked_fill_(dead, 0.0)
        out[:, :, :, q0:q1] = (probs.view(B, Hkv, G * n, end) @ v[:, :, :end]).view(B, Hkv, G, n, D)
        # column sums over heads and real queries as one batched GEMV: (B, 1, Hq n) @ (B, Hq n, end)
        if per_kv_head:  # over each KV group's query heads only: (B, Hkv, 1, G n) @ (B, Hkv, G n, end)
            w = weight[:, None, None, q0:q1].expand(B, Hkv, G, n).reshape(B, Hkv, 1, G * n)
            received[:, :, :end] += (w @ probs.view(B, Hkv, G * n, end)).squeeze(2).to(received.dtype)
        else:
            w = weight[:, None, None, q0:q1].expand(B, Hkv, G, n).reshape(B, 1, Hq * n)
            received[:, :end] += (w @ probs.view(B, Hq * n, end)).squeeze(1).to(received.dtype)
    if key_ok is not None:
        seen = key_ok[:, :, 0, 0]  # (B, Hkv or 1, Lk)
        received = received.masked_fill(~(seen if per_kv_head else seen.any(1)), 0.0)
    return out.view(B, Hq, Lq, D), received


# Score bytes of one chunk of batch rows in attention_with_received (a query block of each row): a
# few MB stay in cache across the block's passes (scale, bias, softmax, P V, column sums). Measured on
# MiniLM, 1 thread, batch 32 x 512 tokens: 0.97 s -> 0.61 s per call (SDPA without the sums: 0.31 s).
BATCH_BLOCK_BYTES = 1 << 21


def _batch_chunks(q, k, v, scale, key_padding_mask, query_mask, rows, chunk, per_kv_head, key_bias):
    """attention_with_received (non-causal, no window) on ``chunk`` batch rows at a time, each chunk with
    the batch's own query blocks of ``rows`` queries: every row's numbers are the ones the whole batch
    gives (the blocks, sums and their order are per row), only the working set shrinks. No chunk has a
    single row (matmul takes another kernel for a batch of one)."""
    B, Hq, _, _ = q.shape
    Lk, size = k.shape[2], q.element_size()
    bounds = list(range(0, B, chunk)) + [B]
    if bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    outs, received = [], []
    for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True):
        s = slice(b0, b1)
        o, r = attention_with_received(
            q[s], k[s], v[s], scale, None if key_padding_mask is None else key_padding_mask[s], False,
            None if query_mask is None else query_mask[s], rows * (b1 - b0) * Hq * Lk * size, per_kv_head,
            None if key_bias is None else key_bias[s], batch_block_bytes=0)
        outs.append(o)
        received.append(r)
    return torch.cat(outs), torch.cat(received)


@dataclass
class RunContext:
    """State of one forward/generate call. Dense by default.

    ``record_probs`` / ``record_head_outputs`` keep per-layer attention probabilities and per-head
    outputs in ``records`` (for inspection, plots and the pruning techniques).
    """

    record_probs: bool = False
    record_head_outputs: bool = False
    count_work: bool = True
    records: list[AttentionRecord] = field(default_factory=list)
    work: WorkCounter = field(default_factory=WorkCounter)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        scale: float | None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Dense attention. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D). Returns per-head outputs (B, Hq, Lq, D).
        ``window``: a causal query sees at most that many keys (sliding-window layers)."""
        if self.count_work:
            tokens, pairs = count_pairs(q.shape[2], k.shape[2], key_padding_mask, causal, q.shape[0], window)
            self.work.heads = q.shape[1]
            keys = int(key_padding_mask.sum()) if key_padding_mask is not None else k.shape[0] * k.shape[2]
            self.work.add(layer, tokens, pairs, q.shape[1], keys)
            causal_kernel = (not self.record_probs and causal and key_padding_mask is None and q.shape[2] == k.shape[2]
                             and window is None)
            self.work.add_computed(layer, q.shape[0] * q.shape[2], q.shape[1], k.shape[1],
                                   q.shape[1] * padded_pairs(q.shape[0], q.shape[2], k.shape[2], causal_kernel))
        lq, lk = q.shape[2], k.shape[2]
        if not self.record_probs and causal and key_padding_mask is None and lq == lk and lq > 1 and window is None:
            # plain prefill: SDPA's own causal kernel (no mask tensor) is much faster
            gqa = q.shape[1] != k.shape[1]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            self._record(layer, None, out)
            return out
        mask = build_mask(lq, lk, heads_key_mask(key_padding_mask, q.shape[1]), causal, q.device, window,
                      heads=q.shape[1])
        if not self.record_probs:
            # enable_gqa lets SDPA share each K/V group across its query heads without copying them.
            gqa = q.shape[1] != k.shape[1]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
            self._record(layer, None, out)
            return out
        k, v = expand_kv(q, k, v)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).nan_to_num(0.0)  # padding queries see no key: rows of 0, not NaN
        out = probs @ v
        self._record(layer, probs, out)
        return out

    def _record(self, layer: int, probs: torch.Tensor | None, head_outputs: torch.Tensor) -> None:
        if self.record_probs or self.record_head_outputs:
            self.records.append(
                AttentionRecord(
                    layer,
                    probs.detach() if self.record_probs and probs is not None else None,
                    head_outputs.detach() if self.record_head_outputs else None,
                )
            )

    def compact_cache(self, cache, layer: int, keep_index: torch.Tensor, keep_mask: torch.Tensor | None = None) -> None:
        """A model's own eviction from its KV cache (a sliding window's expired tokens): ``cache.compact``;
        a pruning context also keeps what it holds per cached token aligned."""
        cache.compact(layer, keep_index, keep_mask)

    def head_plan(self) -> HeadPlan | None:
        """The heads the next attention computes (models project only those), None = every head."""
        return None

    def count_lm_head(self, hidden: torch.Tensor, mask: torch.Tensor | None, last_only: bool) -> None:
        """Called by a decoder just before its LM head with the final hidden states (B, L, d) and their
        padding mask (True = real): the head runs on every position of the tensor, or on the last one of
        each row with ``last_only``."""
        if not self.count_work:
            return
        real, computed = self._lm_head_positions(hidden, mask, last_only)
        self.work.add_lm_head(real, computed, real)

    @staticmethod
    def _lm_head_positions(hidden: torch.Tensor, mask: torch.Tensor | None, last_only: bool) -> tuple[int, int]:
        """(real positions, positions computed) of one LM-head call."""
        if last_only:
            rows = hidden.shape[0]
            return (rows if mask is None else int(mask[:, -1].sum())), rows
        computed = hidden.shape[0] * hidden.shape[1]
        return (computed if mask is None else int(mask.sum())), computed

    def between_layers(
        self, layer: int, hidden: torch.Tensor, keep: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called after block ``layer`` with the hidden states (B, L, d) and the per-token tensors the
        model carries (padding mask, position ids, ...), all indexed by token on dim 1.

        The dense context returns them unchanged; a token-pruning context gathers the survivors.
        """
        return hidden, keep

    def begin_forward(self, cache) -> None:
        """Called by a decoder at the start of a forward with its KV cache (or None)."""

    def end_forward(self, cache) -> None:
        """Called by a decoder at the end of a forward: where a KV-budget context evicts tokens."""

    def final_states(
        self, hidden: torch.Tensor, keep: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by an encoder after its last block: the states to pool and their mask.

        Dense: the last hidden states as they are. A token-pruning context may put back the states
        pruned tokens had when they left, so pooling over all tokens stays possible.
        """
        return hidden, keep["mask"]


class _Dense(RunContext):
    """The shared default context: dense and stateless (counts nothing, records nothing)."""

    def __init__(self) -> None:
        super().__init__(count_work=False)


DENSE = _Dense()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int,
    ctx: RunContext | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Multi-head (grouped-query) attention.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv (GQA repeats K/V groups).
    key_padding_mask: (B, Lk) bool, True for real tokens. ``causal`` aligns the last query with the
    last key (so it also serves decode steps over a KV cache). Returns per-head outputs (B, Hq, Lq, D).
    ``window`` (causal only): each query sees at most its ``window`` latest keys, itself included (Gemma 3's
    sliding-window layers); passed on only when some query has more keys than that.
    """
    if window is not None and causal and (k.shape[2] > window or isinstance(window, SlidingWindow)):
        return (ctx or DENSE).attend(layer, q, k, v, key_padding_mask, causal, scale, window=window)
    return (ctx or DENSE).attend(layer, q, k, v, key_padding_mask, causal, scale)

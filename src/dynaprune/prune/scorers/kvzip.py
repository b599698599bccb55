"""``score=kvzip``: KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", Sec. 3.2): after the prompt's prefill the model is run once more on a repeat of the
context (``PROMPT`` + ``SUFFIX`` + the context tokens), attending to the cached context K/V. A cached key's
importance in one KV head is the largest attention probability any reconstruction query of the head's
group gave it (max over queries and over the GQA group's query heads, Eq. 2). The repeat's K/V are
dropped afterwards; only the scores stay. KVzip keeps the first ``SINKS`` tokens whatever they score and
no recent window (its defaults here); with ``kv_alloc=global`` one threshold runs over every layer and
KV head (the paper's non-uniform budget), with ``kv_alloc=head`` each head keeps the same count.

Cost: one extra forward of ~the context's length (``reconstruction_tokens``) whose queries attend to the
context and the repeat so far, plus the probabilities of those rows (computed in query blocks beside the
fused kernel). ``KVBudgetStage`` runs it at the end of the prompt's forward when the caller gave the
prompt ids (``ctx.reconstruction = (model, ids)``); a context without them refuses ``score=kvzip``.
A KV-eviction method: it needs ``kv`` and cannot drive ``token``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.scorers.base import ScoreState, TokenScorer
from dynaprune.runtime.attention import RunContext

PROMPT = "\n\nRepeat the previous context exactly."  # KVzip's (kvpress's) first-chunk instruction
SUFFIX = "\n"  # kvpress's suffix for a model run without a chat template
SINKS = 4  # kvpress KVzipPress n_sink
QUERY_BLOCK = 256  # reconstruction queries whose probabilities are materialised at once


def max_attention(q: torch.Tensor, k: torch.Tensor, scale: float, n_context: int) -> torch.Tensor:
    """(B, Hkv, n_context): per KV head, the largest causal attention probability any query (of any head
    of its group) gives each of the first ``n_context`` keys. q (B, Hq, Lq, D) are the last Lq of the Lk
    keys of k (B, Hkv, Lk, D)."""
    b, hq, lq, _ = q.shape
    n_kv, lk = k.shape[1], k.shape[2]
    group = hq // n_kv
    out = torch.zeros(b, n_kv, n_context, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, Lk)
    for start in range(0, lq, QUERY_BLOCK):
        block = q[:, :, start : start + QUERY_BLOCK].float().view(b, n_kv, group, -1, q.shape[-1])
        scores = (block @ kt) * scale  # (B, Hkv, G, lb, Lk)
        rows = torch.arange(start, start + block.shape[3], device=q.device) + (lk - lq)  # each query's own key
        future = torch.arange(lk, device=q.device)[None, :] > rows[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        out = torch.maximum(out, probs[..., :n_context].amax(dim=(2, 3)))
    return out


class ReconstructionContext(RunContext):
    """Dense attention (the model's own output is unchanged) that records, per layer, the reconstruction
    queries' max attention to the ``n_context`` cached context keys."""

    def __init__(self, n_context: int) -> None:
        super().__init__()
        self.n_context = n_context
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        if key_padding_mask is not None or window is not None:
            raise DynapruneError("score=kvzip reconstructs unpadded, full-attention contexts only")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        self.scores[layer] = max_attention(q, k, scale, self.n_context)
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window)


def repeat_ids(model, context_ids: torch.Tensor) -> torch.Tensor:
    """(B, Lr): ``PROMPT`` + ``SUFFIX`` + the context (the prompt alone when the model has no tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return context_ids
    extra = tokenizer(PROMPT + SUFFIX, add_special_tokens=False).input_ids
    head = torch.tensor(extra, dtype=context_ids.dtype, device=context_ids.device)
    return torch.cat([head[None].expand(context_ids.shape[0], -1), context_ids], dim=1)


def scratch_cache(model, cache, extra: int):
    """A copy of the (unevicted, unpacked) prompt cache with room for ``extra`` more tokens."""
    n = cache.lengths[0]
    if (
        any(length != n for length in cache.lengths)
        or any(p is not None for p in cache.packed)
        or any(h is not None for h in cache.head_positions)
    ):
        raise DynapruneError("score=kvzip reconstructs the prompt's full cache (before eviction or packing)")
    out = model.new_cache(cache.batch, n + extra)
    for layer in range(cache.n_layers):
        out.k[layer][:, :, :n] = cache.k[layer][:, :, :n]
        out.v[layer][:, :, :n] = cache.v[layer][:, :, :n]
        out.positions[layer][:, :n] = cache.positions[layer][:, :n]
        out.valid[layer][:, :n] = cache.valid[layer][:, :n]
        out.lengths[layer] = n
        out.appended[layer] = n
    out.next_position.copy_(cache.next_position)
    return out


def reconstruct(model, context_ids: torch.Tensor, cache) -> dict[int, torch.Tensor]:
    """KVzip's scores (B, Hkv, Lc) per layer of the cached context (``cache`` is left as it was)."""
    if any(cache.has_padding):
        raise DynapruneError("score=kvzip reconstructs unpadded contexts only (batch rows of one length)")
    n = cache.lengths[0]
    if context_ids.shape[-1] != n:
        raise DynapruneError(f"score=kvzip: {context_ids.shape[-1]} prompt ids for a cache of {n} tokens")
    ids = repeat_ids(model, context_ids)
    ctx = ReconstructionContext(n)
    with torch.inference_mode():
        model(ids, cache=scratch_cache(model, cache, ids.shape[1]), ctx=ctx, last_only=True)
    return ctx.scores


def reconstruction_flops(shape, n_context: int, n_repeat: int) -> int:
    """FLOPs of the reconstruction pass (per sequence): every layer's projections and MLP on ``n_repeat``
    tokens, QK^T and PV over the context and the repeat so far, and the score rows' extra QK^T (no LM head:
    only the last position's, negligible). ``shape``: ``runtime.cost.CostShape``."""
    linear = sum(
        2 * shape.hidden * shape.head_dim * (2 * shape.heads_of(layer) + 2 * shape.kv_heads)
        + 2 * shape.ffn_matrices * shape.hidden * shape.ffn
        for layer in range(shape.layers)
    )
    pairs = n_repeat * n_context + n_repeat * (n_repeat + 1) // 2
    attention = sum(6 * shape.heads_of(layer) * shape.head_dim * pairs for layer in range(shape.layers))
    return linear * n_repeat + attention


@dataclass(frozen=True)
class KVzipScore(TokenScorer):
    name = "kvzip"
    eviction_only = True
    uses_attention = False  # its own reconstruction pass; the prompt runs in the fused kernel
    reconstructs = True

    def reconstruct(self, state: ScoreState, model, context_ids: torch.Tensor, cache) -> int:
        """Fill ``state`` with the reconstruction scores; returns the reconstruction's token count."""
        state.by_layer.update(reconstruct(model, context_ids, cache))
        return repeat_ids(model, context_ids[:, :1]).shape[1] - 1 + context_ids.shape[1]

    def reconstruction_flops(self, shape, n_context: int, n_repeat: int) -> int:
        return reconstruction_flops(shape, n_context, n_repeat)

    def kv_scores(self, state, layer, positions, generator):
        """The reconstruction scores; tokens cached after the prompt (decode steps, a stream) were never
        reconstructed: they get their head's mean score (stored, so the state stays aligned)."""
        scores = state.by_layer[layer]
        extra = positions.shape[-1] - scores.shape[-1]
        if extra > 0:
            fill = scores.mean(-1, keepdim=True).expand(*scores.shape[:-1], extra)
            state.by_layer[layer] = scores = torch.cat([scores, fill], -1)
        return scores

    def default_sink(self, budget: int) -> int:
        return min(SINKS, budget)

    def default_recent(self, budget: int, sink: int) -> int:
        return 0

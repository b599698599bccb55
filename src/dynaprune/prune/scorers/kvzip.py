"""``score=kvzip``: KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", Sec. 3.2): after the prompt's prefill the model is run once more on a repeat of the
context (an instruction + the context tokens, ``runtime/reconstruction.py``), attending to the cached
context K/V. A cached key's importance in one KV head is the largest attention probability any
reconstruction query of the head's group gave it (max over queries and over the GQA group's query heads,
Eq. 2). The repeat's K/V are dropped afterwards; only the scores stay. KVzip keeps the first ``SINKS``
tokens whatever they score and no recent window (its defaults here); with ``kv_alloc=global`` one
threshold runs over every layer and KV head (the paper's non-uniform budget), with ``kv_alloc=head`` each
head keeps the same count.

Cost: one extra forward of ~the context's length (``reconstruction_tokens``) whose queries attend to the
context and the repeat so far, plus the probabilities of those rows (computed in query blocks beside the
fused kernel). The pass runs the model, so it lives in ``runtime/reconstruction.py``: the caller hands it
over (``ctx.reconstruction = Reconstruction(model, ids)``) and ``KVBudgetStage`` runs it at the end of the
prompt's forward; a context without it refuses ``score=kvzip``.
A KV-eviction method: it needs ``kv`` and cannot drive ``token``.

Sliding-window layers (Gemma 3): the pass respects the window as the model does, a reconstruction query
at position p sees only keys at positions in (p - window, p]. Such a layer's cache holds the context's
last ``window - 1`` tokens, and only the first ``window - 1`` repeat queries see any of them, exactly as
only the first ``window - 1`` tokens after the context will: each key's score is the attention it gets
from the queries that can still reach it (docs/architecture.md, "KV budgets on sliding-window layers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer

SINKS = 4  # kvpress KVzipPress n_sink
QUERY_BLOCK = 256  # reconstruction queries whose probabilities are materialised at once


def max_attention(q: torch.Tensor, k: torch.Tensor, scale: float, n_context: int,
                  window: int | None = None) -> torch.Tensor:
    """(B, Hkv, n_context): per KV head, the largest causal attention probability any query (of any head
    of its group) gives each of the first ``n_context`` keys. q (B, Hq, Lq, D) are the last Lq of the Lk
    keys of k (B, Hkv, Lk, D), in consecutive positions. ``window``: a query sees at most its ``window``
    latest keys, itself included (a sliding-window layer); queries that see no context key are skipped."""
    b, hq, lq, _ = q.shape
    n_kv, lk = k.shape[1], k.shape[2]
    group = hq // n_kv
    out = torch.zeros(b, n_kv, n_context, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, Lk)
    keys = torch.arange(lk, device=q.device)
    for start in range(0, lq, QUERY_BLOCK):
        first_row = start + lk - lq
        if window is not None and first_row - window + 1 >= n_context:
            break  # this block's queries (and every later one) see no context key
        block = q[:, :, start : start + QUERY_BLOCK].float().view(b, n_kv, group, -1, q.shape[-1])
        scores = (block @ kt) * scale  # (B, Hkv, G, lb, Lk)
        rows = torch.arange(block.shape[3], device=q.device) + first_row  # each query's own key
        hidden = keys[None, :] > rows[:, None]
        if window is not None:
            hidden |= keys[None, :] <= rows[:, None] - window
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out = torch.maximum(out, probs[..., :n_context].amax(dim=(2, 3)))
    return out


def reconstruction_flops(shape, n_context: int, n_repeat: int) -> int:
    """FLOPs of the reconstruction pass (per sequence): every layer's projections and MLP on ``n_repeat``
    tokens, QK^T and PV over the context and the repeat so far, and the score rows' extra QK^T (no LM head:
    only the last position's, negligible). A sliding-window layer (``shape.window_of``) holds the context's
    last ``window - 1`` tokens and each query attends at most ``window`` keys. ``shape``:
    ``runtime.cost.CostShape``; ``n_context``: the context's length (what a full-attention layer holds)."""
    linear = sum(
        2 * shape.hidden * shape.head_dim * (2 * shape.heads_of(layer) + 2 * shape.kv_heads)
        + 2 * shape.ffn_matrices * shape.hidden * shape.ffn
        for layer in range(shape.layers)
    )
    attention = 0
    for layer in range(shape.layers):
        window = shape.window_of(layer)
        if window is None:
            pairs = n_repeat * n_context + n_repeat * (n_repeat + 1) // 2
        else:
            held = min(n_context, window - 1)
            pairs = sum(min(held + i + 1, window) for i in range(n_repeat))  # query i: held + i + 1 keys
        attention += 6 * shape.heads_of(layer) * shape.head_dim * pairs
    return linear * n_repeat + attention


@dataclass(frozen=True)
class KVzipScore(TokenScorer):
    name = "kvzip"
    eviction_only = True
    uses_attention = False  # its own reconstruction pass; the prompt runs in the fused kernel
    reconstructs = True

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

    def compact_state(self, state, layer, index) -> None:
        """As every scorer's, after extending the layer's scores to the slots the compaction indexes: a
        model's own eviction (a sliding window, after a decode forward) also moves tokens cached after the
        prompt, which have no score yet (they get their head's mean, as in ``kv_scores``)."""
        scores = state.by_layer.get(layer)
        if scores is not None and index.numel() and int(index.max()) >= scores.shape[-1]:
            extra = int(index.max()) + 1 - scores.shape[-1]
            state.by_layer[layer] = torch.cat([scores, scores.mean(-1, keepdim=True).expand(
                *scores.shape[:-1], extra)], -1)
        super().compact_state(state, layer, index)

    def default_sink(self, budget: int) -> int:
        return min(SINKS, budget)

    def default_recent(self, budget: int, sink: int) -> int:
        return 0

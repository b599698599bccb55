"""``score=snapkv``: SnapKV (Li et al. 2024, Sec. 4.2): the attention the last ``WINDOW`` queries of a
forward give every key, per KV head (summed over the group's query heads), max-pooled over ``KERNEL``
neighbouring tokens so that a token next to an important one stays with it. Only the window's rows of
probabilities are computed (``prune/window.py``), next to SDPA's fused kernel. Decode steps add their own
window (their last query) to the tokens' scores. The window itself is protected: ``recent`` defaults to
``WINDOW`` (at most the budget). A KV-eviction method: it needs ``kv`` and cannot drive ``token``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer, add_received
from dynaprune.prune.window import pool_scores, window_attention

WINDOW = 32  # the SnapKV paper's observation window
KERNEL = 7  # the SnapKV paper's pooling kernel


def window_scores(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float,
                  window: int, kernel: int) -> torch.Tensor:
    """(B, Hkv, Lk): the last ``window`` queries' attention per KV head, max-pooled over ``kernel``."""
    b, hq, lq, _ = q.shape
    n_kv = k.shape[1]
    probs = window_attention(q, k, min(window, lq), scale=scale, key_padding_mask=key_padding_mask)
    per_kv = probs.view(b, n_kv, hq // n_kv, -1).sum(2)
    return pool_scores(per_kv, kernel)


@dataclass(frozen=True)
class SnapKVScore(TokenScorer):
    name = "snapkv"
    eviction_only = True
    observes = True
    uses_attention = False  # its own window rows; the attention itself runs in the fused kernel

    def observe(self, state, layer, q, k, key_padding_mask, scale) -> None:
        state.by_layer[layer] = add_received(state.by_layer.get(layer),
                                              window_scores(q, k, key_padding_mask, scale, WINDOW, KERNEL))

    def default_recent(self, budget: int, sink: int) -> int:
        return min(WINDOW, budget - sink)

"""``score=observed``: observed attention normalised by how many queries could see each key (kvpress's
ObservedAttentionPress): the attention a cached key received, summed over queries (and decode steps),
divided by the number of real queries that could attend to it. A causal key at position i of a prompt
of L tokens is seen by L - i queries, so the plain sum (``score=h2o``) favours early tokens; the mean
does not. Per KV head under ``kv_alloc=head|ada`` (summed over the group's query heads), per layer
otherwise. A KV-eviction method: it needs ``kv`` and cannot drive ``token``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer, add_aligned, add_received


def queries_seeing_keys(lq: int, lk: int, key_padding_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B, Lk) float: the real queries of a causal call (the last ``lq`` of ``lk`` keys are the queries'
    own tokens) that can attend to each key. Query i sees key j when j <= i + (lk - lq)."""
    if key_padding_mask is None:
        real = torch.ones(batch, lq)
    else:
        mask = key_padding_mask if key_padding_mask.dim() == 2 else key_padding_mask[:, 0]
        real = mask[:, lk - lq:].float().cpu()
    at_or_after = real.flip(-1).cumsum(-1).flip(-1)  # [b, i]: real queries at index i or later
    first_query = (torch.arange(lk) - (lk - lq)).clamp(min=0)
    return at_or_after[:, first_query]


@dataclass(frozen=True)
class ObservedScore(TokenScorer):
    name = "observed"
    eviction_only = True
    observes = True

    def observe(self, state, layer, q, k, key_padding_mask, scale) -> None:
        seen = queries_seeing_keys(q.shape[2], k.shape[2], key_padding_mask, q.shape[0]).to(q.device)
        state.seen[layer] = add_aligned(state.seen.get(layer), seen)

    def track(self, state, layer, received, cache) -> None:
        state.by_layer[layer] = add_received(state.by_layer.get(layer), received)

    def kv_scores(self, state, layer, positions, generator):
        total, seen = state.by_layer[layer], state.seen[layer].clamp(min=1.0)
        if seen.dim() < total.dim():
            seen = seen[:, None]
        elif seen.dim() > total.dim():
            total = total[:, None]
        return total / seen

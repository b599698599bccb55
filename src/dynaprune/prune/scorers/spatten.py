"""``score=spatten`` (the default): SpAtten's cumulative token importance (Wang et al. HPCA 2021,
Sec. III-A, Algorithm 2): the attention a token receives, summed over heads, queries, layers and, in
generation, decode steps. Under a KV budget one score per token (by position) is shared by all layers,
so a token evicted from one layer's cache ranks the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer


@dataclass(frozen=True)
class SpAttenScore(TokenScorer):
    name = "spatten"
    by_position = True

    def track(self, state, layer, received, cache) -> None:
        positions = cache.cached_positions(layer)
        size = int(positions.max()) + 1
        if state.by_position is None:
            state.by_position = torch.zeros(received.shape[0], size, dtype=received.dtype)
        elif state.by_position.shape[1] < size:
            state.by_position = torch.nn.functional.pad(state.by_position, (0, size - state.by_position.shape[1]))
        state.by_position.scatter_add_(1, positions.cpu(), received.cpu())

    def kv_scores(self, state, layer, positions, generator):
        return state.by_position.to(positions.device).gather(1, positions)

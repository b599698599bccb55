"""``score=h2o``: Heavy-Hitter Oracle (Zhang et al. 2023, Sec. 3-4): the attention a cached token
receives, accumulated over decode steps per layer (no cascade across layers); heavy hitters plus the
recent window stay. A KV-eviction method: it needs ``kv`` and cannot drive ``token``."""

from __future__ import annotations

from dataclasses import dataclass

from dynaprune.prune.scorers.base import TokenScorer, add_received


@dataclass(frozen=True)
class H2OScore(TokenScorer):
    name = "h2o"
    eviction_only = True

    def track(self, state, layer, received, cache) -> None:
        state.by_layer[layer] = add_received(state.by_layer.get(layer), received)

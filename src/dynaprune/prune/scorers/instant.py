"""``score=instant``: PoWER-BERT style significance (Goyal et al. 2020, Sec. 3): the attention a token
receives in one layer only (the current layer for the cascade; the latest call of the layer for the KV
budget), no accumulation."""

from __future__ import annotations

from dataclasses import dataclass

from dynaprune.prune.scorers.base import TokenScorer, add_received


@dataclass(frozen=True)
class InstantScore(TokenScorer):
    name = "instant"

    def accumulate(self, cumulative, received):
        return add_received(None, received)

    def track(self, state, layer, received, cache) -> None:
        state.by_layer[layer] = add_received(None, received)

"""``score=tova``: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs",
Sec. 4): at every step a layer keeps the tokens the LAST query attends to most, averaged over heads
(here summed: the same ranking), and drops the rest; no accumulation over steps or layers, no sinks.
A KV-eviction method: it needs ``kv`` and cannot drive ``token``. Protected by default: the newest token
only (``sink=0``, ``recent=1``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer, add_received


@dataclass(frozen=True)
class TOVAScore(TokenScorer):
    name = "tova"
    eviction_only = True

    def query_weights(self, query_mask, batch, lq):
        last = torch.zeros(batch, lq, dtype=torch.bool)
        last[:, -1] = True
        return last

    def track(self, state, layer, received, cache) -> None:
        state.by_layer[layer] = add_received(None, received)

    def default_sink(self, budget: int) -> int:
        return 0

    def default_recent(self, budget: int, sink: int) -> int:
        return 1

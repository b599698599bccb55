"""``score=streaming``: StreamingLLM (Xiao et al. 2023, Sec. 3): attention sinks (the first tokens) and
a window of the most recent tokens, no scores at all; by default the window is the rest of the budget.
A KV-eviction method: it needs ``kv`` and cannot drive ``token``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer


@dataclass(frozen=True)
class StreamingScore(TokenScorer):
    name = "streaming"
    uses_attention = False
    eviction_only = True

    def kv_scores(self, state, layer, positions, generator):
        return torch.zeros(positions.shape, device=positions.device)  # only sinks and the recent window

    def default_recent(self, budget: int, sink: int) -> int:
        return budget - sink

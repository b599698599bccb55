"""``score=random``: tokens kept uniformly at random among the unprotected ones: the floor any scorer
should beat (for the cascade and for the KV budget alike)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune.scorers.base import TokenScorer


@dataclass(frozen=True)
class RandomScore(TokenScorer):
    name = "random"
    uses_attention = False

    def kv_scores(self, state, layer, positions, generator):
        return torch.rand(positions.shape, generator=generator).to(positions.device)

"""Token scorers (``score=NAME``): attention received -> token importance, for the cascade token pruner
(``token=``) and the KV budget (``kv=``). One file per scorer; ``prune/registry.py`` lists them.

A scorer is a frozen dataclass without knobs (its recipe key is ``score``, its value the scorer's
``name``). ``received`` below is the attention each key got in one attention call, summed over the alive
heads and the weighted queries (``query_weights``; default the real queries): (B, Lk) float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.technique import Technique
from dynaprune.prune.tokens import accumulate_token_importance

SCORE_KEY = K.Key("score", K.parse_word, None, default="spatten")


@dataclass
class ScoreState:
    """A scorer's importance of the cached tokens in one run: one score per position (over layers) or
    one per layer aligned with that layer's cache (the KV budget gathers it at each compaction)."""

    by_position: torch.Tensor | None = None  # (B, P)
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)


def add_received(cumulative: torch.Tensor | None, received: torch.Tensor) -> torch.Tensor:
    """``cumulative`` + ``received`` (B, Lk); a shorter ``cumulative`` (new decode keys) is zero-extended."""
    return accumulate_token_importance(cumulative, received[:, None, None, :])


@dataclass(frozen=True)
class TokenScorer(Technique):
    """Base of the scorers; subclasses set ``name`` and override what they change."""

    name: ClassVar[str] = ""
    role = "scorer"
    keys = (SCORE_KEY,)
    uses_attention: ClassVar[bool] = True  # needs the attention received (else no probabilities at all)
    eviction_only: ClassVar[bool] = False  # a KV-eviction method: needs kv, cannot drive the cascade

    @property
    def score(self) -> str:
        return self.name

    def key_values(self) -> dict[str, Any]:
        return {"score": self.name}

    def check_with(self, recipe: Any) -> None:
        if self.eviction_only:
            if not recipe.has_kv_budget:
                raise K.err("score", f"score={self.name} is a KV-cache eviction method; it needs kv or kv_tokens")
            if recipe.prunes_tokens:
                raise K.err("score", f"score={self.name} has no cascade; it cannot drive token/token_schedule")
        elif not (recipe.prunes_tokens or recipe.has_kv_budget):
            raise K.err("score", f"score={self.name} ranks tokens; it needs token, token_schedule, kv or kv_tokens")

    # cascade token pruning
    def accumulate(self, cumulative: torch.Tensor | None, received: torch.Tensor) -> torch.Tensor:
        """The token importance after one more layer (default: summed over layers, SpAtten's)."""
        return add_received(cumulative, received)

    # KV budget
    def new_state(self) -> ScoreState:
        return ScoreState()

    def query_weights(self, query_mask: torch.Tensor | None, batch: int, lq: int) -> torch.Tensor | None:
        return None

    def track(self, state: ScoreState, layer: int, received: torch.Tensor, cache: Any) -> None:
        """Fold one call's ``received`` into the importance of the cached tokens."""

    def kv_scores(self, state: ScoreState, layer: int, positions: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """(B, Lc) scores of the cached tokens of ``layer`` (``positions``: their original positions)."""
        return state.by_layer[layer]

    def default_sink(self, budget: int) -> int:
        return min(4, budget // 4)

    def default_recent(self, budget: int, sink: int) -> int:
        """The newest tokens have had no time to gather importance: a quarter of the budget."""
        return max(1, budget // 4)

"""Token scorers (``score=NAME``): attention received -> token importance, for the cascade token pruner
(``token=``) and the KV budget (``kv=``). One file per scorer; ``prune/registry.py`` lists them.

A scorer is a frozen dataclass without knobs (its recipe key is ``score``, its value the scorer's
``name``). ``received`` below is the attention each key got in one attention call, summed over the alive
heads and the weighted queries (``query_weights``; default the real queries): (B, Lk) float32, or per
KV head (B, Hkv, Lk) when the KV budget ranks each KV head's tokens (``kv_alloc=head|ada``). A scorer
may also read q / k of every call (``observe``: an observation window next to the fused kernel).
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
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, Lc) or per KV head (B, Hkv, Lc)
    seen: dict[int, torch.Tensor] = field(default_factory=dict)  # queries that saw each cached key, aligned too


def add_received(cumulative: torch.Tensor | None, received: torch.Tensor) -> torch.Tensor:
    """``cumulative`` + ``received`` (B, Lk) or (B, Hkv, Lk); a shorter ``cumulative`` (new decode keys) is
    zero-extended."""
    if received.dim() == 3:
        received = received.float()
        if cumulative is None:
            return received
        if cumulative.dim() == 2:  # a per-layer history shared by every KV head
            cumulative = cumulative[:, None].expand(-1, received.shape[1], -1)
        return torch.nn.functional.pad(cumulative, (0, received.shape[-1] - cumulative.shape[-1])) + received
    return accumulate_token_importance(cumulative, received[:, None, None, :])


def add_aligned(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``old`` + ``new`` along the cache axis (last dim), ``old`` zero-extended for new keys; a (B, L) and
    a (B, Hkv, L) operand broadcast over the heads."""
    if old is None:
        return new
    old = torch.nn.functional.pad(old, (0, new.shape[-1] - old.shape[-1]))
    if old.dim() > new.dim():
        new = new[:, None]
    elif new.dim() > old.dim():
        old = old[:, None]
    return old + new


def gather_scores(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of ``scores`` (B, L) or (B, Hkv, L) at a compaction's ``index`` (B, Lkeep) or
    (B, Hkv, Lkeep): a per-layer score follows a per-head index head by head and vice versa."""
    if scores.dim() == 2 and index.dim() == 3:
        scores = scores[:, None].expand(-1, index.shape[1], -1)
    elif scores.dim() == 3 and index.dim() == 2:
        index = index[:, None].expand(-1, scores.shape[1], -1)
    return scores.gather(-1, index.to(scores.device))



@dataclass(frozen=True)
class TokenScorer(Technique):
    """Base of the scorers; subclasses set ``name`` and override what they change."""

    name: ClassVar[str] = ""
    role = "scorer"
    keys = (SCORE_KEY,)
    uses_attention: ClassVar[bool] = True  # needs the attention received (else no probabilities at all)
    eviction_only: ClassVar[bool] = False  # a KV-eviction method: needs kv, cannot drive the cascade
    observes: ClassVar[bool] = False  # reads q / k of every call (``observe``)
    by_position: ClassVar[bool] = False  # one score per position shared by all layers: no per-head ranking

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

    def observe(self, state: ScoreState, layer: int, q: torch.Tensor, k: torch.Tensor,
                key_padding_mask: torch.Tensor | None, scale: float) -> None:
        """q (B, Hq, Lq, D), k (B, Hkv, Lk, D) of one call of ``layer`` (only when ``observes``)."""

    def compact_state(self, state: ScoreState, layer: int, index: torch.Tensor) -> None:
        """Keep the state of ``layer`` aligned with its cache after a compaction at ``index``."""
        for aligned in (state.by_layer, state.seen):
            if layer in aligned:
                aligned[layer] = gather_scores(aligned[layer], index)

    def kv_scores(self, state: ScoreState, layer: int, positions: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """(B, Lc) or per KV head (B, Hkv, Lc) scores of the cached tokens of ``layer`` (``positions``:
        their original positions)."""
        return state.by_layer[layer]

    def default_sink(self, budget: int) -> int:
        return min(4, budget // 4)

    def default_recent(self, budget: int, sink: int) -> int:
        """The newest tokens have had no time to gather importance: a quarter of the budget."""
        return max(1, budget // 4)

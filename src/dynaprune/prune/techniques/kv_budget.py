"""Decode-time KV budget: ``kv=F`` or ``kv_tokens=N``, ``sink=N``, ``recent=N`` (SpAtten Sec. III-A
applied to the KV cache of generation, as the official SpAtten-LLM code does; StreamingLLM / H2O style).

After every decoder forward each layer's cache is compacted to the budget: the first ``sink`` and the
last ``recent`` cached tokens are protected, the rest ranked by the token scorer (``score=``). ``kv`` is
the share of the prompt kept, in (0, 1] (``kv=1`` keeps every token), ``kv_tokens`` a count of tokens;
one or the other. The budget acts between forwards of a KV cache, so it changes nothing on an encoder
or a single prefill (``prune/recipe_scope.py`` refuses it there). A budget of at least 64 tokens evicts
in chunks (down to budget - budget / 16) so the compaction copy runs once per budget / 16 steps.
Cost: fewer keys read per decode step (the work counter counts the keys attended beside those a dense
cache would hold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.technique import Stage, Technique
from dynaprune.prune.tokens import edge_token_mask, gather_tokens, select_tokens_to_keep

# A KV budget of at least CHUNKED_EVICTION_MIN_BUDGET tokens evicts down to (1 - slack) x budget when a
# layer goes over it (``run.evict_slack``, 1/16 by default): one compaction (a copy of the layer's cache)
# per budget x slack decode steps. Smaller budgets, where the copy is cheap, evict one token per step.
CHUNKED_EVICTION_MIN_BUDGET = 64


def check_kv(key: str, value: Any) -> float:
    """``kv`` is a share of the prompt in (0, 1]; a count of tokens is ``kv_tokens`` (``kv=1`` used to mean
    one token while ``token=1`` keeps everything: the share is now the only reading of ``kv``)."""
    value = K.as_float(key, value)
    if 0.0 < value <= 1.0:
        return value
    hint = f"; for a count of tokens write kv_tokens={int(value)}" if value > 1 and value.is_integer() else ""
    raise K.err(key, f"{K.fmt_float(value)} is outside (0, 1]: kv is the share of the prompt kept, e.g. kv=0.25{hint}")


@dataclass(frozen=True)
class KVBudget(Technique):
    """``kv``: share of the prompt each layer's cache keeps, or ``kv_tokens``: a count; ``sink`` /
    ``recent``: tokens protected at the start / end."""

    kv: float | None = None
    kv_tokens: int | None = None
    sink: int | None = None
    recent: int | None = None

    role = "kv"
    keys = (
        K.Key("kv", K.parse_float, check_kv),
        K.Key("kv_tokens", K.parse_int, K.at_least(1, integer=True)),
        K.Key("sink", K.parse_int, K.at_least(0, integer=True)),
        K.Key("recent", K.parse_int, K.at_least(0, integer=True)),
    )
    exports = ("kv_budget_tokens", "has_kv_budget")

    @property
    def has_kv_budget(self) -> bool:
        """A decode-time KV budget is set (``kv`` or ``kv_tokens``)."""
        return self.kv is not None or self.kv_tokens is not None

    def check(self) -> None:
        for name in ("sink", "recent"):
            if getattr(self, name) is not None and not self.has_kv_budget:
                raise K.err(name, f"{name} protects tokens inside the decode-time KV budget; it needs kv or kv_tokens")
        if self.kv is not None and self.kv_tokens is not None:
            raise K.err("kv_tokens", "set either kv (a share of the prompt) or kv_tokens (a count), not both")
        if self.kv_tokens is not None:
            self._check_protected_fit(self.kv_tokens)

    def _check_protected_fit(self, budget: int) -> None:
        protected = (self.sink or 0) + (self.recent or 0)
        if protected > budget:
            raise K.err("sink + recent", f"{protected} protected tokens exceed the kv budget of {budget} tokens")

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        if context_len is not None:
            self.kv_budget_tokens(context_len)

    def kv_budget_tokens(self, context_len: int) -> int | None:
        """The decode-time KV budget in tokens for a prompt of ``context_len`` tokens (None: no budget)."""
        if not self.has_kv_budget:
            return None
        if self.kv_tokens is not None:
            if self.kv_tokens > context_len:
                raise K.err("kv_tokens", f"{self.kv_tokens} tokens is larger than the context of {context_len} tokens")
            budget = self.kv_tokens
        else:
            budget = K.keep_count(self.kv, context_len)
        self._check_protected_fit(budget)
        return budget

    def protected(self, budget: int, scorer: Any) -> tuple[int, int]:
        """(sink, recent) tokens protected inside a budget: as set, else the scorer's defaults."""
        sink = self.sink if self.sink is not None else scorer.default_sink(budget)
        recent = self.recent if self.recent is not None else scorer.default_recent(budget, sink)
        return sink, min(recent, budget - sink)

    def stage(self, run) -> Stage | None:
        return KVBudgetStage(self, run) if self.has_kv_budget else None


class KVBudgetStage(Stage):
    name = "kv"

    def __init__(self, technique: KVBudget, run) -> None:
        super().__init__(technique, run)
        self.kv_budget: int | None = None  # a caller may set it before the first forward (lm stream)
        self.scores = run.scorer.new_state()  # the scorer's importance of the cached tokens

    def needs_received(self, layer: int) -> bool:
        return self.run.cache is not None and self.run.scorer.uses_attention

    def query_weights(self, query_mask, batch, lq):
        return self.run.scorer.query_weights(query_mask, batch, lq) if self.run.cache is not None else None

    def received(self, layer: int, received: torch.Tensor) -> None:
        if self.run.cache is not None:
            self.run.scorer.track(self.scores, layer, received, self.run.cache)

    def end_forward(self, cache) -> None:
        """Keep every layer's cache within the budget (the run has marked the prompt done)."""
        if cache is None:
            return
        if self.kv_budget is None:
            self.kv_budget = self.technique.kv_budget_tokens(int(cache.next_position.max()))
        # Evict in chunks: a layer over the budget drops to budget - slack, so the compaction (a copy of
        # the whole layer cache) runs once every ``slack`` steps. Never more than the budget after a forward.
        slack = int(self.kv_budget * self.run.evict_slack) if self.kv_budget >= CHUNKED_EVICTION_MIN_BUDGET else 0
        target = self.kv_budget - slack
        evicted = False
        for layer in range(cache.n_layers):
            if cache.lengths[layer] > self.kv_budget:
                self.evict(cache, layer, target)
                evicted = True
        if evicted and self.run.trace_calls:  # the budget's top-k, after the last layer, for the next step
            self.run.trace_calls[-1]["topk"] = target

    def evict(self, cache, layer: int, budget: int) -> None:
        """Compact one layer's cache to ``budget`` tokens: sinks and recent tokens, then the most important."""
        run = self.run
        valid = cache.valid[layer][:, : cache.lengths[layer]]
        positions = cache.cached_positions(layer)
        sink, recent = self.technique.protected(budget, run.scorer)
        protected = edge_token_mask(valid, first=sink, last=recent)
        scores = run.scorer.kv_scores(self.scores, layer, positions, run.generator)
        index = select_tokens_to_keep(scores, budget, protected, valid).index
        if layer in self.scores.by_layer:
            self.scores.by_layer[layer] = gather_tokens(self.scores.by_layer[layer], index)
        cache.compact(layer, index)

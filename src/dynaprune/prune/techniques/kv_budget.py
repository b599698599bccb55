"""Decode-time KV budget: ``kv=F`` or ``kv_tokens=N``, ``sink=N``, ``recent=N`` (SpAtten Sec. III-A
applied to the KV cache of generation, as the official SpAtten-LLM code does; StreamingLLM / H2O style).

After every decoder forward each layer's cache is compacted to the budget: the first ``sink`` and the
last ``recent`` cached tokens are protected, the rest ranked by the token scorer (``score=``);
``recent_max=N`` protects the last N tokens where the budget has room for them and fewer where it has
not (``kv_bytes=F`` on short prompts; the window used is in the summary, ``kv_recent``). ``kv`` is
the share of the prompt kept, in (0, 1] (``kv=1`` keeps every token), ``kv_tokens`` a count of tokens;
one or the other. The budget acts between forwards of a KV cache, so it changes nothing on an encoder
or a single prefill (``prune/recipe_scope.py`` refuses it there). The prompt's forward evicts to exactly
the budget; during decoding a budget of at least 64 tokens evicts in chunks (down to budget - budget / 16)
so the compaction copy runs once per budget / 16 steps.
Cost: fewer keys read per decode step (the work counter counts the keys attended beside those a dense
cache would hold).

Allocation (``prune/kv_alloc.py``): ``kv_alloc=layer|head|ada|global`` (one token set per layer, per KV
head, Ada-KV's budget spread over a layer's heads by score, or KVzip's one threshold over all layers and
heads) and ``kv_depth=flat|pyramid|w0/w1/...``
(budgets per layer, the same total). The defaults are today's behaviour (SpAtten and H2O rows).

A scorer that ``reconstructs`` (``score=kvzip``) scores the prompt with one extra forward at the end of
the prompt's forward; the caller hands the pass over first:
``ctx.reconstruction = Reconstruction(model, ids)`` (``runtime/reconstruction.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune import keys as K
from dynaprune.prune.kv_alloc import (
    ALLOCATIONS,
    ada_select,
    check_depth,
    depth_weights,
    global_select,
    layer_budgets,
    layer_widths,
)
from dynaprune.prune.technique import Stage, Technique
from dynaprune.prune.tokens import edge_token_mask, select_tokens_to_keep

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
    recent_max: int | None = None
    kv_alloc: str = "layer"
    kv_depth: str = "flat"

    role = "kv"
    keys = (
        K.Key("kv", K.parse_float, check_kv),
        K.Key("kv_tokens", K.parse_int, K.at_least(1, integer=True)),
        K.Key("sink", K.parse_int, K.at_least(0, integer=True)),
        K.Key("recent", K.parse_int, K.at_least(0, integer=True)),
        K.Key("recent_max", K.parse_int, K.at_least(0, integer=True)),
        K.Key("kv_alloc", K.parse_word, K.choice(*ALLOCATIONS), default="layer"),
        K.Key("kv_depth", K.parse_word, check_depth, default="flat", json="text"),
    )
    exports = ("kv_budget_tokens", "has_kv_budget")

    @property
    def has_kv_budget(self) -> bool:
        """A decode-time KV budget is set (``kv`` or ``kv_tokens``)."""
        return self.kv is not None or self.kv_tokens is not None

    def check(self) -> None:
        for name in ("sink", "recent", "recent_max"):
            if getattr(self, name) is not None and not self.has_kv_budget:
                raise K.err(name, f"{name} protects tokens inside the decode-time KV budget; it needs kv or kv_tokens")
        if self.recent is not None and self.recent_max is not None:
            raise K.err("recent_max", "set either recent (a window the budget must hold) or recent_max (a window "
                                      "shrunk to what the budget holds), not both")
        if self.kv is not None and self.kv_tokens is not None:
            raise K.err("kv_tokens", "set either kv (a share of the prompt) or kv_tokens (a count), not both")
        for name, default in (("kv_alloc", "layer"), ("kv_depth", "flat")):
            if getattr(self, name) != default and not self.has_kv_budget:
                raise K.err(name, f"{name} spreads the decode-time KV budget; it needs kv or kv_tokens")
        if self.kv_alloc.startswith("global") and self.kv_depth != "flat":
            raise K.err("kv_depth", f"kv_alloc={self.kv_alloc} sets every layer's budget; it needs kv_depth=flat")
        if self.kv_tokens is not None:
            self._check_protected_fit(self.kv_tokens)

    def check_with(self, recipe: Any) -> None:
        if self.kv_alloc != "layer" and recipe.scorer.by_position:
            raise K.err("kv_alloc", f"kv_alloc={self.kv_alloc} ranks each KV head's tokens; score={recipe.scorer.name} "
                        "has one score per position for all layers (use e.g. score=h2o or score=observed)")

    def _check_protected_fit(self, budget: int, where: str = "") -> None:
        protected = (self.sink or 0) + (self.recent or 0)
        if protected > budget:
            raise K.err("sink + recent", f"{protected} protected tokens exceed the kv budget of {budget} tokens{where}")

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        depth_weights(self.kv_depth, n_layers)  # a kv_depth of the wrong length, whatever the context
        if context_len is not None and self.has_kv_budget:
            self.check_layer_budgets(self.layer_budgets(context_len, n_layers))

    def check_layer_budgets(self, budgets: list[int]) -> None:
        """Every layer's budget (``kv_depth``) leaves room for the sinks and the recent window."""
        layer = min(range(len(budgets)), key=budgets.__getitem__)
        self._check_protected_fit(budgets[layer], f" of layer {layer} (kv_depth={self.kv_depth})")

    def layer_budgets(self, context_len: int, n_layers: int) -> list[int]:
        """The budget of each layer for a prompt of ``context_len`` (``kv_depth``; empty: no budget)."""
        budget = self.kv_budget_tokens(context_len)
        return [] if budget is None else layer_budgets(budget, self.kv_depth, n_layers)

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
        """(sink, recent) tokens protected inside a budget: as set (``recent_max``: at most what is left
        beside the sinks), else the scorer's defaults."""
        sink = self.sink if self.sink is not None else scorer.default_sink(budget)
        recent = next((r for r in (self.recent, self.recent_max) if r is not None), None)
        recent = scorer.default_recent(budget, sink) if recent is None else recent
        return sink, min(recent, budget - sink)

    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        if any("kv_evicted_tokens" in s for s in summaries):
            merged["kv_evicted_tokens"] = sum(s.get("kv_evicted_tokens", 0) for s in summaries)
            merged["kv_evictions"] = sum(s.get("kv_evictions", 0) for s in summaries)
        recents = [s["kv_recent"] for s in summaries if s.get("kv_recent") is not None]
        if recents:  # recent_max: the windows used, smallest and largest over the run's sequences
            merged["kv_recent"] = [min(r[0] for r in recents), max(r[1] for r in recents)]

    def stage(self, run) -> Stage | None:
        return KVBudgetStage(self, run) if self.has_kv_budget else None


class KVBudgetStage(Stage):
    name = "kv"

    def __init__(self, technique: KVBudget, run) -> None:
        super().__init__(technique, run)
        self.kv_budget: int | None = None  # a caller may set it before the first forward (lm stream)
        self.scores = run.scorer.new_state()  # the scorer's importance of the cached tokens
        # per-KV-head ranking needs the attention each KV head's keys received (runtime/pruning.py)
        self.received_per_kv_head = technique.kv_alloc != "layer"
        self._layer_budgets: list[int] | None = None
        self._held: list[int] = []  # cache slots per layer after the last forward
        self.reconstruction = None  # runtime.reconstruction.Reconstruction, for a scorer that reconstructs
        self.reconstruction_tokens = 0  # tokens of the scorer's extra forward (per sequence)
        self.reconstruction_flops = 0

    def summary(self, out: dict, layers: list[int]) -> None:
        """What the cache held and evicted: slots per layer after the last forward, slots evicted in all
        (per sequence), compactions run."""
        out["kv_budget_tokens"] = self.kv_budget
        out["kv_held_per_layer"] = list(self._held)
        out["kv_evicted_tokens"] = int(self.total(layers, "evicted"))
        out["kv_evictions"] = int(self.total(layers, "evictions"))
        if self.technique.recent_max is not None and self._layer_budgets:  # the windows recent_max left
            used = [self.technique.protected(b, self.run.scorer)[1] for b in self._layer_budgets]
            out["kv_recent"] = [min(used), max(used)]
        if self.reconstruction_tokens:  # the scorer's extra forward: its FLOPs beside the run's (per sequence)
            out["kv_reconstruction_tokens"] = self.reconstruction_tokens
            out["kv_reconstruction_flops"] = self.reconstruction_flops

    def queries_keys(self, layer, q, k, key_padding_mask, scale) -> None:
        if self.run.cache is not None and self.run.scorer.observes:
            groups = k.shape[1] // self.run.shape.kv_heads  # explicit paths repeat K per query head
            k = k[:, ::groups] if groups > 1 else k
            self.run.scorer.observe(self.scores, layer, q, k, key_padding_mask, scale)

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
        if getattr(self.run.scorer, "reconstructs", False) and not self.scores.by_layer:
            self._reconstruct(cache)
        if self._layer_budgets is None:
            # a layer above the mean budget is held to the cache's capacity (a stream allocates budget + step)
            self._layer_budgets = [min(b, cache.capacity - 1) if b > self.kv_budget else b
                                   for b in layer_budgets(self.kv_budget, self.technique.kv_depth, cache.n_layers)]
            self.technique.check_layer_budgets(self._layer_budgets)
        # Evict in chunks: a layer over the budget drops to budget - slack, so the compaction (a copy of
        # the whole layer cache) runs once every ``slack`` steps. Never more than the budget after a forward.
        # The slack is for decode-time growth only: the prompt's forward evicts to exactly the budget
        # (kv=0.25 keeps 25% of the context, as kvpress's budgets mean).
        evicted = False
        target = self.kv_budget
        decoding = self.run.iteration > 1  # end_forward of the prompt's forward runs with iteration == 1
        if self.technique.kv_alloc.startswith("global") and not decoding:
            evicted = self.evict_global(cache)
        for layer in range(cache.n_layers):
            budget = self._layer_budgets[layer]
            chunked = decoding and budget >= CHUNKED_EVICTION_MIN_BUDGET
            slack = int(budget * self.run.evict_slack) if chunked else 0
            if cache.lengths[layer] > budget:
                target = budget - slack
                counts = self.run.counts(layer, self.name)  # what ctx.summary() says was evicted
                counts["evicted"] = counts.get("evicted", 0) + int(cache.lengths[layer]) - target
                counts["evictions"] = counts.get("evictions", 0) + 1
                self.evict(cache, layer, target)
                evicted = True
        self._held = [int(cache.lengths[i]) for i in range(cache.n_layers)]
        if evicted and self.run.trace_calls:  # the budget's top-k, after the last layer, for the next step
            self.run.trace_calls[-1]["topk"] = target

    def _reconstruct(self, cache) -> None:
        scorer = self.run.scorer
        if self.reconstruction is None:
            raise DynapruneError(f"score={scorer.name} scores the prompt by reconstructing it: this run did not "
                                 "hand over the pass (ctx.reconstruction = Reconstruction(model, ids))")
        by_layer, self.reconstruction_tokens = self.reconstruction(cache)
        self.scores.by_layer.update(by_layer)
        self.reconstruction_flops = scorer.reconstruction_flops(self.run.shape, max(cache.lengths),
                                                                self.reconstruction_tokens)

    def evict_global(self, cache) -> bool:
        """The prompt's eviction under ``kv_alloc=global``: one selection over every layer and KV head;
        each layer's width becomes its budget for later evictions."""
        layers = range(cache.n_layers)
        if all(cache.lengths[i] <= b for i, b in zip(layers, self._layer_budgets, strict=True)):
            return False
        run, valids, protected, scores = self.run, [], [], []
        for layer in layers:
            valid = cache.head_valid_mask(layer)
            sink, recent = self.technique.protected(self._layer_budgets[layer], run.scorer)
            s = run.scorer.kv_scores(self.scores, layer, cache.cached_positions(layer), run.generator)
            valids.append(valid)
            protected.append(edge_token_mask(valid, first=sink, last=recent))
            scores.append(s[:, None].expand(valid.shape) if s.dim() == 2 else s)
        if self.technique.kv_alloc == "global_layer":  # one count per layer, every head its own top tokens
            # a packed cache (kv_bits) stores whole key groups: widths in whole groups leave no fp16 tail
            store = next((st for st in run.stages if st.name == "kvstore"), None)
            align = store.spec.key_group if store is not None else 1
            widths = layer_widths(scores, sum(self._layer_budgets), protected, valids, align)
            # a layer must leave the next step a slot: a short prompt's widest layer may keep every token
            widths = [min(w, cache.capacity - 1) for w in widths]
            for layer, width in zip(layers, widths, strict=True):
                counts = self.run.counts(layer, self.name)
                counts["evicted"] = counts.get("evicted", 0) + max(0, int(cache.lengths[layer]) - width)
                counts["evictions"] = counts.get("evictions", 0) + 1
                self._layer_budgets[layer] = width
                if cache.lengths[layer] > width:
                    self.evict(cache, layer, width)
            return True
        total = sum(self._layer_budgets) * cache.k[0].shape[1]
        for layer, (index, mask) in zip(layers, global_select(scores, total, protected, valids), strict=True):
            counts = self.run.counts(layer, self.name)
            counts["evicted"] = counts.get("evicted", 0) + int(cache.lengths[layer]) - int(mask.sum(-1).max())
            counts["evictions"] = counts.get("evictions", 0) + 1
            run.scorer.compact_state(self.scores, layer, index)
            cache.compact(layer, index, None if bool(mask.all()) else mask)
            self._layer_budgets[layer] = max(1, min(cache.lengths[layer], cache.capacity - 1))
        return True

    def evict(self, cache, layer: int, budget: int) -> None:
        """Compact one layer's cache to ``budget`` tokens: sinks and recent tokens, then the most important."""
        run, alloc = self.run, self.technique.kv_alloc
        positions = cache.cached_positions(layer)
        sink, recent = self.technique.protected(budget, run.scorer)
        scores = run.scorer.kv_scores(self.scores, layer, positions, run.generator)
        keep_mask = None
        if alloc == "layer":  # one token set for the layer (per-head scores summed over the heads)
            valid = cache.valid[layer][:, : cache.lengths[layer]]
            scores = scores.sum(1) if scores.dim() == 3 else scores
            index = select_tokens_to_keep(scores, budget, edge_token_mask(valid, first=sink, last=recent), valid).index
        else:  # each KV head its own tokens (global: later evictions keep each head within the layer's width)
            valid = cache.head_valid_mask(layer)
            scores = scores[:, None].expand(valid.shape) if scores.dim() == 2 else scores
            protected = edge_token_mask(valid, first=sink, last=recent)
            if alloc in ("head", "global", "global_layer"):
                keep = select_tokens_to_keep(scores, budget, protected, valid)
                index, keep_mask = keep.index, keep.mask
            else:
                index, keep_mask = ada_select(scores, budget, protected, valid)
            keep_mask = None if bool(keep_mask.all()) else keep_mask
        run.scorer.compact_state(self.scores, layer, index)
        cache.compact(layer, index, keep_mask)

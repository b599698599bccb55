"""The pruning run context: the enabled techniques' hooks, run in a fixed order inside real models.

``make_context(recipe, model)`` returns the context a forward pass runs under. A dense recipe gives the
plain ``RunContext`` (so "nothing pruned" is bit-identical to dense by construction); otherwise a
``PruningContext`` holding one stage per enabled technique (``Technique.stage``), in role order
(``prune/technique.py``: tokens, heads, kv, scorer, probs, values, kernel). It knows no technique by
name. One attention call (docs/architecture.md has the diagram):

1. ``before_attention`` (the token pruner plans its schedule), ``heads`` (the alive heads are gathered:
   pruned heads are not computed and output zero; ``head_plan`` lets the models skip their projections);
2. the attention: SDPA's fused kernel, or one blocked pass that also returns the attention each key
   received when a stage ``needs_received``; explicit per-head attention when a stage is ``explicit``:
   a kernel stage's ``attention``, else ``probs`` (or the exact softmax), ``values``, ``combine`` (or
   probs @ V);
3. ``received`` (token scorers accumulate importance), ``after_attention`` (head importance), the
   workload trace (``trace``) and the work counter (query tokens, pairs, heads computed and projected).

``between_layers`` runs each stage's hook (cascade token and head pruning); ``begin_forward`` /
``end_forward`` frame every decoder forward (the KV budget evicts there); ``summary`` collects each
stage's figures. The first real token of an encoder and the last real token of a decoder prompt are
never pruned (``protect_first`` / ``protect_last``); padding is never kept over a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.merge import proportional_probs, size_bias
from dynaprune.prune.quant import bits_fetched
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.technique import ROLES, Stage
from dynaprune.prune.techniques.kv_bytes import shape_key
from dynaprune.prune.tokens import accumulate_token_importance, received_per_kv_head
from dynaprune.runtime.attention import (
    RunContext,
    attention_with_received,
    build_mask,
    count_pairs,
    expand_kv,
    heads_key_mask,
    padded_pairs,
    received_pairs,
    sdpa,
    windowed_pairs,
)
from dynaprune.runtime.cost import CostShape, cost_shape
from dynaprune.runtime.head_skipping import HeadPlan
from dynaprune.runtime.summary import LayerStats, merge_summaries, summarize

__all__ = ["PruningContext", "make_context", "merge_summaries", "LayerStats"]

# A KV budget evicts down to (1 - EVICT_SLACK) x budget when a layer goes over it (see kv_budget.py).
EVICT_SLACK = 1 / 16


@dataclass
class AttentionCall:
    """One attention call as the stages see it (q, k, v of the alive heads, K/V expanded when explicit)."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float
    mask: torch.Tensor | None  # (B, H, Lq, Lk)-broadcastable bool, True = attend (explicit calls only)
    query_mask: torch.Tensor | None  # (B, Lq) real queries, when queries are the keys
    # what the stages report back for the cost accounting (runtime/work.py, runtime/summary.py)
    needs_lsb: torch.Tensor | None = None  # (B, H, Lq) rows that needed their LSBs
    fetched_values: torch.Tensor | None = None  # (B, H, Lk) V rows some real query kept; None: all visible
    qk_passes: int = 1  # full-rectangle QK^T passes the emulation ran
    int_pairs: int = 0  # (query, key, head) pairs of a kernel's cheap integer pass
    window: int | None = None  # a sliding-window layer: a query sees at most this many keys


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class PruningContext(RunContext):
    """Run state of one pruned forward pass or generation (see the module docstring)."""

    def __init__(self, recipe: Recipe, shape: CostShape, *, protect_first: int = 1, protect_last: int = 0,
                 record_probs: bool = False, seed: int = 0, keep_pruned_states: bool = True, trace: bool = False,
                 evict_slack: float = EVICT_SLACK) -> None:
        super().__init__(record_probs=record_probs)
        self.recipe, self.shape, self.scorer = recipe, shape, recipe.scorer
        self.protect_first, self.protect_last = protect_first, protect_last
        self.generator = torch.Generator().manual_seed(seed)
        self.keep_pruned_states = keep_pruned_states  # pruned tokens' last states, for mean pooling
        self.evict_slack = evict_slack  # share of a KV budget freed per eviction (0: one token per step)
        self.layer_stats: dict[int, LayerStats] = {}
        self.cache = None  # the KV cache of the running decoder forward
        self.prefilled = False  # after the first decoder forward: token pruning acted on the prompt only
        self.trace_calls: list[dict] | None = [] if trace else None  # workload trace of the batch's first input
        self.iteration = 0
        self.sequence_length = 0
        self._forward_tokens = 0  # real tokens entering layer 0 in the running forward (LM-head reference)
        self._plan: HeadPlan | None = None  # the head plan of the alive heads, for the models' projections
        self._plan_heads: torch.Tensor | None = None
        self._plan_given: HeadPlan | None = None  # the plan the model asked for in this layer
        techniques = sorted(recipe.techniques, key=lambda t: ROLES.index(t.role))
        self.stages: list[Stage] = [s for t in techniques if (s := t.stage(self)) is not None]
        self.explicit = any(s.explicit for s in self.stages)
        self._kernel = next((s for s in self.stages if _overrides(s, "attention")), None)
        self._kernel_probs = any(s.wants_probabilities for s in self.stages)  # beside a kernel's own attention
        self._per_kv_head = any(getattr(s, "received_per_kv_head", False) for s in self.stages)
        self._observers = [s for s in self.stages if _overrides(s, "queries_keys")]  # read q / k of every call

    # stage state reads as context state (ctx.head_index, ctx.kv_budget, ctx.token_importance, ...)
    def __getattr__(self, name: str):
        for stage in self.__dict__.get("stages", ()):
            if name in vars(stage):
                return getattr(stage, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name not in self.__dict__:
            for stage in self.__dict__.get("stages", ()):
                if name in vars(stage):
                    setattr(stage, name, value)
                    return
        object.__setattr__(self, name, value)

    def counts(self, layer: int, name: str) -> dict[str, float]:
        """The per-layer counters of stage ``name``."""
        return self.layer_stats.setdefault(layer, LayerStats()).counts.setdefault(name, {})

    def needs_received(self, layer: int) -> bool:
        return any(s.needs_received(layer) for s in self.stages)

    def _heads(self) -> torch.Tensor | None:
        return next((h for s in self.stages if (h := s.heads()) is not None), None)

    # ------------------------------------------------------------------ attention
    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        if window is not None and self._kernel is not None:
            raise DynapruneError(f"{type(self._kernel).__name__}: HDP's block kernel has no sliding window; a "
                                 f"prompt longer than layer {layer}'s window of {window} tokens is not supported")
        stats = self.layer_stats.setdefault(layer, LayerStats())
        B, n_heads, lq, head_dim = q.shape
        scale = head_dim**-0.5 if scale is None else scale
        for s in self.stages:
            s.before_attention(layer, key_padding_mask, B, k.shape[2])
        heads = self._heads()
        explicit = self.explicit or self.record_probs
        if heads is not None or explicit:  # these paths work on one K/V head per query head
            k, v = expand_kv(q, k, v)
        if heads is not None:  # cascade head pruning: only the alive heads are computed
            q, k, v = (_gather_heads(t, heads) for t in (q, k, v))
        query_mask = key_padding_mask if (key_padding_mask is not None and lq == k.shape[2]) else None
        needs = self.needs_received(layer)
        weights = query_mask
        if needs:  # which queries' attention counts (a scorer may count the last query only)
            found = next((w for s in self.stages if (w := s.query_weights(query_mask, B, lq)) is not None), None)
            weights = found.to(q.device) if found is not None else query_mask
        mask = build_mask(lq, k.shape[2], _explicit_key_mask(key_padding_mask, n_heads, heads), causal,
                          q.device, window) if explicit else None
        call = AttentionCall(layer, q, k, v, key_padding_mask, causal, scale, mask, query_mask, window=window)
        # merged tokens (token_policy=merge): + log(size) on each key's logits (ToMe's proportional attention)
        sizes = next((z for s in self.stages if (z := s.key_sizes(layer)) is not None), None)
        key_bias = size_bias(sizes, q.dtype) if sizes is not None and not explicit else None
        for s in self._observers:
            s.queries_keys(layer, q, k, key_padding_mask, scale)
        received = probs = head_pairs = None
        lk = k.shape[2]
        rectangle = padded_pairs(B, lq, lk, False) * q.shape[1]  # scores of every computed head, masked too
        qk_passes = pv_passes = 1  # full-rectangle passes the emulation ran (fast paths: set below)
        if not explicit:  # SDPA's fused kernel, or one blocked pass that also sums what each key received
            if needs:  # per KV head when a stage ranks each KV head's tokens (kv_alloc=head|ada)
                out, received = attention_with_received(q, k, v, scale, key_padding_mask, causal, weights,
                                                        per_kv_head=self._per_kv_head, key_bias=key_bias,
                                                        window=window)
                computed_pairs = received_pairs(B, q.shape[1], lq, lk, causal, q.element_size())
            else:
                out = sdpa(q, k, v, key_padding_mask, causal, scale, key_bias=key_bias, window=window)
                all_real = key_padding_mask is None or bool(key_padding_mask.all())
                causal_kernel = causal and all_real and lq == lk and window is None
                computed_pairs = padded_pairs(B, lq, lk, causal_kernel) * q.shape[1]
            qk_passes = pv_passes = computed_pairs / max(1, rectangle)
        elif self._kernel is not None:
            out, head_pairs = self._kernel.attention(call)
            probs = _probs(q, k, scale, mask) if self._kernel_probs else None
            qk_passes = call.qk_passes + (1 if probs is not None else 0)
        else:
            probs = next((p for s in self.stages if (p := s.probs(call)) is not None), None)
            probs = _probs(q, k, scale, mask) if probs is None else probs
            if sizes is not None:  # the same as log(size) on the logits, for stages that give probabilities
                probs = proportional_probs(probs, sizes)
            for s in self.stages:
                v = s.values(call, v)
            out = next((o for s in self.stages if (o := s.combine(call, probs, v)) is not None), None)
            out = probs @ v if out is None else out
            qk_passes = call.qk_passes
            self._count_bits(stats, call)
        if probs is not None and needs and self._per_kv_head:
            received = received_per_kv_head(probs, self.shape.kv_heads, heads, key_padding_mask, weights)
        elif probs is not None and needs:
            received = accumulate_token_importance(None, probs, key_padding_mask, query_mask=weights)
        # In a decoder the padding queries (left padding) see no key, so their rows are 0 and ``received``
        # with the query mask is also what every query gave the cached keys.
        if received is not None:
            summed = received.sum(1) if received.dim() == 3 else received  # for the stages ranking per layer
            for s in self.stages:
                s.received(layer, received if getattr(s, "received_per_kv_head", False) else summed)
        for s in self.stages:
            s.after_attention(layer, out, heads, n_heads, query_mask)
        if self.record_probs and probs is not None:
            self._record(layer, probs, out)
        if self.trace_calls is not None:
            self._trace(layer, heads, lq, k.shape[2], head_dim, key_padding_mask, causal)
        self._count(call, lq, lk, B, n_heads, out.shape[1], head_pairs, round(qk_passes * rectangle),
                    round(pv_passes * rectangle))
        stats.heads_alive = out.shape[1]
        if heads is None:
            return out
        full_out = torch.zeros(B, n_heads, lq, head_dim, dtype=out.dtype, device=out.device)
        return full_out.scatter(1, heads[:, :, None, None].expand(-1, -1, lq, head_dim), out)

    def _count(self, call, lq, lk, B, n_heads, computed, head_pairs, qk_computed, pv_computed) -> None:
        layer, key_padding_mask = call.layer, call.key_padding_mask
        tokens, pairs = count_pairs(lq, lk, key_padding_mask, call.causal, B, call.window)
        keys = int(key_padding_mask.sum()) if key_padding_mask is not None else B * lk
        if key_padding_mask is not None and key_padding_mask.dim() == 3:  # per-KV-head mask: mean over heads
            keys //= key_padding_mask.shape[1]
        dense_pairs = dense_keys = None
        if self.cache is not None and self.prefilled:  # keys evicted so far would have been attended too
            seen = self.cache.next_position.cpu() + (tokens // B)
            dense_keys = int(seen.sum())
            dense_pairs = int((seen * (tokens // B) - (tokens // B) * (tokens // B - 1) // 2).sum())
            # a sliding layer (``cache.windows``, set by models/gemma3.py): a dense cache holds a window too
            window = getattr(self.cache, "windows", {}).get(layer)
            if window is not None:
                dense_keys = int(seen.clamp(max=window - 1 + tokens // B).sum())
                dense_pairs = int(windowed_pairs(seen, torch.full_like(seen, tokens // B), window).sum())
        self.work.heads = n_heads
        plan, self._plan_given = self._plan_given, None  # what the model projected through, if anything
        kv_computed = plan.kv_computed if plan is not None else self.shape.kv_heads_of(layer)
        projected = plan.projected.numel() if plan is not None else n_heads
        self.work.add(layer, tokens, pairs, computed, keys, dense_pairs, dense_keys, head_pairs,
                      kv_heads_computed=kv_computed, projected_heads=projected, int_head_pairs=call.int_pairs)
        self.work.add_computed(layer, B * lq, projected, kv_computed, qk_computed, pv_computed)
        if layer == 0:
            self._forward_tokens = tokens
        self.layer_stats[layer].tokens_in += tokens

    def _count_bits(self, stats: LayerStats, call: AttentionCall) -> None:
        """Q, K and V bits fetched in this call and the same rows at 16 bits (``runtime/summary.py``), at
        the widths the stages use (16 bits where none changes them)."""
        widths: dict[str, int] = {}
        for s in self.stages:
            widths.update(s.bit_widths())
        counts = bits_fetched(call.q, call.k, **widths, mask=call.mask, query_mask=call.query_mask,
                              needs_lsb=call.needs_lsb, fetched_values=call.fetched_values)
        for name, n in counts.items():
            setattr(stats, name, getattr(stats, name) + n)

    def count_lm_head(self, hidden, mask, last_only) -> None:
        """As ``RunContext.count_lm_head``; without token pruning a dense run would compute the logits
        of every real token that entered the forward."""
        real, computed = self._lm_head_positions(hidden, mask, last_only)
        self.work.add_lm_head(real, computed, real if last_only else self._forward_tokens)

    def _trace(self, layer, heads, lq, lk, head_dim, key_padding_mask, causal) -> None:
        """Record what the first input of the batch did in this call (one entry per call)."""
        n_keys = int(key_padding_mask[0].sum()) if key_padding_mask is not None else lk
        if key_padding_mask is not None and key_padding_mask.dim() == 3:
            n_keys //= key_padding_mask.shape[1]
        queries = n_keys if (lq == lk and key_padding_mask is not None) else lq
        if layer == 0:
            start = int(self.cache.next_position[0]) if self.cache is not None else 0
            self.sequence_length = start + queries
        entry = {
            "iteration": self.iteration, "layer": layer, "D": head_dim, "L": self.sequence_length,
            "heads": heads[0].tolist() if heads is not None else list(range(self.shape.heads)),
            "keys_per_query": [n_keys - (queries - 1 - i) if causal else n_keys for i in range(queries)],
            "needs_lsb": None, "topk": None, "hdp": None,
        }
        for s in self.stages:
            s.trace(entry, queries)
        self.trace_calls.append(entry)

    def compact_cache(self, cache, layer, keep_index, keep_mask=None) -> None:
        """A model's own eviction (a sliding window): a stage's per-token scores (``scores``, the KV budget's)
        follow the cache, as they do when the budget itself evicts."""
        for s in self.stages:
            state = getattr(s, "scores", None)
            if state is not None and self.scorer is not None:
                self.scorer.compact_state(state, layer, keep_index)
        cache.compact(layer, keep_index, keep_mask)

    def head_plan(self) -> HeadPlan | None:
        """The alive heads for the models' projections (None: every head). Rows keeping different heads
        may leave no head pruned in every row: then the models project all heads as usual."""
        heads = self._heads()
        if heads is not self._plan_heads:
            self._plan_heads = heads
            plan = HeadPlan.make(heads, self.shape.heads, self.shape.kv_heads, self.shape.head_dim) \
                if heads is not None else None
            self._plan = plan if plan is not None and plan.projected.numel() < self.shape.heads else None
        self._plan_given = self._plan  # the work counter counts the projections the model ran
        return self._plan

    # ------------------------------------------------------------------ between layers and forwards
    def between_layers(self, layer, hidden, keep):
        for s in self.stages:
            hidden, keep = s.between_layers(layer, hidden, keep)
        return hidden, keep

    def final_states(self, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        """The states to pool and their mask: a stage may put back the states pruned tokens left with."""
        found = next((f for s in self.stages if (f := s.final_states(hidden, keep)) is not None), None)
        return found if found is not None else (hidden, keep["mask"])

    def begin_forward(self, cache) -> None:
        self.cache = cache
        if cache is not None and self.prefilled:  # the context cache this forward reads (runtime/cost.py)
            self.work.kv_read_bytes += cache.bytes_held(fp_bytes=2)
            self.work.kv_read_bytes_dense += cache.dense_fp16_bytes()
        for s in self.stages:
            s.begin_forward(cache)

    def end_forward(self, cache) -> None:
        """After each decoder forward: the prompt is done; stages act (the KV budget evicts)."""
        self.iteration += 1
        if cache is None:
            return
        self.prefilled = True
        for s in self.stages:
            s.end_forward(cache)
        self.work.kv_held_bytes, self.work.kv_held_bytes_dense = cache.bytes_held(fp_bytes=2), cache.dense_fp16_bytes()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Per-layer tokens and heads alive, the counts the stages enabled and each stage's own figures."""
        enabled = set().union(*(s.summary_counts for s in self.stages))
        out = summarize(self.layer_stats, enabled)
        for s in self.stages:
            s.summary(out, sorted(self.layer_stats))
        return out


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0)  # padding queries see no key: rows of 0, not NaN


def _explicit_key_mask(key_padding_mask: torch.Tensor | None, n_heads: int,
                       heads: torch.Tensor | None) -> torch.Tensor | None:
    """A per-KV-head key mask (B, Hkv, Lk) for the explicit path: one row per computed query head."""
    if key_padding_mask is None or key_padding_mask.dim() == 2:
        return key_padding_mask
    mask = heads_key_mask(key_padding_mask, n_heads)
    return mask if heads is None else mask.gather(1, heads[:, :, None].expand(-1, -1, mask.shape[2]))


def _gather_heads(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 1, heads[:, :, None, None].expand(-1, -1, t.shape[2], t.shape[3]))


def recipe_for_model(recipe: Recipe, model) -> Recipe:
    """``recipe`` with ``kv_bytes=F`` expanded to ``model``'s own choices (``kv_bytes_choices.json`` is keyed
    by model shape; a recipe parsed before the model was known took the default model's)."""
    if recipe.kv_bytes_request is None:
        return recipe
    s = cost_shape(model)
    return recipe.for_shape(shape_key(s.layers, s.heads, s.kv_heads, s.head_dim))


def make_context(recipe: Recipe | str | None, model, **kwargs) -> RunContext:
    """The context a forward pass of ``model`` runs under for ``recipe`` (dense: a plain RunContext)."""
    if recipe is None or isinstance(recipe, str):
        recipe = Recipe.parse(recipe or "")
    recipe = recipe_for_model(recipe, model)
    if recipe.is_dense and not kwargs.get("trace"):  # a dense trace needs the recording context
        return RunContext()
    shape = cost_shape(model)
    recipe.validate_for(shape.layers, shape.heads, shape.kv_heads)
    if shape.causal:
        kwargs.setdefault("protect_first", 0)
        kwargs.setdefault("protect_last", 1)
    return PruningContext(recipe, shape, **kwargs)



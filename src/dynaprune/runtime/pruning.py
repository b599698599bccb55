"""The pruning run context: SpAtten and HDP techniques applied inside real models at run time.

``make_context(recipe, model)`` returns the context a forward pass runs under. A dense recipe gives
the plain ``RunContext`` (so "nothing pruned" is bit-identical to dense by construction); otherwise a
``PruningContext`` that

- in ``attend`` computes attention explicitly for the heads still alive (cascade head pruning,
  SpAtten Sec. III-B: pruned heads are gathered out, not computed, and output zero; ``head_plan`` tells
  the models which heads to project, so their QKV and output projections are skipped as well), with progressive
  or static quantization of Q/K/V (Sec. III-D), local value pruning (Sec. III-C) or HDP's integer
  block/head pruning with its approximation (``prune/hdp.py``), and accumulates the cumulative token
  importance (sum of attention probabilities received, Alg. 2) and head importance (sum of
  |attention_out|);
- in ``between_layers`` applies the cascade schedule (Sec. III-A): the hidden states of the tokens
  ranked lowest are gathered out (attention *and* FFN shrink in every later layer), together with every
  per-token tensor the model carries (padding mask, positions) and the importance itself; alive heads
  are chosen for the next layer from the cumulative head importance.

The first real token ([CLS] / pooling target) of an encoder and the last real token of a decoder
prompt are never pruned; padding is never kept over a real token.
"""

from __future__ import annotations

import torch

from dynaprune.prune.hdp import HDPConfig, hdp_attention
from dynaprune.prune.heads import accumulate_head_importance, select_heads_to_keep
from dynaprune.prune.quant import bits_fetched, progressive_attention_probs, quantized_attention_probs, quantized_values
from dynaprune.prune.recipe import Recipe, keep_counts
from dynaprune.prune.tokens import accumulate_token_importance, edge_token_mask, gather_tokens, select_tokens_to_keep
from dynaprune.prune.values import local_value_attention
from dynaprune.runtime.attention import (
    RunContext,
    attention_with_received,
    build_mask,
    count_pairs,
    expand_kv,
    padded_pairs,
    received_pairs,
    sdpa,
)
from dynaprune.runtime.cost import CostShape, cost_shape
from dynaprune.runtime.head_skipping import HeadPlan
from dynaprune.runtime.summary import LayerStats, hdp_sparsities, merge_summaries, summarize

__all__ = ["PruningContext", "make_context", "merge_summaries", "hdp_sparsities", "kv_protected", "LayerStats"]

HDP_COUNTS = ("blocks_kept", "blocks_valid", "pairs_kept", "pairs_valid", "head_kept", "qk_int_mults",
              "qk_frac_mults", "skipped_by_head", "skipped_by_block", "skipped_by_near_zero", "frac_frac_dropped",
              "pv_mults")
# A KV budget of at least CHUNKED_EVICTION_MIN_BUDGET tokens evicts down to (1 - EVICT_SLACK) x budget
# when a layer goes over it: one compaction (a copy of the layer's cache) per budget / 16 decode steps.
# Smaller budgets, where the copy is cheap, evict one token per step and hold exactly the budget.
EVICT_SLACK = 1 / 16
CHUNKED_EVICTION_MIN_BUDGET = 64


class PruningContext(RunContext):
    """Run state of one pruned forward pass (see the module docstring)."""

    def __init__(
        self,
        recipe: Recipe,
        shape: CostShape,
        *,
        protect_first: int = 1,
        protect_last: int = 0,
        record_probs: bool = False,
        seed: int = 0,
        keep_pruned_states: bool = True,
        trace: bool = False,
        evict_slack: float = EVICT_SLACK,
    ) -> None:
        super().__init__(record_probs=record_probs)
        self.recipe = recipe
        self.shape = shape
        self.protect_first, self.protect_last = protect_first, protect_last
        units, self.group_size = recipe.head_units(shape.heads, shape.kv_heads)
        self.head_keep_after = recipe.head_keep_schedule(shape.layers, units)
        self.token_importance: torch.Tensor | None = None  # (B, L) aligned with the current tokens
        self.head_importance: torch.Tensor | None = None  # (B, Hq)
        self.head_index: torch.Tensor | None = None  # (B, Hk) query heads alive, None = all
        self._head_plan: HeadPlan | None = None  # the same heads, for the models' projections
        self._plan_given: HeadPlan | None = None  # the plan the model asked for in this layer
        self.token_keep_after: list[torch.Tensor] | None = None  # per layer, (B,) counts
        self.last_token_layer = shape.layers - 1  # the last layer after which tokens are pruned (planned)
        self.layer_stats: dict[int, LayerStats] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.hdp = _hdp_config(recipe)
        # Pruned tokens' last hidden states ("frozen" where they left), so mean pooling can still see
        # every token: without them a mean-pooled embedding drifts to the few high-attention tokens
        # ([CLS], [SEP], punctuation) that survive. Their later layers are still skipped.
        self.keep_pruned_states = keep_pruned_states
        self.pruned_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (hidden, pos, valid)
        # Decode time (KV budget): the cache of the running forward, importance of cached tokens.
        self.cache = None
        self.prefilled = False  # token pruning acts on the prompt only; later forwards only evict
        self.position_importance: torch.Tensor | None = None  # (B, P) spatten: over layers, heads, steps
        self.layer_importance: dict[int, torch.Tensor] = {}  # h2o / instant: per layer, aligned with cache
        self.kv_budget: int | None = None
        self.evict_slack = evict_slack  # share of the budget freed per eviction (0: one token per step)
        # Workload trace of the first input of the batch (runtime/trace.py turns it into CSV rows).
        self.trace_calls: list[dict] | None = [] if trace else None
        self.iteration = 0
        self.sequence_length = 0
        self._forward_tokens = 0  # real tokens entering layer 0 in the running forward (LM-head reference)
        if recipe.quant is not None:
            self.work.storage = "simulated"  # fake-quantized floats: no packed codes are stored

    # ------------------------------------------------------------------ attention
    def attend(self, layer, q, k, v, key_padding_mask, causal, scale):
        recipe, stats = self.recipe, self.layer_stats.setdefault(layer, LayerStats())
        B, n_heads, lq, head_dim = q.shape
        scale = head_dim**-0.5 if scale is None else scale
        if self.token_keep_after is None and recipe.prunes_tokens:
            self._plan_tokens(key_padding_mask, q.shape[0], k.shape[2])
        heads = self.head_index
        explicit = self.hdp is not None or recipe.quant is not None or recipe.value is not None or self.record_probs
        if heads is not None or explicit:  # these paths work on one K/V head per query head
            k, v = expand_kv(q, k, v)
        if heads is not None:  # cascade head pruning: only the alive heads are computed
            q, k, v = (_gather_heads(t, heads) for t in (q, k, v))
        query_mask = key_padding_mask if (key_padding_mask is not None and lq == k.shape[2]) else None
        mask = build_mask(lq, k.shape[2], key_padding_mask, causal, q.device) if explicit else None
        received = None  # attention each key received in this call (B, Lk), when importance is needed
        hdp_head_pairs = None  # HDP: the scores computed in full precision (kept blocks of kept heads)
        hdp_int_pairs = 0  # HDP: the integer pass (every valid pair of every head it scores)
        lk = k.shape[2]
        rectangle = padded_pairs(B, lq, lk, False) * q.shape[1]  # scores of every computed head, masked too
        qk_passes = pv_passes = 1  # full-rectangle passes the emulation ran (fast paths: set below)

        if not explicit:
            # Fast paths. No probabilities needed (dense layers, layers after the last token-pruning
            # layer): SDPA's fused kernel on the gathered tensors. Else one blocked pass gives the
            # outputs and the column sums of the probabilities, never the whole probability tensor.
            probs = None
            if self._needs_importance(layer):
                out, received = attention_with_received(q, k, v, scale, key_padding_mask, causal, query_mask)
                computed_pairs = received_pairs(B, q.shape[1], lq, lk, causal, q.element_size())
            else:
                out = sdpa(q, k, v, key_padding_mask, causal, scale)
                all_real = key_padding_mask is None or bool(key_padding_mask.all())
                computed_pairs = padded_pairs(B, lq, lk, causal and all_real and lq == lk) * q.shape[1]
            qk_passes = pv_passes = computed_pairs / max(1, rectangle)
        elif self.hdp is not None:
            out, hdp_stats = hdp_attention(q, k, v, self.hdp, scale=scale, causal=causal,
                                           key_padding_mask=key_padding_mask, query_padding_mask=query_mask,
                                           measure_error=False)
            counts = {name: float(getattr(hdp_stats, name).sum()) for name in HDP_COUNTS}
            counts["heads_total"] = float(hdp_stats.head_kept.numel())
            hdp_head_pairs = int(counts["pairs_kept"])
            hdp_int_pairs = int(counts["qk_int_mults"]) // head_dim
            qk_passes = _hdp_qk_passes(self.hdp) + (1 if self._needs_token_importance else 0)
            for key, value in counts.items():
                stats.hdp[key] = stats.hdp.get(key, 0.0) + value
            probs = _probs(q, k, scale, mask) if self._needs_token_importance else None
            self._last_hdp = hdp_stats
        else:
            probs, needs_lsb, qk_passes = self._probs(q, k, scale, mask)
            if recipe.quant is not None:
                v = quantized_values(v, recipe.quant.total_bits).values
            fetched_v = None  # (B, H, Lk) V rows some real query keeps; None: every visible row
            if recipe.value is not None:
                result = local_value_attention(probs, v, recipe.value, key_mask=mask, query_mask=query_mask)
                out, fetched_v = result.output, result.fetched
                for name in ("value_rows_used", "value_rows_dense", "value_rows_fetched", "value_rows_fetched_dense"):
                    setattr(stats, name, getattr(stats, name) + getattr(result, name.replace("value", "v")))
            else:
                out = probs @ v
            self._count_bits(stats, q, k, mask, query_mask, needs_lsb, fetched_v)

        if probs is not None and self._needs_importance(layer):
            received = accumulate_token_importance(None, probs, key_padding_mask, query_mask=query_mask)
        # In a decoder the padding queries (left padding) see no key, so their rows are 0 and ``received``
        # with the query mask is also what every query gave the cached keys.
        if self.cache is not None and self.recipe.has_kv_budget and received is not None:
            self._track_cache_importance(layer, received)
        if self._needs_token_importance and received is not None and not self.prefilled:
            if recipe.score == "instant":  # PoWER-BERT style: this layer's attention only
                self.token_importance = None
            self.token_importance = _accumulate(self.token_importance, received)
        if recipe.prunes_heads:
            per_head = accumulate_head_importance(None, out, query_mask)
            full = torch.zeros(B, n_heads, dtype=per_head.dtype, device=per_head.device)
            full = full.scatter(1, heads, per_head) if heads is not None else per_head
            self.head_importance = full if self.head_importance is None else self.head_importance + full
        if self.record_probs and probs is not None:
            self._record(layer, probs, out)

        if self.trace_calls is not None:
            self._trace(layer, heads, lq, k.shape[2], head_dim, key_padding_mask, causal, stats)
        tokens, pairs = count_pairs(lq, k.shape[2], key_padding_mask, causal, B)
        keys = int(key_padding_mask.sum()) if key_padding_mask is not None else B * k.shape[2]
        dense_pairs = dense_keys = None
        if self.cache is not None and self.prefilled:  # keys evicted so far would have been attended too
            seen = self.cache.next_position.cpu() + (tokens // B)
            dense_keys = int(seen.sum())
            dense_pairs = int((seen * (tokens // B) - (tokens // B) * (tokens // B - 1) // 2).sum())
        self.work.heads = n_heads
        plan, self._plan_given = self._plan_given, None  # what the model projected through, if anything
        kv_computed = plan.kv_computed if plan is not None else self.shape.kv_heads
        projected = plan.projected.numel() if plan is not None else n_heads
        self.work.add(layer, tokens, pairs, out.shape[1], keys, dense_pairs, dense_keys, hdp_head_pairs,
                      kv_heads_computed=kv_computed, projected_heads=projected, int_head_pairs=hdp_int_pairs)
        self.work.add_computed(layer, B * lq, projected, kv_computed, round(qk_passes * rectangle),
                               round(pv_passes * rectangle))
        if layer == 0:
            self._forward_tokens = tokens
        stats.tokens_in += tokens
        stats.heads_alive = out.shape[1]
        if heads is None:
            return out
        full_out = torch.zeros(B, n_heads, lq, head_dim, dtype=out.dtype, device=out.device)
        return full_out.scatter(1, heads[:, :, None, None].expand(-1, -1, lq, head_dim), out)

    def _needs_importance(self, layer: int) -> bool:
        """Whether this call's attention probabilities feed an importance score: the cascade's token
        importance up to the last layer that prunes tokens, or the KV budget's eviction score."""
        if self._needs_token_importance and not self.prefilled and layer <= self.last_token_layer:
            return True
        return self.cache is not None and self.recipe.has_kv_budget and self.recipe.score in ("spatten", "h2o",
                                                                                                "instant")

    def _track_cache_importance(self, layer: int, received: torch.Tensor) -> None:
        """``received`` (B, Lk): the attention each cached key got in this call."""
        score = self.recipe.score
        if score == "spatten":  # one score per token (by position) over layers, heads and decode steps
            positions = self.cache.cached_positions(layer)
            size = int(positions.max()) + 1
            if self.position_importance is None:
                self.position_importance = torch.zeros(received.shape[0], size, dtype=received.dtype)
            elif self.position_importance.shape[1] < size:
                self.position_importance = torch.nn.functional.pad(
                    self.position_importance, (0, size - self.position_importance.shape[1]))
            self.position_importance.scatter_add_(1, positions.cpu(), received.cpu())
        elif score in ("h2o", "instant"):
            previous = self.layer_importance.get(layer) if score == "h2o" else None
            self.layer_importance[layer] = _accumulate(previous, received)

    def begin_forward(self, cache) -> None:
        self.cache = cache

    def end_forward(self, cache) -> None:
        """After each decoder forward: the prompt is done; keep every layer's cache within the KV budget."""
        self.iteration += 1
        if cache is None:
            return
        if not self.prefilled:
            self.prefilled = True
            if self.recipe.has_kv_budget and self.kv_budget is None:  # a caller may set it (lm stream)
                self.kv_budget = self.recipe.kv_budget_tokens(int(cache.next_position.max()))
        if self.kv_budget is None:
            return
        evicted = False
        # Evict in chunks: a layer over the budget drops to budget - slack, so the compaction (a copy of
        # the whole layer cache) runs once every ``slack`` steps instead of at every step. The cache
        # never holds more than the budget after a forward either way.
        slack = int(self.kv_budget * self.evict_slack) if self.kv_budget >= CHUNKED_EVICTION_MIN_BUDGET else 0
        target = self.kv_budget - slack
        for layer in range(cache.n_layers):
            if cache.lengths[layer] > self.kv_budget:
                self._evict(cache, layer, target)
                evicted = True
        if evicted and self.trace_calls:  # the budget's top-k, after the last layer, for the next step
            self.trace_calls[-1]["topk"] = target

    def _evict(self, cache, layer: int, budget: int) -> None:
        """Compact one layer's cache to ``budget`` tokens: sinks and recent tokens, then the most important."""
        recipe = self.recipe
        valid = cache.valid[layer][:, : cache.lengths[layer]]
        positions = cache.cached_positions(layer)
        sink, recent = kv_protected(recipe, budget)
        protected = edge_token_mask(valid, first=sink, last=recent)
        if recipe.score == "spatten":
            scores = self.position_importance.to(positions.device).gather(1, positions)
        elif recipe.score in ("h2o", "instant"):
            scores = self.layer_importance[layer]
        elif recipe.score == "random":
            scores = torch.rand(positions.shape, generator=self.generator).to(positions.device)
        else:  # streaming: only sinks and the recent window
            scores = torch.zeros(positions.shape, device=positions.device)
        selection = select_tokens_to_keep(scores, budget, protected, valid)
        index = selection.index
        if layer in self.layer_importance:
            self.layer_importance[layer] = gather_tokens(self.layer_importance[layer], index)
        cache.compact(layer, index)

    def _trace(self, layer, heads, lq, lk, head_dim, key_padding_mask, causal, stats) -> None:
        """Record what the first input of the batch did in this call (one entry per call)."""
        n_keys = int(key_padding_mask[0].sum()) if key_padding_mask is not None else lk
        queries = n_keys if (lq == lk and key_padding_mask is not None) else lq
        if layer == 0:
            start = int(self.cache.next_position[0]) if self.cache is not None else 0
            self.sequence_length = start + queries
        keys = [n_keys - (queries - 1 - i) if causal else n_keys for i in range(queries)]
        lsb = getattr(self, "_last_needs_lsb", None)
        hdp = getattr(self, "_last_hdp", None)
        if hdp is not None:  # HDP: per head, the share of pairs its blocks kept, and which heads survived
            share = (hdp.pairs_kept[0].double() / hdp.pairs_valid[0].double().clamp(min=1)).tolist()
            hdp_heads = {"kept_share": share, "head_kept": hdp.head_kept[0].tolist()}
        else:
            hdp_heads = None
        self._last_hdp = None
        self.trace_calls.append({
            "iteration": self.iteration, "layer": layer, "D": head_dim, "L": self.sequence_length,
            "heads": heads[0].tolist() if heads is not None else list(range(self.shape.heads)),
            "keys_per_query": keys,
            "needs_lsb": lsb[0, :, -queries:].tolist() if lsb is not None and self.recipe.quant else None,
            "topk": None,
            "hdp": hdp_heads,
        })
        self._last_needs_lsb = None

    @property
    def _needs_token_importance(self) -> bool:
        return self.recipe.prunes_tokens and self.recipe.score != "random"

    def _probs(self, q, k, scale, mask) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(probabilities, rows that needed their LSBs (B, H, Lq) or None, full QK^T passes run)."""
        quant = self.recipe.quant
        if quant is None:
            return _probs(q, k, scale, mask), None, 1
        if not quant.progressive:
            return quantized_attention_probs(q, k, scale, quant.bits, mask).nan_to_num(0.0), None, 1
        result = progressive_attention_probs(q, k, scale, quant.bits, quant.lsb_bits, quant.threshold, mask)
        self._last_needs_lsb = result.needs_lsb
        return result.probs.nan_to_num(0.0), result.needs_lsb, 1 + int(result.rows_needing_lsb > 0)

    def _count_bits(self, stats: LayerStats, q, k, mask, query_mask, needs_lsb, fetched_v) -> None:
        """Q, K and V bits fetched in this call and the same rows at 16 bits (``runtime/summary.py``)."""
        quant = self.recipe.quant
        widths = {} if quant is None else {"key_bits": quant.bits, "lsb_bits": quant.lsb_bits,
                                           "value_bits": quant.total_bits}  # V is quantized at M + L
        counts = bits_fetched(q, k, **widths, mask=mask, query_mask=query_mask, needs_lsb=needs_lsb,
                              fetched_values=fetched_v)
        for name, n in counts.items():
            setattr(stats, name, getattr(stats, name) + n)

    # ------------------------------------------------------------------ between layers
    def _plan_tokens(self, key_padding_mask: torch.Tensor | None, batch: int, length: int) -> None:
        """Per row, how many tokens live after each layer (length-adaptive: by each row's real length)."""
        real = key_padding_mask.sum(-1).cpu() if key_padding_mask is not None else torch.full((batch,), length)
        per_row = [self.recipe.token_keep_schedule(self.shape.layers, max(1, int(n))) for n in real]
        self.token_keep_after = [
            torch.stack([keep_counts(per_row[b][layer], real[b : b + 1])[0] for b in range(batch)])
            for layer in range(self.shape.layers)
        ]
        alive = [real.long(), *self.token_keep_after]
        pruning = [i for i in range(self.shape.layers) if bool((alive[i + 1] < alive[i]).any())]
        self.last_token_layer = max(pruning, default=-1)  # importance is needed up to this layer only

    def between_layers(self, layer, hidden, keep):
        if self.recipe.prunes_heads:
            self._prune_heads(layer)
        if self.token_keep_after is None or self.prefilled:
            return hidden, keep
        valid = keep.get("mask")
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        target = self.token_keep_after[layer].to(hidden.device)
        if bool((valid.sum(-1) <= target).all()):
            return hidden, keep
        importance = self.token_importance
        if self.recipe.score == "random" or importance is None:
            importance = torch.rand(hidden.shape[:2], generator=self.generator).to(hidden.device)
        protected = edge_token_mask(valid, first=self.protect_first, last=self.protect_last)
        selection = select_tokens_to_keep(importance, target, protected, valid)
        if self.trace_calls:
            self.trace_calls[-1]["topk"] = int(selection.mask[0].sum())
        if self.keep_pruned_states and "pos" in keep:
            kept = torch.zeros_like(valid).scatter(1, selection.index, selection.mask)
            self.pruned_states.append((hidden, keep["pos"], valid & ~kept))
        hidden = gather_tokens(hidden, selection.index)
        keep = {name: gather_tokens(t, selection.index) for name, t in keep.items()}
        keep["mask"] = selection.mask & gather_tokens(valid, selection.index)
        if self.token_importance is not None:
            self.token_importance = gather_tokens(self.token_importance, selection.index)
        return hidden, keep

    def _prune_heads(self, layer: int) -> None:
        n_keep = self.head_keep_after[layer]
        alive = self.head_index.shape[1] // self.group_size if self.head_index is not None else None
        units = self.shape.heads // self.group_size
        if n_keep >= (alive if alive is not None else units) or self.head_importance is None:
            return
        importance = self.head_importance.clone()
        if self.head_index is not None:  # cascade: a pruned head never comes back
            dead = torch.ones_like(importance, dtype=torch.bool).scatter(1, self.head_index, False)
            importance = importance.masked_fill(dead, float("-inf"))
        self.head_index = select_heads_to_keep(importance, n_keep, self.group_size)
        plan = HeadPlan.make(self.head_index, self.shape.heads, self.shape.kv_heads, self.shape.head_dim)
        # rows keeping different heads may leave none pruned in every row: then project all as usual
        self._head_plan = plan if plan.projected.numel() < self.shape.heads else None

    def head_plan(self) -> HeadPlan | None:
        self._plan_given = self._head_plan  # the work counter counts the projections the model ran
        return self._head_plan

    def final_states(self, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        """The last hidden state of every original token: survivors from ``hidden``, pruned tokens from
        the layer where they left. Returns (hidden (B, L0, d), mask (B, L0)) in original token order."""
        if not self.pruned_states or "pos" not in keep:
            return hidden, keep["mask"]
        first_hidden, first_pos, first_valid = self.pruned_states[0]
        B, L0 = first_pos.shape
        full = torch.zeros(B, L0, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        mask = torch.zeros(B, L0, dtype=torch.bool, device=hidden.device)
        for states, pos, left in [*self.pruned_states, (hidden, keep["pos"], keep["mask"])]:
            rows, cols = left.nonzero(as_tuple=True)
            full[rows, pos[rows, cols]] = states[rows, cols]
            mask[rows, pos[rows, cols]] = True
        return full, mask

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Per-layer tokens and heads alive, LSB fraction and bits, as plain numbers for JSON."""
        return summarize(self.layer_stats, quant=self.recipe.quant is not None, value=self.recipe.value is not None,
                         hdp=self.hdp is not None)

    def count_lm_head(self, hidden, mask, last_only) -> None:
        """As ``RunContext.count_lm_head``; without token pruning a dense run would compute the logits
        of every real token that entered the forward."""
        real, computed = self._lm_head_positions(hidden, mask, last_only)
        self.work.add_lm_head(real, computed, real if last_only else self._forward_tokens)


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0)  # padding queries see no key: rows of 0, not NaN


def _accumulate(cumulative: torch.Tensor | None, received: torch.Tensor) -> torch.Tensor:
    """``cumulative`` + ``received`` (B, Lk); a shorter ``cumulative`` (new decode keys) is zero-extended."""
    return accumulate_token_importance(cumulative, received[:, None, None, :])


def _gather_heads(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 1, heads[:, :, None, None].expand(-1, -1, t.shape[2], t.shape[3]))


def _hdp_qk_passes(config: HDPConfig) -> int:
    """Full-rectangle QK^T matmuls our HDP emulation runs (``prune/hdp``): the integer pass, the
    approximate scores (integer + two cross terms, + the fraction x fraction term without approx)
    and, with approx, the near-zero count."""
    return 1 + (3 if config.approx else 4) + (1 if config.approx and config.near_zero else 0)


def _hdp_config(recipe: Recipe) -> HDPConfig | None:
    if recipe.block is None and recipe.block_sparsity is None and recipe.hdp_head is None and recipe.fixed is None:
        return None
    int_bits, frac_bits = recipe.fixed or (8, 8)
    return HDPConfig(
        int_bits=int_bits,
        frac_bits=frac_bits,
        block_size=recipe.block_size or 2,
        block_ratio=recipe.block,
        block_sparsity=recipe.block_sparsity,
        head_threshold=recipe.hdp_head,
        approx=recipe.approx,
        block_score=recipe.block_score,
        keep_first_block=recipe.block_keep_first,
    )


def kv_protected(recipe: Recipe, budget: int) -> tuple[int, int]:
    """(sink, recent) tokens protected inside a KV budget. Defaults: 4 sinks (capped at a quarter of the
    budget) and, for streaming, the rest of the budget as the recent window; for the importance-based
    methods a quarter of the budget as recent (the newest tokens have had no time to gather importance)."""
    sink = recipe.sink if recipe.sink is not None else min(4, budget // 4)
    if recipe.recent is not None:
        recent = recipe.recent
    elif recipe.score == "streaming":
        recent = budget - sink
    else:
        recent = max(1, budget // 4)
    return sink, min(recent, budget - sink)


def make_context(recipe: Recipe | str | None, model, **kwargs) -> RunContext:
    """The context a forward pass of ``model`` runs under for ``recipe`` (dense: a plain RunContext)."""
    if recipe is None or isinstance(recipe, str):
        recipe = Recipe.parse(recipe or "")
    if recipe.is_dense:
        return RunContext()
    shape = cost_shape(model)
    recipe.validate_for(shape.layers, shape.heads, shape.kv_heads)
    if shape.causal:
        kwargs.setdefault("protect_first", 0)
        kwargs.setdefault("protect_last", 1)
    return PruningContext(recipe, shape, **kwargs)

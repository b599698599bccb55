"""Cascade head pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-B, Algorithm 2): ``head=K`` or
``head_schedule=I:F/...``, and ``head_unit=query|kv``.

A head's importance is the sum of |attention_out| over its queries and features, accumulated across
layers; after each pruning layer the least important heads are dropped for good. Pruned heads are
gathered out of the attention (and the models skip their Q/K/V rows and output columns, through the
run's head plan). Under GQA, ``head_unit=query`` prunes query heads (their KV group is still fetched
while one of its query heads lives); ``head_unit=kv`` prunes whole KV groups (what saves KV bytes).
Cost: the heads computed and projected, counted by the run's work counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.heads import accumulate_head_importance, select_heads_to_keep
from dynaprune.prune.technique import Stage, Technique

HEAD_UNITS = ("query", "kv")


@dataclass(frozen=True)
class HeadPruning(Technique):
    """``head``: fraction of head units alive at the end; ``head_schedule``: literal per-layer form;
    ``head_unit``: what a unit is under grouped-query attention (identical for multi-head attention)."""

    head: float | None = None
    head_schedule: K.Schedule | None = None
    head_unit: str = "query"

    role = "heads"
    keys = (
        K.Key("head", K.parse_float, K.ratio),
        K.Key("head_schedule", K.parse_schedule, K.schedule, json="schedule"),
        K.Key("head_unit", K.parse_word, K.choice(*HEAD_UNITS), default="query"),
    )
    exports = ("head_keep_schedule", "head_units", "prunes_heads")

    def check(self) -> None:
        if self.head is not None and self.head_schedule is not None:
            raise K.err("head_schedule", "set either head or head_schedule, not both")
        if self.head_unit != "query" and not self.prunes_heads:
            raise K.err("head_unit", "head_unit=kv needs head or head_schedule")

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        if self.head_schedule is not None:
            K.step_schedule("head_schedule", self.head_schedule, n_layers)

    @property
    def prunes_heads(self) -> bool:
        return self.head is not None or self.head_schedule is not None

    def head_keep_schedule(self, n_layers: int, n_heads: int) -> list[int]:
        """Number of head units alive after each layer (entry i = after layer i). Non-increasing.

        ``n_heads`` counts units as ``head_unit`` defines them (:meth:`head_units`). ``head=K``: heads are
        pruned in the last third only, layers ``s = max(1, round(2 n_layers / 3))`` to ``n_layers - 1``
        entering with ``K ** ((j - s + 1) / (n_layers - s))`` of the heads, rounded by
        :func:`keep_count`: heads are far less redundant than tokens (the paper prunes 1.1x heads against
        3.8x tokens) and their importance needs several layers to accumulate (the published GPT-2-medium
        trace prunes heads from layer 16 of 24 only). ``head_schedule`` fractions are used literally.
        """
        K.check_layers(n_layers)
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        if self.head_schedule is not None:
            fractions = K.step_schedule("head_schedule", self.head_schedule, n_layers)
        elif self.head is not None:
            start = max(1, round(2 * n_layers / 3))
            end = max(start, n_layers - 1)
            fractions = K.geometric_schedule(self.head, start, end, n_layers)
        else:
            return [n_heads] * n_layers
        return [K.keep_count(f, n_heads) for f in fractions]

    def head_units(self, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """(number of prunable units, query heads per unit) for this model under ``head_unit``."""
        if self.head_unit == "kv":
            return n_kv_heads, n_heads // n_kv_heads
        return n_heads, 1

    def stage(self, run) -> Stage | None:
        return HeadCascadeStage(self, run) if self.prunes_heads else None


class HeadCascadeStage(Stage):
    name = "heads"

    def __init__(self, technique: HeadPruning, run) -> None:
        super().__init__(technique, run)
        shape = run.shape
        units, self.group_size = technique.head_units(shape.heads, shape.kv_heads)
        self.head_keep_after = technique.head_keep_schedule(shape.layers, units)
        self.head_importance: torch.Tensor | None = None  # (B, Hq)
        self.head_index: torch.Tensor | None = None  # (B, Hk) query heads alive, None = all

    def heads(self) -> torch.Tensor | None:
        return self.head_index

    def after_attention(self, layer, out, heads, n_heads, query_mask) -> None:
        per_head = accumulate_head_importance(None, out, query_mask)
        full = torch.zeros(out.shape[0], n_heads, dtype=per_head.dtype, device=per_head.device)
        full = full.scatter(1, heads, per_head) if heads is not None else per_head
        self.head_importance = full if self.head_importance is None else self.head_importance + full

    def between_layers(self, layer, hidden, keep):
        self.prune_heads(layer)
        return hidden, keep

    def prune_heads(self, layer: int) -> None:
        n_keep = self.head_keep_after[layer]
        alive = self.head_index.shape[1] // self.group_size if self.head_index is not None else None
        units = self.run.shape.heads // self.group_size
        if n_keep >= (alive if alive is not None else units) or self.head_importance is None:
            return
        importance = self.head_importance.clone()
        if self.head_index is not None:  # cascade: a pruned head never comes back
            dead = torch.ones_like(importance, dtype=torch.bool).scatter(1, self.head_index, False)
            importance = importance.masked_fill(dead, float("-inf"))
        self.head_index = select_heads_to_keep(importance, n_keep, self.group_size)

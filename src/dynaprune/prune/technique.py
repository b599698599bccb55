"""What a technique is: a frozen dataclass of knobs (its fields are its recipe keys) and, for a run,
a :class:`Stage` whose hooks the run context calls in a fixed order.

Roles (``Technique.role``), in hook order (the order stages run in every hook):

    tokens   token pruner: cascade token pruning (plans and drops tokens between layers)
    heads    head pruner: cascade head pruning (which heads the next attention computes)
    kv       KV budget: decode-time eviction of cached tokens
    scorer   token scorer: attention received -> importance (``score=``; used by tokens and kv)
    probs    probability transform: progressive / static quantization of Q, K, V
    values   value selector: local value pruning (which V rows each query uses)
    kernel   attention kernel: HDP computes the attention of the alive heads itself
    kvstore  K/V storage: quantizes and packs the cached tokens (after the KV budget evicted)

A technique may name roles it cannot compose with (``excludes``); a recipe with both is refused with
one message naming a key of each. See docs/architecture.md for the hooks of one attention call.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import torch

from dynaprune.prune.keys import Key

ROLES = ("tokens", "heads", "kv", "scorer", "probs", "values", "kernel", "kvstore")


class Technique:
    """Base of every technique. Subclasses are ``@dataclass(frozen=True)`` whose field names are their
    recipe keys, listed with their specs in ``keys`` (canonical order)."""

    role: ClassVar[str]
    keys: ClassVar[tuple[Key, ...]]
    excludes: ClassVar[dict[str, str]] = {}  # role -> why the two cannot compose
    exports: ClassVar[tuple[str, ...]] = ()  # methods a Recipe forwards (e.g. token_keep_schedule)

    def __post_init__(self) -> None:
        for key in self.keys:
            value = getattr(self, key.name)
            if value is not None and key.check is not None:
                object.__setattr__(self, key.name, key.check(key.name, value))
        self.check()

    # ------------------------------------------------------------------ recipe side
    def check(self) -> None:
        """Settings of this technique that are each valid but contradict each other."""

    def check_with(self, recipe: Any) -> None:
        """Checks against the other techniques of the recipe (``recipe.key`` reads any key)."""

    def validate_for(self, n_layers: int, n_heads: int, n_kv_heads: int, context_len: int | None) -> None:
        """Checks that need the model shape or the context length."""

    def key_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        """Whether any key differs from its default (a technique left at its defaults is dropped)."""
        values = self.key_values()
        return any(values[k.name] != k.default for k in self.keys)

    # ------------------------------------------------------------------ run side
    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        """Merge this technique's figures of several run summaries (one task run) into ``merged``."""

    def stage(self, run: Any) -> Stage | None:
        """The per-run state and hooks of this technique (None: nothing to do at run time)."""
        return None


class Stage:
    """Hooks of one technique in one run, all no-ops here. ``run`` is the run context: it offers
    ``shape``, ``generator``, ``cache``, ``prefilled``, ``scorer``, ``trace_calls``, ``protect_first``,
    ``protect_last``, ``keep_pruned_states``, ``evict_slack``, ``needs_received(layer)`` and
    ``counts(layer, name)`` (a per-layer dict of this stage's counters)."""

    name: ClassVar[str] = ""
    explicit: ClassVar[bool] = False  # needs per-head explicit attention (probabilities, expanded K/V)
    summary_counts: ClassVar[frozenset[str]] = frozenset()  # groups of summary counts it enables
    wants_probabilities: bool = False  # exact probabilities beside a kernel's own attention (importance)

    def __init__(self, technique: Technique, run: Any) -> None:
        self.technique, self.run = technique, run

    # attention call, in this order
    def before_attention(self, layer: int, key_padding_mask: torch.Tensor | None, batch: int, length: int) -> None:
        """First thing of every call (the token pruner plans its schedule here)."""

    def heads(self) -> torch.Tensor | None:
        """(B, Hk) query heads the next attention computes, None = all."""
        return None

    def queries_keys(self, layer: int, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None,
                     scale: float) -> None:
        """q (B, Hq, Lq, D) and k (B, Hk, Lk, D) of every call, whatever kernel runs (an importance of
        its own next to SDPA's fused kernel, e.g. an observation window)."""

    def key_sizes(self, layer: int) -> torch.Tensor | None:
        """(B, Lk) original tokens each key stands for (token merging: the attention adds log size to
        each key's logits), None: one each."""
        return None

    def needs_received(self, layer: int) -> bool:
        """Whether this call's attention received per key feeds this stage's importance."""
        return False

    def query_weights(self, query_mask: torch.Tensor | None, batch: int, lq: int) -> torch.Tensor | None:
        """Which queries' attention counts in ``received`` (None: keep the real-query mask)."""
        return None

    def attention(self, call: Any) -> tuple[torch.Tensor, int | None] | None:
        """A kernel computing the attention itself: (out, head pairs computed or None); it may set
        ``call.qk_passes`` and ``call.int_pairs`` for the cost accounting."""
        return None

    def probs(self, call: Any) -> torch.Tensor | None:
        """Attention probabilities from q, k (None: the exact softmax); may set ``call.needs_lsb`` and
        ``call.qk_passes``."""
        return None

    def values(self, call: Any, v: torch.Tensor) -> torch.Tensor:
        return v

    def bit_widths(self) -> dict[str, int]:
        """Widths of the Q/K/V fetches it changes (``key_bits``, ``lsb_bits``, ``value_bits``)."""
        return {}

    def combine(self, call: Any, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """probs x V (None: the plain product); may set ``call.fetched_values``."""
        return None

    def received(self, layer: int, received: torch.Tensor) -> None:
        """The attention each key received in this call (B, Lk), when any stage needs it."""

    def after_attention(self, layer: int, out: torch.Tensor, heads: torch.Tensor | None, n_heads: int,
                        query_mask: torch.Tensor | None) -> None:
        """The per-head outputs (B, Hk, Lq, D) of the alive heads."""

    def trace(self, entry: dict, queries: int) -> None:
        """Fill this stage's fields of the workload-trace entry of this call."""

    # between layers and forwards
    def between_layers(self, layer: int, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        return hidden, keep

    def final_states(self, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        return None

    def begin_forward(self, cache: Any) -> None:
        pass

    def end_forward(self, cache: Any) -> None:
        pass

    def summary(self, out: dict, layers: list[int]) -> None:
        """Add this stage's figures to the run summary."""

    def total(self, layers: list[int], counter: str) -> float:
        return sum(self.run.counts(i, self.name).get(counter, 0) for i in layers)

"""What a run cost, from the contexts it ran under: the ``cost`` record the CLI writes, ``generate()``
returns as ``.cost`` and ``embed()`` / ``encode()`` attach to their embeddings. One counting path for
the library and the CLI (FLOPs and K/V bytes from ``runtime/cost.py``, the pruning summary from
``runtime/summary.py``, the KV budget in tokens from the contexts that held one)."""

from __future__ import annotations

from typing import Any

from dynaprune.runtime.attention import RunContext, WorkCounter
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.summary import merge_summaries


def run_cost(model: Any, contexts: list[RunContext]) -> dict:
    """FLOPs kept (and per component), K/V bytes kept (``kv_bytes_kept``, ``kv_bytes_vs_fp16``) and, for a
    pruning recipe, its summary under ``pruning`` (bits fetched, tokens per layer, KV held/evicted).
    Empty when no context counted any work."""
    work = WorkCounter()
    for c in contexts:
        work.merge(c.work)
    cost: dict = work_cost(cost_shape(model), work) if work.tokens else {}
    pruning = merge_summaries(contexts)
    if pruning:
        cost["pruning"] = pruning
    return cost


def kv_budget_tokens(contexts: list[RunContext]) -> int | dict | None:
    """The KV budget in tokens the contexts held the cache to: one number, its range when prompts of
    different lengths gave different budgets, None without a budget."""
    budgets = sorted({c.kv_budget for c in contexts if getattr(c, "kv_budget", None) is not None})
    if not budgets:
        return None
    return budgets[0] if len(budgets) == 1 else {"min": budgets[0], "max": budgets[-1]}


def call_cost(model: Any, contexts: list[RunContext]) -> dict:
    """``run_cost`` plus the figures a caller of one library call asks for first, at the top level:
    ``kv_budget_tokens`` (when a context held a budget) and ``bits_fetched_vs_fp16`` (when counted)."""
    cost = run_cost(model, contexts)
    budget = kv_budget_tokens(contexts)
    if budget is not None:
        cost["kv_budget_tokens"] = budget
    bits = cost.get("pruning", {}).get("bits_fetched_vs_fp16")
    if bits is not None:
        cost["bits_fetched_vs_fp16"] = bits
    return cost

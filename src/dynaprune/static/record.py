"""What an evaluation of a statically pruned checkpoint reports about the pruning, beside its run-time
recipe (issue 18, "results say both"): the ``dynaprune_static`` record's summary (parent, criterion and
ratios, what was removed, parameters, recovery fine-tuning) and the run's FLOPs against the *dense
parent*: ``static_flops_kept`` (the pruned model's dense FLOPs over the parent's, on the same inputs)
and ``flops_kept_vs_parent`` (what the run computed, run-time pruning included, over the parent's).

The parent's dense FLOPs come from the run's own work counter (``runtime/cost.work_cost``: layer 0's
tokens and (query, key) pairs over every layer) with the parent's uniform shape: its layer count
(``parent_layers``, else kept + removed layers), every head and the full FFN width."""

from __future__ import annotations

from dataclasses import replace

SUMMARY_KEYS = ("parent", "parent_layers", "removed_layers", "kept_layers", "removed_heads",
                "removed_ffn_neurons", "nm_zeroed_weights", "note", "params", "params_parent",
                "static_flops_kept_at", "calibration")


def static_record(model) -> dict | None:
    """The ``dynaprune_static`` record a loaded (or just pruned) model carries; None for a plain model."""
    return getattr(getattr(model, "config", None), "static_record", None)


def parent_layers(record: dict) -> int | None:
    if "parent_layers" in record:
        return int(record["parent_layers"])
    if "kept_layers" in record:
        return len(record["kept_layers"]) + len(record.get("removed_layers", []))
    return None


def summary(record: dict) -> dict:
    """The record without bulky or nested parts: the configuration (criterion, ratios, N:M) flattened."""
    out = {"config": record.get("config", {}), **{k: record[k] for k in SUMMARY_KEYS if k in record}}
    if "recovery" in record:
        out["recovery"] = {k: v for k, v in record["recovery"].items() if k != "history"}
    if "previous" in record:
        out["previous"] = summary(record["previous"])
    return out


def eval_record(model, contexts) -> dict | None:
    """The static part of an evaluation's result (None for a model that was not statically pruned)."""
    record = static_record(model)
    if not record:
        return None
    out = summary(record)
    from dynaprune.runtime.attention import WorkCounter
    from dynaprune.runtime.cost import cost_shape, work_cost

    work = WorkCounter()
    for c in contexts:
        work.merge(c.work)
    root = record
    while isinstance(root.get("previous"), dict):  # pruned more than once: against the unpruned original
        root = root["previous"]
    out["flops_vs"] = root.get("parent")
    n_parent = parent_layers(root)
    if not work.tokens or n_parent is None:
        return out
    shape = cost_shape(model)
    if shape.layer_windows is not None:  # sliding-window layers: no parent shape to rebuild here
        return out
    parent = replace(shape, layers=n_parent, layer_heads=None, layer_ffn=None)
    pruned = work_cost(shape, work)
    parent_dense = max(1, work_cost(parent, work)["dense"]["flops"]["total"])
    out["static_flops_kept"] = pruned["dense"]["flops"]["total"] / parent_dense
    out["flops_kept_vs_parent"] = pruned["actual"]["flops"]["total"] / parent_dense
    return out

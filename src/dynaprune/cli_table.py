"""The eval result table of the CLI: the numbers that matter on screen (issue 17 item 4).

One row per result; with a dense reference (``--compare-dense``, sweeps) the dense value and the drop
beside it; K/V bytes kept (``kv_bytes_vs_fp16``) for any recipe with a ``kv`` technique; the protocol
in the title; what a recipe did in words, from the run's own pruning summary ("75% block sparsity"),
beside the raw recipe (a calibrated ``block=0.0123`` says little by itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def protocol_label(task: str, extra: dict) -> str:
    """The task and how it was measured, e.g. ``lm (continue 1536+512)``."""
    protocol = extra.get("protocol")
    if task != "lm" or not protocol:
        return task
    if protocol == "continue":
        return f"lm (continue {extra.get('context', '?')}+{extra.get('continuation', '?')})"
    if protocol == "window":
        return f"lm (window {extra.get('window', '?')})"
    return f"lm ({protocol}{' ' + str(extra['stream_tokens']) if extra.get('stream_tokens') else ''})"


def meaning(record: dict) -> str:
    """What the recipe did, measured: block / head sparsity (HDP), LSB rows (progressive quantization),
    the KV budget in tokens, bits fetched. '-' for a dense run."""
    pruning = (record.get("cost") or {}).get("pruning") or {}
    extra = record.get("extra") or {}
    parts = []
    hdp = pruning.get("hdp")
    if isinstance(hdp, dict) and "block_sparsity" in hdp:
        parts.append(f"{hdp['block_sparsity']:.0%} block sparsity")
        if hdp.get("head_sparsity"):
            parts.append(f"{hdp['head_sparsity']:.0%} heads pruned")
    if "lsb_row_fraction" in pruning:
        parts.append(f"{pruning['lsb_row_fraction']:.1%} rows fetch LSBs")
    budget = extra.get("kv_budget_tokens")
    if isinstance(budget, dict):
        parts.append(f"KV budget {budget['min']}-{budget['max']} tokens")
    elif budget is not None:
        parts.append(f"KV budget {budget} tokens")
    if "bits_fetched_vs_fp16" in pruning:
        parts.append(f"{pruning['bits_fetched_vs_fp16']:.2f} of fp16 bits fetched")
    return ", ".join(parts) or "-"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def result_table(records: list[dict], dense: dict | None = None) -> Table:
    """A table of eval records (``TaskResult.to_json()``) of one model and task; ``dense`` adds the dense
    reference's value and each record's drop (its value minus the dense one)."""
    first = records[0]
    recipes = " / ".join(r.get("recipe") or "dense" for r in records)
    table = Table(title=f"{first['model']} · {protocol_label(first['task'], first.get('extra') or {})} · {recipes}")
    kv = any("kv" in (r.get("recipe") or "") for r in records)
    columns = ["data", "recipe", "n", "metric", "value"]
    columns += ["dense", "vs dense"] if dense is not None else []
    columns += ["FLOPs kept", "attention FLOPs kept"] + (["K/V bytes kept"] if kv else []) + ["what it did", "seconds"]
    for col in columns:
        table.add_column(col)
    for r in records:
        cost, value = r.get("cost") or {}, r["metric"]["value"]
        row = [Path(r["data"]).name, r.get("recipe") or "dense", str(r["n"]), r["metric"]["name"], _number(value)]
        if dense is not None:
            ref = dense["metric"]["value"]
            drop = value - ref if isinstance(value, float | int) and isinstance(ref, float | int) else None
            row += [_number(ref), "n/a" if drop is None else f"{drop:+.4f}"]
        row += [_number(cost.get("flops_kept"), 3) if "flops_kept" in cost else "-",
                _number(cost.get("attention_flops_kept"), 3) if "attention_flops_kept" in cost else "-"]
        if kv:
            row.append(_number(cost.get("kv_bytes_vs_fp16"), 3) if "kv_bytes_vs_fp16" in cost else "-")
        row += [meaning(r), f"{r.get('seconds', 0.0):.1f}"]
        table.add_row(*row)
    return table

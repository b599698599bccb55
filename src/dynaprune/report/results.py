"""Reading results files for the report: schema check, series labels and comparable groups.

Input: JSONL files written by ``dynaprune sweep`` (or JSON files from ``dynaprune eval --json``). A
file of another schema is refused with a message. Rows are grouped so that only comparable numbers
share a figure: same model, task, protocol (``lm``), data file and number of examples.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import SCHEMA, read_results
from dynaprune.report.kv_panel import is_kv_source

HIGHER_IS_BETTER = {"spearman": True, "accuracy": True, "perplexity": False, "rouge_l_f1": True}
SPATTEN_KEYS = ("token", "token_schedule", "head", "head_schedule", "value", "quant", "kv", "kv_tokens")
HDP_KEYS = ("block", "block_sparsity", "hdp_head", "fixed")


def load_rows(paths: list[Path], warn: Callable[[str], None] | None = None) -> list[dict]:
    """Every result row of the files, each tagged with ``_source`` (the file it came from). A folder, a
    file of another kind (a trace CSV, plain text) or a broken line is refused with its line number;
    ``warn`` hears of an incomplete last line that was dropped (a sweep killed mid-write)."""
    rows: list[dict] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise DynapruneError(f"{path} is a folder, expected a results file: give the files, e.g. {path}/*.jsonl")
        if not path.exists():
            raise DynapruneError(f"results file not found: {path}")
        if is_kv_source(path):  # a KV benchmark JSON: drawn by the KV panel (report/kv_panel.py), not a row
            continue
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DynapruneError(f"{path}: not valid JSON ({e})") from None
            except UnicodeDecodeError:
                raise DynapruneError(f"{path}: not a dynaprune result (not UTF-8 text)") from None
            found = obj if isinstance(obj, list) else [obj]
            for row in found:
                if not isinstance(row, dict):
                    raise DynapruneError(f"{path}: not a dynaprune result (expected JSON objects)")
                if "schema" in row and row["schema"] != SCHEMA:
                    raise DynapruneError(
                        f"{path}: results of schema {row['schema']!r}; this dynaprune reads {SCHEMA!r}"
                    )
        elif path.suffix != ".jsonl" and path.stat().st_size:
            raise DynapruneError(f"{path}: not a results file (expected .jsonl from `dynaprune sweep` or .json "
                                 "from `dynaprune eval --json`)")
        else:
            found = read_results(path, warn)
        for row in found:
            if row.get("status") == "failed":  # a sweep point that raised: no number to show
                continue
            if not isinstance(row.get("metric"), dict) or "value" not in row["metric"] or "task" not in row:
                raise DynapruneError(f"{path}: not a dynaprune result (no 'task'/'metric')")
            rows.append({**row, "_source": str(path)})
    return rows


def method_of(recipe: str | None) -> str:
    """A series label from a recipe string: 'dense', a baseline ('h2o', 'random', ...) or the family and
    the techniques on ('spatten token', 'spatten token+head', 'hdp blocks+heads (max)', 'hdp blocks (abs_sum)+spatten
    token')."""
    if not recipe or recipe == "dense":
        return "dense"
    keys = dict(part.split("=", 1) for part in recipe.split(",") if "=" in part)
    if keys.get("score", "spatten") != "spatten":
        return keys["score"]
    # a budget as a share (kv) or a count (kv_tokens) is the same technique: one series
    techniques = "+".join(dict.fromkeys(k.removesuffix("_schedule").removesuffix("_tokens")
                                        for k in keys if k in SPATTEN_KEYS))
    if any(k in keys for k in HDP_KEYS):
        parts = [name for key, name in (("block", "blocks"), ("block_sparsity", "blocks"), ("hdp_head", "heads"))
                 if key in keys]
        parts += ["approx"] if keys.get("approx") == "on" else []
        hdp = "hdp " + "+".join(dict.fromkeys(parts)) if parts else "hdp fixed-point"
        if "blocks" in parts:  # the block importance changes the curve completely (prune/hdp/)
            hdp += f" ({keys.get('block_score', 'max')})"
        return hdp + (f"+spatten {techniques}" if techniques else "")
    return f"spatten {techniques}" if techniques else "spatten"


@dataclass
class Group:
    """Results that share a figure: same model, task, protocol (lm) or probe size (classify), data and n."""

    model: str
    task: str
    protocol: str | None
    data: str
    n: int | str
    rows: list[dict] = field(default_factory=list)

    @property
    def title(self) -> str:
        task = self.task + (f" ({self.protocol})" if self.protocol else "")
        return f"{self.model} · {task} · {self.data} (n={self.n})"

    @property
    def slug(self) -> str:
        parts = [self.model, self.task, self.protocol or "", Path(self.data).stem, str(self.n)]
        return "-".join(p for p in parts if p).replace("/", "_").replace(" ", "_")

    @property
    def dense(self) -> dict | None:
        return next((r for r in self.rows if method_of(r.get("recipe")) == "dense"), None)


def _order(row: dict) -> tuple:
    """Dense first, then by method, most work kept first."""
    method = method_of(row.get("recipe"))
    return method != "dense", method, -float((row.get("cost") or {}).get("flops_kept", 1.0)), row.get("recipe") or ""


def group_rows(rows: list[dict]) -> list[Group]:
    """Comparable groups by model and task, the fullest first; a run in several files (same run_id)
    counts once (the last)."""
    unique: dict[str, dict] = {}
    for i, row in enumerate(rows):
        unique[row.get("run_id") or f"row{i}"] = row
    groups: dict[tuple, Group] = {}
    members: dict[tuple, list[dict]] = defaultdict(list)
    for row in unique.values():
        extra = row.get("extra") or {}
        protocol = extra.get("protocol") if row["task"] == "lm" else None
        if extra.get("n_train"):  # a probe trained on fewer examples is another baseline
            protocol = f"probe on {extra['n_train']}"
        data = Path(str(row.get("data") or "?")).name
        key = (row.get("model", "?"), row["task"], protocol, data, row.get("n", "?"))
        groups.setdefault(key, Group(*key))
        members[key].append(row)
    for key, group in groups.items():
        group.rows = sorted(members[key], key=_order)
    return sorted(groups.values(), key=lambda g: (g.model, g.task, -len(g.rows), g.title))  # fullest first

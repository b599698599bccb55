"""The report: one self-contained HTML page (figures embedded) and a Markdown twin, from results files.

Input: JSONL files written by ``dynaprune sweep`` (or JSON files from ``dynaprune eval --json``).
Per (model, task): a trade-off figure (metric vs fraction of FLOPs kept, dense point and every
method on the same axes) and a table (method, recipe, metric, drop vs dense, work kept); then the
provenance of every number (command, versions, date).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.eval.sweep import SCHEMA, read_results  # noqa: E402

HIGHER_IS_BETTER = {"spearman": True, "accuracy": True, "perplexity": False, "rouge_l": True}


def load_rows(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        if not path.exists():
            raise DynapruneError(f"results file not found: {path}")
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DynapruneError(f"{path}: not valid JSON ({e})") from None
            for row in obj if isinstance(obj, list) else [obj]:
                if "schema" in row and row["schema"] != SCHEMA:
                    raise DynapruneError(
                        f"{path}: results of schema {row['schema']!r}; this dynaprune reads {SCHEMA!r}"
                    )
                if "metric" not in row or "task" not in row:
                    raise DynapruneError(f"{path}: not a dynaprune result (no 'task'/'metric')")
                rows.append(row)
        else:
            rows.extend(read_results(path))
    return rows


SPATTEN_KEYS = ("token", "token_schedule", "head", "head_schedule", "value", "quant", "kv")
HDP_KEYS = ("block", "block_sparsity", "hdp_head", "fixed")


def method_of(recipe: str | None) -> str:
    """A series label from a recipe string: 'dense', a baseline ('h2o', 'random', ...) or the family and
    the techniques on ('spatten token', 'spatten token+head', 'hdp', 'hdp+spatten token')."""
    if not recipe or recipe == "dense":
        return "dense"
    keys = dict(part.split("=", 1) for part in recipe.split(",") if "=" in part)
    if keys.get("score", "spatten") != "spatten":
        return keys["score"]
    techniques = "+".join(dict.fromkeys(k.removesuffix("_schedule") for k in keys if k in SPATTEN_KEYS))
    if any(k in keys for k in HDP_KEYS):
        return "hdp" + (f"+spatten {techniques}" if techniques else "")
    return f"spatten {techniques}" if techniques else "spatten"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def tradeoff_figure(title: str, rows: list[dict], x_key: str = "flops_kept") -> str:
    """Metric vs fraction of work kept, one series per method, dense as a star. Returns base64 PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for row in rows:
        x = (row.get("cost") or {}).get(x_key, 1.0)
        by_method[method_of(row.get("recipe"))].append((x, row["metric"]["value"], row.get("recipe") or "dense"))
    for method, points in sorted(by_method.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if method == "dense":
            ax.scatter(xs, ys, marker="*", s=160, color="black", label="dense", zorder=5)
        else:
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel({"flops_kept": "fraction of FLOPs kept (real, gathered work)",
                   "kv_bytes_kept": "fraction of K/V bytes kept"}.get(x_key, x_key))
    ax.set_ylabel(rows[0]["metric"]["name"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    dense = next((r for r in rows if method_of(r.get("recipe")) == "dense"), None)
    name = rows[0]["metric"]["name"]
    sign = 1 if HIGHER_IS_BETTER.get(name, True) else -1
    header = ["method", "recipe", name, "drop vs dense", "FLOPs kept", "n"]
    body = []
    for r in sorted(rows, key=lambda r: (method_of(r.get("recipe")) != "dense", r.get("recipe") or "")):
        value = r["metric"]["value"]
        drop = "" if dense is None else f"{sign * (dense['metric']['value'] - value):+.4f}"
        kept = (r.get("cost") or {}).get("flops_kept")
        body.append([method_of(r.get("recipe")), r.get("recipe") or "dense", f"{value:.4f}", drop,
                     "" if kept is None else f"{kept:.3f}", str(r.get("n", ""))])
    return header, body


def build_report(paths: list[Path], out_dir: Path, command: str = "") -> Path:
    """Write report.html and report.md into ``out_dir``; returns the HTML path."""
    rows = load_rows(paths)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row.get("model", "?"), row["task"])].append(row)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>dynaprune report</title><style>"
         "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
         "text-align:right}th{background:#f3f3f3}img{max-width:100%}code{background:#f6f6f6}"
         "</style></head><body><h1>dynaprune report</h1>",
         f"<p>{len(rows)} result(s) from {len(paths)} file(s), built {now}.</p>"]
    md = ["# dynaprune report", "", f"{len(rows)} result(s) from {len(paths)} file(s), built {now}.", ""]
    if not rows:
        h.append("<p><b>No results:</b> the given results files are empty. Run a sweep first.</p>")
        md.append("**No results:** the given results files are empty. Run a sweep first.")
    figures = out_dir / "figures"
    for (model, task), group in sorted(groups.items()):
        title = f"{model} · {task}"
        png = tradeoff_figure(title, group)
        figures.mkdir(parents=True, exist_ok=True)
        fig_name = f"{model}-{task}.png".replace("/", "_")
        (figures / fig_name).write_bytes(base64.b64decode(png))
        header, body = _table(group)
        h.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)} trade-off' "
                 f"src='data:image/png;base64,{png}'>")
        h.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                 + "</table>")
        md += [f"## {title}", "", f"![{title}](figures/{fig_name})", "",
               "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in body] + [""]
    versions = sorted({json.dumps(r.get("versions", {}), sort_keys=True) for r in rows})
    h.append("<h2>Provenance</h2><ul>" + (f"<li>command: <code>{html.escape(command)}</code></li>" if command else "")
             + "".join(f"<li>{html.escape(Path(p).name)}</li>" for p in paths)
             + "".join(f"<li>versions: <code>{html.escape(v)}</code></li>" for v in versions) + "</ul></body></html>")
    md += ["## Provenance", ""] + ([f"- command: `{command}`"] if command else [])
    md += [f"- results: {Path(p).name}" for p in paths] + [f"- versions: `{v}`" for v in versions]
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / "report.html"
    for path, text in ((html_path, "\n".join(h)), (out_dir / "report.md", "\n".join(md) + "\n")):
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    return html_path

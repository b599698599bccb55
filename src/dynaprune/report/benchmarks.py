"""The committed benchmark results in the report: the KV trade-off of both decoders side by side, the
prefill curve, and static pruning's measured speed.

These figures are not re-run by the report: they are read from the JSON files ``benchmarks/`` wrote
(``benchmarks/results/``), each with the command and machine load it records, and the report says so.
Only files that exist are used; a file of an unexpected shape gives no point rather than a wrong one.

- KV (issues 14 and 20): one panel per model (``report/kv_panel.py``) from the model's KV files:
  SmolLM2-135M ``kv-bytes.json``, ``kv-evict-test.json``, ``kv-quant.json`` and the peers
  (``peers/kvpress.json``); Gemma 3 270M ``gemma3-kv.json`` and its peers ``gemma3-peers.json``.
- Prefill (issue 16): perplexity cost against the prefill FLOPs kept (WikiText-2 VALID, both models:
  ``prefill-search.json`` and ``gemma3-prefill.json``), and the measured time-to-first-token speed-up
  against the same cost (``prefill.json``).
- Static pruning (issue 18): ``static.json``, wall-clock speed-up of each pruned checkpoint over its
  dense parent next to its FLOP ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynaprune.report.figures import png_bytes, pyplot

KV_FILES = {
    "SmolLM2-135M": ["kv-bytes.json", "kv-evict-test.json", "kv-quant.json", "peers/kvpress.json"],
    "Gemma 3 270M": ["gemma3-kv.json", "gemma3-peers.json"],
}


def _read(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def kv_files(results_dir: Path) -> dict[str, list[Path]]:
    """Per model, the KV benchmark files that exist."""
    found = {model: [results_dir / name for name in names if (results_dir / name).is_file()]
             for model, names in KV_FILES.items()}
    return {model: paths for model, paths in found.items() if paths}


def prefill_points(results_dir: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Series name -> [(x, perplexity cost %, label)]: FLOPs kept (VALID) per model, and the measured
    time-to-first-token speed-up (SmolLM2) against its VALID cost."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    search = _read(results_dir / "prefill-search.json") or {}
    for row in search.get("grid", []) if isinstance(search.get("grid"), list) else []:
        x, y = _num(row.get("flops_kept")), _num(row.get("perplexity_cost"))
        if x is not None and y is not None:
            out.setdefault("SmolLM2-135M, VALID (FLOPs kept)", []).append((x, 100 * y, str(row.get("recipe", ""))))
    gemma = _read(results_dir / "gemma3-prefill.json") or {}
    for name, row in (gemma.get("rows") or {}).items() if isinstance(gemma.get("rows"), dict) else ():
        x = _num(row.get("flops_kept")) if isinstance(row, dict) else None
        y = _num(row.get("valid_cost")) if isinstance(row, dict) else None
        if x is not None and y is not None:
            out.setdefault("Gemma 3 270M, VALID (FLOPs kept)", []).append((x, 100 * y, name))
    timed = _read(results_dir / "prefill.json") or {}
    rows = timed.get("rows", timed.get("recipes"))
    for row in rows if isinstance(rows, list) else []:
        x = _num(row.get("speedup"))
        y = _num(row.get("valid_perplexity_cost", row.get("perplexity_cost")))
        if x is not None and y is not None:
            out.setdefault("SmolLM2-135M, time to first token (speed-up)", []).append(
                (x, 100 * y, str(row.get("name", row.get("recipe", "")))))
    return out


def prefill_png(points: dict[str, list[tuple[float, float, str]]]) -> bytes:
    """Left: cost vs FLOPs kept (both models); right: cost vs measured TTFT speed-up."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, pts in points.items():
        ax = right if "speed-up" in name else left
        pts = sorted(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=name)
    left.set_xlabel("prefill FLOPs kept vs dense")
    right.set_xlabel("time to first token: speed-up vs dense (measured, same process)")
    for ax in (left, right):
        ax.set_ylabel("perplexity cost of the continuation (%)")
        ax.set_yscale("symlog", linthresh=2)
        ax.axhline(2, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3, which="both")
        if ax.has_data():
            ax.legend(fontsize=7)
    return png_bytes(fig)


def static_rows(results_dir: Path) -> tuple[list[str], list[list[str]]]:
    """One row per (model, case, pruned variant) of ``static.json``."""
    obj = _read(results_dir / "static.json") or {}
    body = []
    for model in ("minilm", "smollm2"):
        cases = obj.get(model)
        for case, data in cases.items() if isinstance(cases, dict) else ():
            for name, v in (data.get("variants") or {}).items() if isinstance(data, dict) else ():
                speedup, ratio = _num(v.get("speedup")), _num(v.get("flop_ratio"))
                if name == "dense" or speedup is None or ratio is None:
                    continue
                body.append([model, case, name, f"{speedup:.2f}", f"{ratio:.2f}", f"{speedup / ratio:.2f}"])
    return ["model", "case", "checkpoint", "speed-up", "FLOP ratio", "speed-up / FLOP ratio"], body


def provenance(path: Path) -> str:
    """``file: command (load)`` for the caption of a figure drawn from ``path``."""
    obj = _read(path) or {}
    command = obj.get("command") or next((c.get("command", c) if isinstance(c, dict) else c
                                          for c in obj.get("commands", []) or []), None)
    load = obj.get("load")
    text = f"`{path.name}`: `{command}`" if command else f"`{path.name}`"
    return text + (f" (load: {str(load).split('load average:')[-1].strip()})" if load else "")

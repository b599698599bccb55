"""The KV trade-off panel (issue 14 item 4): perplexity against ``cost.kv_bytes_vs_fp16``, our curves and
the peers' points on one bytes axis, read from the benchmark JSON files.

Sources (any mix, given to ``dynaprune report`` next to the sweep results):

- ours, ``{"runs": {split: {recipe: row}}}`` (``benchmarks/kv_quant.py``, ``kv_evict_grid.py``) or
  ``{"split": s, "rows": {recipe: row}}`` (``benchmarks/kv_bytes.py``); a row has ``perplexity`` and
  ``kv_bytes_vs_fp16`` (or ``kv_bytes_kept_vs_fp16``). A recipe is drawn in the curve of what it does:
  ``eviction only`` (kv=/kv_tokens=, no bits), ``quantization only`` (kv_bits..., no eviction),
  ``eviction + quantization`` (both) or ``kv_bytes=F``; a curve joins its lower envelope (the best
  perplexity at each bytes or fewer) and every row is a point;
- the peers, ``{"rows": [{"peer": ..., "press": ..., "options": ..., "perplexity": ...}]}``
  (``benchmarks/peers/run_kvpress.py``): kvpress presses, transformers' quantized cache (quanto) and a
  press on it, drawn as points, never joined.

Only rows of one split are drawn (TEST: the split the peers are measured on). A file of this kind that
gives no point (another split, another protocol) is named in the caption.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dynaprune.report.figures import png_bytes, pyplot

SPLIT = "test"
OURS = ("eviction only", "quantization only", "eviction + quantization", "kv_bytes=F")
PEER_MARKERS = {"kvpress": "o", "quantized-cache": "s", "kvpress+quantized-cache": "D"}


@dataclass(frozen=True)
class KVPoint:
    series: str  # one of OURS, or "peer: press" for a peer
    label: str  # recipe, or press (keep, bits)
    kv_bytes: float
    perplexity: float
    source: str


def is_kv_source(path: Path) -> bool:
    """A benchmark JSON this panel reads (not a sweep / eval result): a dict with ``runs`` or ``rows``
    and no ``metric``."""
    if Path(path).suffix != ".json" or not Path(path).is_file():
        return False
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "metric" not in obj and isinstance(obj.get("runs", obj.get("rows")), dict | list)


def series_of(recipe: str) -> str:
    """Which of our curves a recipe belongs to (module docstring)."""
    keys = {item.split("=", 1)[0] for item in recipe.split(",") if item}
    if "kv_bytes" in keys:
        return "kv_bytes=F"
    evicts = bool(keys & {"kv", "kv_tokens"})
    quantizes = bool(keys & {"kv_bits", "kv_key_bits", "kv_value_bits"})
    if evicts and quantizes:
        return "eviction + quantization"
    return "eviction only" if evicts else "quantization only" if quantizes else "dense"


def _our_row(recipe: str, row: dict, source: str) -> KVPoint | None:
    if not isinstance(row, dict) or not isinstance(row.get("perplexity"), int | float):
        return None
    x = row.get("kv_bytes_vs_fp16", row.get("kv_bytes_kept_vs_fp16"))
    if not isinstance(x, int | float) or recipe == "dense":
        return None
    series = series_of(recipe)
    if series == "dense":  # not a recipe of ours (e.g. a note such as "previous: ..."): not drawn
        return None
    return KVPoint(series, recipe, float(x), float(row["perplexity"]), source)


def _peer_row(row: dict, source: str) -> KVPoint | None:
    opts = row.get("options") or {}
    if row.get("split") != SPLIT or not isinstance(row.get("perplexity"), int | float) or row.get("peer") == "dense":
        return None
    if opts.get("kvzip_chat_template"):  # run with the chat template: context tokens left unscored
        return None
    bits = f", {opts['nbits']} bits" if "nbits" in opts else ""
    keep = f" {opts['keep']:g}" if "keep" in opts else ""
    press = row.get("press") or "no press"
    series = f"{row['peer']}: {press}"
    return KVPoint(series, f"{press}{keep}{bits}", float(row["kv_bytes_vs_fp16"]), float(row["perplexity"]), source)


def _spec_row(row: dict) -> dict:
    """A peer row keyed by name with a ``spec`` ({peer, press, keep, bits, split}) in the list rows' shape."""
    spec = row["spec"]
    options = {k: v for k, v in (("keep", spec.get("keep")), ("nbits", spec.get("bits"))) if v is not None}
    return {**row, "peer": spec.get("peer"), "press": spec.get("press"), "split": spec.get("split"),
            "options": options}


def read_points(paths: list[Path]) -> tuple[list[KVPoint], float | None, list[str]]:
    """(points of ``SPLIT``, the dense perplexity found, names of the files that gave no point)."""
    points: dict[tuple[str, str], KVPoint] = {}
    dense: float | None = None
    empty = []
    for path in paths:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        found: list[KVPoint | None] = []
        if isinstance(obj.get("rows"), list):  # the peers
            for row in obj["rows"]:
                if row.get("peer") == "dense" and row.get("split") == SPLIT:
                    dense = float(row["perplexity"])
                found.append(_peer_row(row, str(path)))
        else:
            specs = {k: r for k, r in obj["rows"].items() if isinstance(r, dict) and isinstance(r.get("spec"), dict)
                     } if isinstance(obj.get("rows"), dict) else {}
            for row in specs.values():  # peers keyed by name, each with its spec (benchmarks/gemma3_peers.py)
                found.append(_peer_row(_spec_row(row), str(path)))
                if row["spec"].get("peer") == "dense" and row["spec"].get("split") == SPLIT:
                    dense = float(row["perplexity"])
            tables = obj["runs"].get(SPLIT, {}) if "runs" in obj else obj["rows"] if obj.get("split") == SPLIT else {}
            for recipe, row in tables.items() if isinstance(tables, dict) and not specs else ():
                if recipe == "dense" and isinstance(row, dict) and "perplexity" in row:
                    dense = float(row["perplexity"])
                found.append(_our_row(recipe, row, str(path)))
        kept = [p for p in found if p is not None]
        points.update({(p.series, p.label): p for p in kept})  # a later file's row of the same recipe wins
        if not kept:
            empty.append(Path(path).name)
    return list(points.values()), dense, empty


def lower_envelope(points: list[KVPoint]) -> list[KVPoint]:
    """The points no other point beats on both bytes (fewer or equal) and perplexity, by bytes."""
    out: list[KVPoint] = []
    for p in sorted(points, key=lambda p: (p.kv_bytes, p.perplexity)):
        if not out or p.perplexity < out[-1].perplexity:
            out.append(p)
    return out


def kv_panel_png(points: list[KVPoint], dense: float | None, title: str = "") -> bytes:
    """Perplexity vs K/V bytes (log2 axis): our curves (envelope lines, every point), the peers as markers;
    points above the plot's top (e.g. a 2-bit cache far off) are drawn on the top edge with their value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ys = [p.perplexity for p in points] + ([dense] if dense else [])
    base = dense if dense else min(ys)
    top = min(max(ys), base * 1.35) if ys else 1.0
    by_series: dict[str, list[KVPoint]] = defaultdict(list)
    for p in points:
        by_series[p.series].append(p)

    def draw(p_list: list[KVPoint], **style) -> None:
        for p in p_list:
            y = min(p.perplexity, top)
            ax.scatter([p.kv_bytes], [y], **style)
            if p.perplexity > top:
                ax.annotate(
                    f"{p.perplexity:.1f}", (p.kv_bytes, y), textcoords="offset points", xytext=(4, -10), fontsize=7
                )

    for i, name in enumerate(s for s in OURS if s in by_series):
        colour = colours[i % len(colours)]
        env = lower_envelope(by_series[name])
        ax.plot([p.kv_bytes for p in env], [min(p.perplexity, top) for p in env], color=colour, lw=1.6, label=name)
        draw(by_series[name], color=colour, s=14, alpha=0.6)
    peers = sorted(s for s in by_series if s not in OURS)
    for j, name in enumerate(peers):
        kind = name.split(":")[0]
        draw(
            by_series[name],
            color=colours[(j + 4) % len(colours)],
            marker=PEER_MARKERS.get(kind, "^"),
            s=46,
            edgecolors="black",
            linewidths=0.6,
            label=name,
            zorder=4,
        )
    if dense:
        ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense {dense:.3f}")
    ax.set_xscale("log", base=2)
    if ys:
        ax.set_ylim(base * 0.99, top * 1.01)
    ax.set_xlabel("K/V bytes read for the context, vs a dense fp16 cache (cost.kv_bytes_vs_fp16)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(
        unique.values(),
        unique.keys(),
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.11),
        ncol=3,
        frameon=False,
    )
    if title:
        ax.set_title(title)
    return png_bytes(fig)


def kv_caption(points: list[KVPoint], empty: list[str]) -> str:
    ours = sum(p.series in OURS for p in points)
    text = (
        f"WikiText-2 {SPLIT.upper()}, perplexity vs K/V bytes: {ours} of our rows (lines: the best at each "
        f"bytes or fewer) and {len(points) - ours} peer points (markers). Lower and further left is better."
    )
    if empty:
        text += f" No {SPLIT} point in: {', '.join(empty)}."
    return text


def kv_table(points: list[KVPoint]) -> tuple[list[str], list[list[str]]]:
    """Every point, by series then bytes."""
    rows = sorted(points, key=lambda p: (p.series not in OURS, p.series, p.kv_bytes))
    body = [
        [p.series, p.label, f"{p.kv_bytes:.4f}", f"{p.perplexity:.4f}", Path(p.source).name]
        for p in rows
        if math.isfinite(p.perplexity)
    ]
    return ["curve / peer", "recipe / press", "kv_bytes_vs_fp16", "perplexity", "file"], body


def commands_of(path: Path) -> list[str]:
    """The commands a KV benchmark file says produced it (``command``, ``commands[].command``, ``meta.command``)."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    found = [obj.get("command"), (obj.get("meta") or {}).get("command")]
    found += [c.get("command") if isinstance(c, dict) else c for c in obj.get("commands", [])]
    return [str(c) for c in found if c] or ["(no command recorded)"]

"""The report: one self-contained HTML page (figures embedded) and a Markdown twin, from results files.

Per comparable group of results (same model, task, protocol, data and n; ``report/results.py``):
trade-off curves of the metric against the fraction of FLOPs kept, of attention FLOPs kept, of K/V
bytes kept and of K/V bits fetched (``report/axes.py``, ``report/tradeoff.py``), the tokens and heads alive per layer
(``report/layers.py``) and a table (method, recipe, metric, drop vs dense, work kept, run id). Then
the pruning pictures when asked (``report/pictures.py``), the KV trade-off panel when KV benchmark JSON
files are among the inputs (perplexity vs ``cost.kv_bytes_vs_fp16``, ours and the peers:
``report/kv_panel.py``) and the provenance of every number (``report/provenance.py``). An empty
results set makes a report that says so.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

from dynaprune.report import benchmarks, kv_panel
from dynaprune.report.axes import SHORT, work_axes
from dynaprune.report.labels import merge_duplicates, short_recipe
from dynaprune.report.layers import layers_png
from dynaprune.report.pictures import Picture
from dynaprune.report.provenance import describe_sources, report_build, run_ref
from dynaprune.report.results import HIGHER_IS_BETTER, Group, group_rows, load_rows, method_of
from dynaprune.report.tradeoff import tradeoff_caption, tradeoff_figure

__all__ = ["build_report", "load_rows", "method_of", "table"]

STYLE = (  # tables wrap long recipes and run ids so the page fits a 1400-px window (tests/report/test_browser.py)
    "body{font-family:system-ui,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px;width:100%}td,th{border:1px solid #ccc;"
    "padding:3px 6px;text-align:right}th{background:#f3f3f3}"
    "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}td:nth-child(2){max-width:26em;overflow-wrap:anywhere}"
    "td:last-child{font-size:11px;color:#555;max-width:16em;text-align:left;overflow-wrap:anywhere}"
    "img{max-width:100%;display:block;margin:.5em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
    ".plot{position:relative}.pt{position:absolute;width:12px;height:12px;margin:-6px 0 0 -6px;border-radius:6px}"
    ".pt:hover{outline:2px solid #c00}"
    "code{background:#f6f6f6;overflow-wrap:anywhere}.note{color:#555}"
)
EMPTY = "**No results:** the given results files hold no result lines. Run a sweep first (`dynaprune sweep`)."


def table(group: Group) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a group's table: drop vs dense is positive when the metric got worse."""
    dense = group.dense
    name = group.rows[0]["metric"]["name"]
    sign = 1 if HIGHER_IS_BETTER.get(name, True) else -1
    header = ["method", "recipe", name, "drop vs dense", *SHORT.values(), "n", "run"]
    body = []
    for r in group.rows:
        value = r["metric"]["value"]
        drop = "" if dense is None else f"{sign * (dense['metric']['value'] - value):+.4f}"
        kept = work_axes(r) if r.get("cost") else {}
        body.append([method_of(r.get("recipe")), short_recipe(r.get("recipe")), f"{value:.4f}", drop,
                     *(f"{kept[k]:.3f}" if k in kept else "" for k in SHORT), str(r.get("n", "")), run_ref(r)])
    return header, merge_duplicates(body, len(header) - 1)


class _Page:
    """The HTML page and its Markdown twin, written side by side."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.figures = out_dir / "figures"
        self.h: list[str] = ["<!doctype html><html><head><meta charset='utf-8'><title>dynaprune report</title>"
                             f"<style>{STYLE}</style></head><body><h1>dynaprune report</h1>"]
        self.md: list[str] = ["# dynaprune report", ""]

    def heading(self, text: str, level: int = 2) -> None:
        self.h.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def para(self, markdown: str, html_text: str | None = None) -> None:
        self.h.append(f"<p>{html_text if html_text is not None else _code_spans(markdown)}</p>")
        self.md += [markdown, ""]

    def figure(self, name: str, png: bytes, alt: str, caption: str = "",
               points: list[tuple[float, float, str]] | None = None) -> None:
        """``points``: (left %, top %, text) spots over the image that show ``text`` on hover (no script)."""
        self.figures.mkdir(parents=True, exist_ok=True)
        (self.figures / name).write_bytes(png)
        data = base64.b64encode(png).decode()
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        spots = "".join(f"<span class='pt' style='left:{x:.2f}%;top:{y:.2f}%' title='{html.escape(t, quote=True)}'>"
                        "</span>" for x, y, t in points or [])
        self.h.append(f"<figure><div class='plot'><img alt='{html.escape(alt, quote=True)}' "
                      f"src='data:image/png;base64,{data}'>{spots}</div>{cap}</figure>")
        self.md += [f"![{alt}](figures/{name})", ""] + ([f"*{caption}*", ""] if caption else [])

    def table(self, header: list[str], body: list[list[str]]) -> None:
        self.h.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
                      + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                      + "</table>")
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body] + [""]

    def items(self, lines: list[str]) -> None:
        """A bullet list; each line is Markdown with `code` spans."""
        self.h.append("<ul>" + "".join(f"<li>{_code_spans(line)}</li>" for line in lines) + "</ul>")
        self.md += [f"- {line}" for line in lines] + [""]

    def write(self) -> Path:
        self.h.append("</body></html>")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        html_path = self.out_dir / "report.html"
        for path, text in ((html_path, "\n".join(self.h)), (self.out_dir / "report.md", "\n".join(self.md))):
            _write_atomic(path, text)
        return html_path


def build_report(paths: list[Path], out_dir: Path, command: str = "",
                 pictures: list[Picture] | None = None, benchmarks_dir: Path | None = None) -> Path:
    """Write report.html and report.md (and figures/*.png) into ``out_dir``; returns the HTML path.
    ``benchmarks_dir``: the committed benchmark results (``benchmarks/results``) drawn in their own
    section (``report/benchmarks.py``)."""
    paths = [Path(p) for p in paths]
    kv_paths = [p for p in paths if kv_panel.is_kv_source(p)]
    paths = [p for p in paths if p not in kv_paths]
    rows = load_rows(paths)
    groups = group_rows(rows)
    build = report_build(command)
    page = _Page(Path(out_dir))
    page.para(f"{len(rows)} result(s) from {len(paths)} file(s) in {len(groups)} group(s), built {build['built']}.")
    if not rows and not kv_paths:
        page.para(EMPTY, "<b>No results:</b> the given results files hold no result lines. Run a sweep first "
                  "(<code>dynaprune sweep</code>).")
    if groups:
        page.para("Work kept: FLOPs really done (all, and attention's QK/PV alone), K/V bytes read and K/V "
                  "bits fetched, each as a fraction of "
                  "the dense model on the same inputs (see dynaprune/report/axes.py). Drop vs dense is "
                  "positive when the metric got worse.")
    for group in groups:
        page.heading(group.title)
        png, points = tradeoff_figure(group)
        page.figure(f"{group.slug}-tradeoff.png", png, f"{group.title}: trade-off curves", tradeoff_caption(group),
                    points)
        per_layer = layers_png(group)
        if per_layer is not None:
            page.figure(f"{group.slug}-layers.png", per_layer, f"{group.title}: tokens and heads alive per layer",
                        "Tokens and heads each layer still computes: the earlier a curve falls, the more work "
                        "the later layers skip.")
        page.table(*table(group))
    if pictures:
        page.heading("Pruning pictures")
        page.para("Which tokens each layer computed (grey: pruned), coloured by cumulative importance "
                  "(SpAtten Fig. 22/23); bold labels are the tokens the last layer kept.")
        for picture in pictures:
            page.figure(picture.path.name, picture.path.read_bytes(), f"pruning picture: {picture.path.stem}",
                        picture.caption)
    if kv_paths:
        _kv_section(page, kv_paths)
    if benchmarks_dir is not None and Path(benchmarks_dir).is_dir():
        _benchmarks_section(page, Path(benchmarks_dir))
    _provenance(page, paths, rows, build)
    return page.write()


def _kv_section(page: _Page, kv_paths: list[Path]) -> None:
    """The KV trade-off panel and its table, and where each of its files came from."""
    points, dense, empty = kv_panel.read_points(kv_paths)
    page.heading("KV cache: perplexity vs K/V bytes")
    if points:
        png = kv_panel.kv_panel_png(points, dense, "SmolLM2-135M, continue 1536 + 512, WikiText-2 test")
        caption = kv_panel.kv_caption(points, empty)
        page.figure("kv-bytes-panel.png", png, "KV trade-off: perplexity vs K/V bytes", caption)
        page.table(*kv_panel.kv_table(points))
    else:
        page.para(f"No {kv_panel.SPLIT} rows in the KV files given ({', '.join(p.name for p in kv_paths)}).")
    page.items([f"`{p}`: " + "; ".join(f"`{c}`" for c in kv_panel.commands_of(p)) for p in kv_paths])


def _benchmarks_section(page: _Page, results_dir: Path) -> None:
    """KV of both decoders side by side, the prefill curve and static pruning's speed, from the JSON the
    benchmarks wrote (not re-run here)."""
    page.heading("Benchmark results (committed, not re-run by this report)")
    page.para(f"Read from `{results_dir}`: each figure names the files and the commands that produced them; "
              "speed figures are wall-clock ratios against the dense model in the same process.")
    for model, files in benchmarks.kv_files(results_dir).items():
        points, dense, empty = kv_panel.read_points(files)
        if not points:
            continue
        slug = "".join(c if c.isalnum() else "-" for c in model.lower())
        png = kv_panel.kv_panel_png(points, dense, f"{model}, continue 1536 + 512, WikiText-2 test")
        page.figure(f"bench-kv-{slug}.png", png, f"{model}: perplexity vs K/V bytes",
                    kv_panel.kv_caption(points, empty) + " Sources: "
                    + "; ".join(benchmarks.provenance(p) for p in files))
    prefill = benchmarks.prefill_points(results_dir)
    if prefill:
        files = [results_dir / n for n in ("prefill-search.json", "gemma3-prefill.json", "prefill.json")]
        page.figure("bench-prefill.png", benchmarks.prefill_png(prefill), "prefill pruning: cost vs work and speed",
                    "Perplexity cost of the continuation after a pruned prefill (dotted: 2%), against the prefill "
                    "FLOPs kept (left) and the measured time-to-first-token speed-up (right). Sources: "
                    + "; ".join(benchmarks.provenance(p) for p in files if p.is_file()))
    header, body = benchmarks.static_rows(results_dir)
    if body:
        page.para("Static structured pruning: physically smaller checkpoints (fewer heads, narrower FFN), "
                  "timed against the dense parent. Source: " + benchmarks.provenance(results_dir / "static.json"))
        page.table(header, body)


def _provenance(page: _Page, paths: list[Path], rows: list[dict], build: dict[str, str]) -> None:
    page.heading("Provenance")
    page.items([f"report: `{build['command']}` on {build['built']} (dynaprune {build['dynaprune']}, "
                f"Python {build['python']})"])
    for src in describe_sources(paths, rows):
        page.heading(Path(src.path).name, 3)
        lines = [f"file: `{src.path}` (sha256 {src.sha256}…, {src.rows} result(s))",
                 f"run dates (UTC): {src.dates}"]
        lines += [f"command: `{c}`" for c in src.commands]
        lines += [f"versions: `{v}`" for v in src.versions]
        page.items(lines)
    page.para("Every table row names its run id: the `run_id` of its line in the results file, a hash of "
              "model, task, data, recipe and options (the config line it came from in brackets).")


def _code_spans(markdown: str) -> str:
    """Escape a line and turn its `code` spans into <code> elements."""
    parts = markdown.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

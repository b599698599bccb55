"""CLI commands over many runs and their report: ``demo`` (fetch, the demo sweep, the report),
``sweep`` (a grid of runs, one JSON line each, resumable) and ``report`` (report.html / report.md from
results files). Registered on the app by ``cli.py``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from dynaprune.cli_common import _validate_recipe, console, err_console, status
from dynaprune.cli_eval import run_task
from dynaprune.errors import DynapruneError


def demo(
    config: Path | None = typer.Option(None, help=(
        "the sweep the demo runs, or a list of sweeps ('configs:'); default configs/demo.yaml, "
        "with --full configs/demo-full.yaml")),
    full: bool = typer.Option(False, "--full", help="run every sweep behind the complete curves (hours)"),
    pictures: bool = typer.Option(True, help="draw the pruning pictures into the report"),
    out: Path = typer.Option(Path("report"), help="where the report goes"),
) -> None:
    """The main job: fetch both models, run the demo sweep (dense baselines and a few pruned points),
    print the results and write the report."""
    from dynaprune.eval.sweep import load_config, read_results
    from dynaprune.models.registry import fetch as fetch_model
    from dynaprune.report.build import build_report
    from dynaprune.report.plan import sweep_configs

    t0 = time.perf_counter()
    config = config or Path("configs/demo-full.yaml" if full else "configs/demo.yaml")
    command = f"dynaprune demo --config {config}"
    sweeps = []
    for path in sweep_configs(config):  # every config validated before anything runs
        header, specs = load_config(path, validate_recipe=_validate_recipe)
        sweeps.append((Path(header.get("results", "results/demo.jsonl")), specs))
    for alias in ("minilm-l6", "smollm2-135m"):
        with status(f"fetching {alias}") as say:
            fetch_model(alias, say)
    for results, specs in sweeps:
        _run_specs(specs, results, command)
    wanted = {spec.run_id for _, specs in sweeps for spec in specs}
    files = list(dict.fromkeys(results for results, _ in sweeps))
    rows = [r for results in files for r in read_results(results) if r["run_id"] in wanted and "metric" in r]
    summary = Table(title="dynaprune demo")
    for col in ("model", "task", "recipe", "n", "metric", "value", "FLOPs kept", "seconds"):
        summary.add_column(col)
    for r in rows:
        kept = (r.get("cost") or {}).get("flops_kept")
        summary.add_row(r["model"], r["task"] + (f" ({r['extra'].get('protocol')})" if r["task"] == "lm" else ""),
                        r.get("recipe") or "dense", str(r["n"]), r["metric"]["name"], f"{r['metric']['value']:.4f}",
                        "-" if kept is None else f"{kept:.3f}", f"{r['seconds']:.1f}")
    console.print(summary)
    drawn = _draw_pictures(out) if pictures else None
    committed = Path("benchmarks/results")  # in a checkout: the benchmarks' own results, drawn as committed
    html = build_report(files, out, command=command, pictures=drawn,
                        benchmarks_dir=committed if committed.is_dir() else None)
    console.print(f"results: {', '.join(map(str, files))}\nreport: {html.resolve()}  "
                  f"({time.perf_counter() - t0:.0f}s in all)")


def _draw_pictures(out: Path):
    """The report's pruning pictures (MiniLM sentences, one SmolLM2 generation), into out/figures."""
    from dynaprune.report.pictures import draw_pictures

    with status("pruning pictures") as say:
        return draw_pictures(out / "figures", say=say)


def _run_specs(specs, results: Path, command: str = "") -> int:
    """Run every spec not yet in ``results`` (one model in memory at a time), with a progress bar.
    Each line records the command that ran it and when it finished (the report's provenance)."""
    from datetime import datetime, timezone

    from dynaprune import load
    from dynaprune.eval.sweep import run_sweep

    models: dict[str, object] = {}

    def run(spec) -> dict:
        if spec.model not in models:
            models.clear()
            models[spec.model] = load(spec.model)
        opts = {k: Path(v) if k == "train_data" else v for k, v in spec.options.items()}
        result = run_task(spec.model, spec.task, data=Path(spec.data) if spec.data else None,
                          recipe=spec.recipe, model=models[spec.model], **opts)
        row = result.to_json()
        row["extra"] = {**row.get("extra", {}), **{k: v for k, v in spec.options.items() if k == "protocol"}}
        row["command"] = command
        row["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return row

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task("sweep", total=None)

        def on_start(spec, i: int, n: int) -> None:
            bar.update(task, completed=i, total=n, description=spec.label())
            if not err_console.is_terminal:  # a log shows no bar: one plain line per run
                print(f"sweep: run {i + 1}/{n}: {spec.label()}", file=sys.stderr, flush=True)

        return run_sweep(specs, results, run, on_start)


def sweep(
    config: Path = typer.Argument(..., help="sweep YAML (see configs/)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="results JSONL (default: the config's 'results')"),
    ray: str | None = typer.Option(None, "--ray", help="run the points as Ray tasks: 'local' (a local Ray), "
                                   "'auto' or a cluster's HOST:PORT / ray://HOST:PORT (pip install 'dynaprune[ray]')"),
    workers: int = typer.Option(2, "--workers", help="CPUs of the local Ray (--ray local)", min=1),
) -> None:
    """Run a grid of (model x task x recipe) evaluations; one JSON line per run; resumes where it stopped."""
    from dynaprune.eval.sweep import load_config

    header, specs = load_config(config, validate_recipe=_validate_recipe)
    results = out or (Path(header["results"]) if header.get("results") else None)
    if results is None:
        raise DynapruneError(f"{config}: no 'results:' path in the config and no --out given")
    from dynaprune.user_paths import check_output_file

    check_output_file(results, "--out" if out else f"{config}: results:", example="results.jsonl")
    command = f"dynaprune sweep {config}" + (f" --out {out}" if out else "") + (f" --ray {ray}" if ray else "")
    if ray:
        from dynaprune.eval.sweep_ray import run_sweep_ray

        ran = run_sweep_ray(specs, results, address=None if ray == "local" else ray, workers=workers, command=command,
                            on_done=lambda spec, i, n: err_console.print(f"sweep: {i}/{n} done: {spec.label()}"))
    else:
        ran = _run_specs(specs, results, command)
    print_sweep_tables(results, {spec.run_id for spec in specs})
    console.print(f"{ran} run(s) done, {len(specs) - ran} already in {results}")


def print_sweep_tables(results: Path, wanted: set[str]) -> None:
    """One eval table per (model, task, protocol) of the sweep, with its dense run as the reference."""
    from dynaprune.cli_table import result_table
    from dynaprune.eval.sweep import read_results

    groups: dict[tuple, list[dict]] = {}
    for row in read_results(results):
        if row.get("run_id") in wanted and row.get("status") != "failed":
            key = (row["model"], row["task"], (row.get("extra") or {}).get("protocol"), row.get("data"))
            groups.setdefault(key, []).append(row)
    for rows in groups.values():
        dense = next((r for r in rows if (r.get("recipe") or "dense") == "dense"), None)
        console.print(result_table(rows, dense))


def report(
    results: list[Path] = typer.Argument(..., help="results files (.jsonl from sweep, .json from eval --json)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="output folder"),
    pictures: bool = typer.Option(False, help="also draw the pruning pictures (loads MiniLM and SmolLM2)"),
    benchmarks: Path | None = typer.Option(None, help=(
        "a folder of benchmark results (e.g. benchmarks/results): KV panels of both decoders, the prefill "
        "curve and static pruning's speed, as committed")),
) -> None:
    """Build report.html (self-contained, figures embedded) and report.md from results files."""
    from dynaprune.report.build import build_report, load_rows
    from dynaprune.user_paths import check_output_folder

    check_output_folder(out, "--out")
    # a foreign or broken results file is refused before any picture is drawn
    load_rows(results, warn=lambda msg: err_console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True))
    if benchmarks is not None and not benchmarks.is_dir():
        raise DynapruneError(f"--benchmarks: {benchmarks} is not a folder")
    command = ("dynaprune report " + " ".join(map(str, results)) + (" --pictures" if pictures else "")
               + (f" --benchmarks {benchmarks}" if benchmarks is not None else ""))
    path = build_report(results, out, command=command, pictures=_draw_pictures(out) if pictures else None,
                        benchmarks_dir=benchmarks)
    console.print(f"report: {path.resolve()}")


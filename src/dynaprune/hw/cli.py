"""``dynaprune hw simulate | dse``: run the SpAtten / HDP models on a workload trace (SpAtten CSV schema).

Bad input (a broken trace, an unknown parameter, a bad value) raises ``DynapruneError``; the main CLI
turns it into one line and exit code 2.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dynaprune.errors import DynapruneError
from dynaprune.hw.hdp import simulate_hdp
from dynaprune.hw.params import build_configs, config_class, parse_overrides, split_assignment
from dynaprune.hw.report import SimResult
from dynaprune.hw.spatten import simulate_spatten
from dynaprune.hw.trace import Trace, read_trace
from dynaprune.user_paths import check_output_file

app = typer.Typer(help="Accelerator performance models (SpAtten, HDP) driven by workload traces.",
                  no_args_is_help=True, add_completion=False)
console = Console()

ARCH_HELP = "spatten (SpAtten, HPCA 2021) or hdp (Hybrid Dynamic Pruning co-processor)"
PARAM_HELP = "override a model parameter, e.g. topk_parallelism=32 or energy.dram_pj_per_byte=20 (repeatable)"


def run_model(arch: str, trace: Trace, overrides: dict[str, Any]) -> SimResult:
    cfg, energy = build_configs(arch, overrides)
    if arch == "spatten":
        return simulate_spatten(trace, cfg, energy)
    return simulate_hdp(trace, cfg, energy)


def _write_json(path: Path, payload: Any) -> None:
    from dynaprune.io import write_json_atomic

    try:
        write_json_atomic(path, payload)
    except OSError as e:
        raise DynapruneError(f"cannot write --json {path}: {e.strerror or e}") from None
    console.print(f"json: {path}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@app.command()
def simulate(
    trace: Path = typer.Argument(..., help="workload CSV in the SpAtten schema"),
    arch: str = typer.Option("spatten", "--arch", help=ARCH_HELP),
    param: list[str] = typer.Option([], "--param", "-p", help=PARAM_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write the full result as JSON here"),
    plot: Path | None = typer.Option(None, "--plot", help="write a roofline PNG (Fig. 18 style) here"),
) -> None:
    """Cycles, seconds, DRAM bytes, GFLOP/s, utilisation and energy of one trace on one accelerator."""
    overrides = parse_overrides(arch, param)
    check_output_file(json_path, "--json")  # before simulating: a bad output path must not lose the result
    check_output_file(plot, "--plot")
    tr = read_trace(trace)
    t0 = time.perf_counter()
    result = run_model(arch, tr, overrides)
    wall = time.perf_counter() - t0
    table = Table(title=f"{arch} on {trace.name} ({len(tr)} rows, simulated in {wall:.2f} s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.summary().items():
        table.add_row(k, _fmt(v))
    for k, v in result.extra.items():
        table.add_row(k, _fmt(v))
    console.print(table)
    if json_path is not None:
        _write_json(json_path, {**result.to_json(), "overrides": overrides, "simulation_seconds": wall})
    if plot is not None:
        from dynaprune.hw.roofline import roofline_png

        path = roofline_png([(trace.stem[:40], result)], plot, title=f"{arch} roofline")
        console.print(f"plot: {path}")


def _parse_sweeps(arch: str, sweeps: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for item in sweeps:
        key, raw = split_assignment(item)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise DynapruneError(f"--sweep {key} has no values (use key=v1,v2,...)")
        parse_overrides(arch, [f"{key}={v}" for v in values])  # validates the name and every value
        out.append((key, values))
    return out


@app.command()
def dse(
    trace: Path = typer.Argument(..., help="workload CSV in the SpAtten schema"),
    sweep: list[str] = typer.Option(..., "--sweep", "-s",
                                    help="a parameter and its values, e.g. topk_parallelism=1,2,4,8,16,32,64 "
                                         "(repeatable: the grid of all combinations)"),
    arch: str = typer.Option("spatten", "--arch", help=ARCH_HELP),
    param: list[str] = typer.Option([], "--param", "-p", help=PARAM_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="write every point as JSON here"),
    plot: Path | None = typer.Option(None, "--plot", help="write a speed-up plot (first swept parameter) here"),
) -> None:
    """Design-space exploration (Fig. 19 style): simulate a grid of parameter values; speed-ups vs the first point."""
    config_class(arch)
    fixed = parse_overrides(arch, param)
    check_output_file(json_path, "--json")  # before simulating: a bad output path must not lose the result
    check_output_file(plot, "--plot")
    sweeps = _parse_sweeps(arch, sweep)
    tr = read_trace(trace)
    names = [k for k, _ in sweeps]
    points = []
    for combo in itertools.product(*[vals for _, vals in sweeps]):
        over = {**fixed, **parse_overrides(arch, [f"{k}={v}" for k, v in zip(names, combo, strict=True)])}
        points.append((dict(zip(names, combo, strict=True)), run_model(arch, tr, over)))
    base = points[0][1].cycles
    table = Table(title=f"{arch} design space on {trace.name}")
    for k in names:
        table.add_column(k, justify="right")
    for col in ("cycles", "speed-up", "DRAM MB", "GFLOP/s", "energy mJ"):
        table.add_column(col, justify="right")
    rows = []
    for values, r in points:
        speedup = base / r.cycles
        table.add_row(*[str(values[k]) for k in names], str(r.cycles), f"{speedup:.3f}",
                      f"{r.dram_bytes / 1e6:.2f}", f"{r.gflops:.1f}", f"{r.energy_j['total'] * 1e3:.3f}")
        rows.append({"point": values, "speedup_vs_first": speedup, "result": r.to_json()})
    console.print(table)
    if json_path is not None:
        _write_json(json_path, {"arch": arch, "trace": str(trace), "fixed": fixed, "sweeps": dict(sweeps),
                                "points": rows})
    if plot is not None:
        path = _speedup_plot(names[0], points, base, plot, f"{arch}: {trace.name}")
        console.print(f"plot: {path}")


def _speedup_plot(name: str, points: list[tuple[dict, SimResult]], base: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for values, r in points:
        rest = tuple((k, v) for k, v in values.items() if k != name)
        groups.setdefault(rest, []).append((values[name], base / r.cycles))
    for rest, pts in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in rest) or None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel(name)
    ax.set_ylabel("speed-up vs first point")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path

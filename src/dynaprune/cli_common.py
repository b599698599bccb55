"""What every command module of the CLI shares: the rich consoles (stdout and stderr), a progress bar
and a status spinner, and the argument checks (positive numbers, recipes in sweep configs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)

from dynaprune.errors import DynapruneError

# Wide tables when output goes to a file or a pipe (logs, CI) instead of wrapping at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar driven by ``callback(done, total)``; on a pipe or a log file, plain lines
    instead (``description: done/total``), at most one per ``PLAIN_PROGRESS_SECONDS`` and at the end."""
    if not err_console.is_terminal:
        with plain_progress(description) as update:
            yield update
        return
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


PLAIN_PROGRESS_SECONDS = 10.0


@contextmanager
def plain_progress(description: str, every: float = PLAIN_PROGRESS_SECONDS) -> Iterator[Callable[[int, int], None]]:
    """Progress as plain stderr lines (no terminal to redraw a bar on): the first, then one per ``every``
    seconds, and the last (done == total)."""
    start = time.perf_counter()
    last = [-every]

    def update(done: int, total: int) -> None:
        now = time.perf_counter() - start
        if done < total and now - last[0] < every:
            return
        last[0] = now
        share = f" ({done / total:.0%})" if total else ""
        print(f"{description}: {done}/{total}{share}, {now:.0f}s", file=sys.stderr, flush=True)

    yield update


@contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
    if not err_console.is_terminal:  # a log gets one line instead of a spinner it cannot show
        print(f"{message} ...", file=sys.stderr, flush=True)
        yield lambda msg: None
        return
    with err_console.status(message) as st:
        yield lambda msg: st.update(f"{message}: {msg}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise DynapruneError(f"{name} must be a positive number, got {value}")


def _validate_recipe(recipe: str, task: str | None = None, protocol: str | None = None) -> None:
    if recipe not in ("", "dense"):
        try:
            from dynaprune.prune.recipe import Recipe
            from dynaprune.prune.recipe_scope import check_recipe_applies
        except ImportError:
            raise DynapruneError("pruning recipes are not available in this build") from None
        parsed = Recipe.parse(recipe)
        if task is not None:
            check_recipe_applies(parsed, task, protocol=protocol)


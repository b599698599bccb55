"""What every command module of the CLI shares: the rich consoles (stdout and stderr), a progress bar
and a status spinner, and the argument checks (positive numbers, recipes in sweep configs)."""

from __future__ import annotations

import sys
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
    """A rich progress bar driven by ``callback(done, total)``; silent when not on a terminal."""
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
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


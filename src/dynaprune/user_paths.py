"""Checks of the paths a user gives, made before any work so a mistake never costs a finished run.

Inputs: a folder where a file is expected is named as a folder (not "not found"). Outputs: a folder where
a file goes, a file where a folder goes, or a place that cannot be written is refused up front; nothing
is created here (the atomic writers make missing parent folders when they write).
"""

from __future__ import annotations

import os
from pathlib import Path

from dynaprune.errors import DynapruneError


def check_input_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a readable file; else one message saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise DynapruneError(f"{what} {path} is a folder, expected a file")
    if not path.exists():
        raise DynapruneError(f"{what} not found: {path}")
    if not path.is_file():
        raise DynapruneError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise DynapruneError(f"{what} {path} cannot be read (permission denied)")
    return path


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (the place the writer would create from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """Every missing folder above ``path`` can be made: the nearest existing ancestor is a writable folder."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise DynapruneError(f"{flag} {path}: {base} is a file, so no folder can be made inside it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DynapruneError(f"{flag} {path}: cannot write into {base} (permission denied)")


def check_output_file(path: str | Path | None, flag: str, example: str = "result.json") -> None:
    """Refuse, before any work, an output file path that is a folder or cannot be written; ``example`` is
    the file name the message suggests inside a folder given by mistake."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise DynapruneError(f"{flag} {path} is a folder; give a file path, e.g. {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise DynapruneError(f"{flag} {path}: the file cannot be written (permission denied)")
    _check_creatable(path, flag)


def check_output_folder(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DynapruneError(f"{flag} {path} is a file; give a folder for the output")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise DynapruneError(f"{flag} {path}: cannot write into the folder (permission denied)")
        return
    _check_creatable(path / "x", flag)

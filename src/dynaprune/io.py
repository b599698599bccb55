"""Atomic file writing, the one low-level place for it: a crash or an error never leaves a half-written file.

Every layer (eval, hw, calibrate, report, benchmarks) writes its outputs through here, so this module
imports nothing from dynaprune but the standard library.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _default_permissions() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_writer(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` in one rename.

    The parent folder is created. On any exception the temporary file is removed and ``path`` is left as
    it was. The file gets the permissions a plain ``open`` would give (mkstemp alone makes it 0600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.chmod(tmp, _default_permissions())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-JSON values as ``str``) plus a newline, atomically."""
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling folder (yielded), then move it into place at ``out``. An existing ``out``
    (an overwrite) stays until the new folder is complete and is restored if anything fails."""
    import shutil

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a checkpoint folder is as readable as any other
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

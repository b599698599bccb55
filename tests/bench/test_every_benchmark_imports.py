"""Every benchmark script imports and has a ``main`` (a renamed module or attribute breaks at import,
before anyone runs the hour-long benchmark); the helper modules import."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                 if p.stem != "__init__")
HELPERS = {"common", "kv_bytes_plot"}  # imported by the scripts, not run


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_has_main(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if name not in HELPERS:
        assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"

"""Atomic writes (dynaprune.io) and the import direction the issue-13 split set: prune/ uses nothing above it,
hw/ nothing from eval/ or report/."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

import dynaprune
from dynaprune.io import atomic_writer, write_json_atomic, write_text_atomic

SRC = Path(dynaprune.__file__).parent


def test_json_round_trip_and_no_leftovers(tmp_path):
    target = tmp_path / "deep" / "r.json"
    write_json_atomic(target, {"a": 1, "p": Path("x")})
    assert json.loads(target.read_text()) == {"a": 1, "p": "x"}  # non-JSON values as str
    assert target.read_text().endswith("\n")
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "r.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]
    with pytest.raises(TypeError):  # json fails part-way: a complex dict key is not encodable (default= is for values)
        write_json_atomic(target, {"x": 1, 1j: 2})
    assert target.read_text() == "old\n"


def test_permissions_are_those_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic = tmp_path / "atomic"
    write_text_atomic(atomic, "x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def _imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(SRC))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("prune", ("runtime", "eval", "hw", "report", "models", "calibrate")), ("hw", ("eval", "report"))],
)
def test_import_direction(package, forbidden):
    bad = {
        file: sorted(m for m in modules if m.split(".")[:2] in [["dynaprune", f] for f in forbidden])
        for file, modules in _imported_modules(package).items()
    }
    assert {f: m for f, m in bad.items() if m} == {}

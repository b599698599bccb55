"""dynaprune prune: bad input is one `error:` line and exit code 2 (checked before loading a model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (["--heads", "1.0"], "--heads must lie in [0, 1)"),
    (["--ffn", "-0.1"], "--ffn must lie in [0, 1)"),
    (["--nm", "4:4"], "need 1 <= N < M"),
    (["--nm", "x"], "must look like N:M"),
    (["--criterion", "nope"], "unknown criterion"),
    (["--layers", "-1"], "--layers must lie"),
]


def cli(*args: str) -> subprocess.CompletedProcess:
    code = "from dynaprune.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "prune", *args], capture_output=True, text=True)


@pytest.mark.parametrize(("extra", "message"), CASES)
def test_bad_options(tmp_path, extra, message):
    r = cli("minilm-l6", "--calib", str(tmp_path / "c.tsv"), "-o", str(tmp_path / "out"), *extra)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:")


def test_existing_output_refused(tmp_path):
    (tmp_path / "out").mkdir()
    r = cli("minilm-l6", "--heads", "0.2", "--calib", "x.tsv", "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "already exists" in r.stderr

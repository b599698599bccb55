"""``dynaprune hw simulate | dse``: tables, JSON and PNG outputs; bad input is one message and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynaprune.errors import DynapruneError
from dynaprune.hw.cli import app
from dynaprune.hw.trace import TraceRow, write_trace

runner = CliRunner()


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    rows = [TraceRow(0, layer, h, 64, 100, 40, value_fetch_num=10, quant_key_bit=6, quant_query_bit=16,
                     quant_value_bit=6) for layer in range(2) for h in range(4)]
    return write_trace(tmp_path / "tiny.csv", rows)


def test_simulate_writes_json_and_roofline(tiny, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "roof.png"
    res = runner.invoke(app, ["simulate", str(tiny), "--json", str(out), "--plot", str(png),
                              "--param", "topk_parallelism=32", "-p", "energy.dram_pj_per_byte=20"])
    assert res.exit_code == 0, res.output
    assert "cycles" in res.output and "GFLOP/s" in res.output
    data = json.loads(out.read_text())
    assert data["arch"] == "spatten" and data["rows"] == 8 and data["config"]["topk_parallelism"] == 32
    assert data["overrides"]["energy.dram_pj_per_byte"] == 20.0
    assert set(data["energy_j"]) >= {"dram", "sram", "multiply", "softmax", "total"}
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_hdp(tiny):
    res = runner.invoke(app, ["simulate", str(tiny), "--arch", "hdp", "-p", "pe_rows=8"])
    assert res.exit_code == 0, res.output
    assert "speedup_vs_dense" in res.output


def test_dse_grid(tiny, tmp_path):
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    res = runner.invoke(app, ["dse", str(tiny), "--sweep", "topk_parallelism=1,4,16", "--sweep", "hbm_channels=8,16",
                              "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    pts = json.loads(out.read_text())["points"]
    assert len(pts) == 6 and pts[0]["speedup_vs_first"] == 1.0
    assert png.exists()


@pytest.mark.parametrize("args,needle", [
    (["simulate", "{t}", "--param", "nonsense=3"], "unknown parameter 'nonsense'"),
    (["simulate", "{t}", "--param", "topk_parallelism=many"], "is not an integer"),
    (["simulate", "{t}", "--param", "topk_parallelism"], "key=value"),
    (["simulate", "{t}", "--param", "topk_parallelism=0"], "must be > 0"),
    (["simulate", "{t}", "--arch", "tpu"], "unknown --arch"),
    (["simulate", "{t}", "--param", "energy.bogus=1"], "unknown parameter 'energy.bogus'"),
    (["dse", "{t}", "--sweep", "topk_parallelism="], "has no values"),
    (["simulate", "missing.csv"], "not found"),
    (["simulate", "{t}", "--json", "{d}"], "is a folder"),
    (["simulate", "{d}"], "is a folder, expected a file"),
    (["dse", "{d}", "--sweep", "topk_parallelism=1,2"], "is a folder, expected a file"),
    (["simulate", "{t}", "--plot", "{t}/roof.png"], "is a file, so no folder can be made inside it"),
])
def test_bad_input_raises_one_clear_error(tiny, args, needle):
    res = runner.invoke(app, [a.format(t=tiny, d=tiny.parent) for a in args])
    assert isinstance(res.exception, DynapruneError), res.output
    assert needle in str(res.exception)


def test_main_cli_exit_code_2_with_the_row(tmp_path):
    bad = tmp_path / "bad.csv"
    good = write_trace(tmp_path / "good.csv", [TraceRow(0, 0, 0, 64, 10, 10)]).read_text().splitlines()
    bad.write_text("\n".join([good[0], good[1].replace(",10,10,", ",10,12,", 1)]) + "\n")
    proc = subprocess.run([sys.executable, "-c", "from dynaprune.cli import main; main()", "hw", "simulate",
                           str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bad.csv:2: key_fetch_num 12 > sentence_length_L 10" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr

"""Every speed benchmark runs end to end in --quick mode (tiny sizes, one repeat) and writes JSON of
the documented shape. No timing is asserted: the figures live in benchmarks/results/."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from benchmarks import common
from dynaprune.errors import DynapruneError


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    importlib.import_module(f"benchmarks.{name}").main(["--quick", "--out", str(out), *extra])
    data = json.loads(out.read_text())
    for key in ("benchmark", "machine", "versions", "load", "threads", "quick", "seconds"):
        assert key in data, key
    assert data["benchmark"] == name and data["quick"] is True
    return data


def test_topk(tmp_path):
    data = run_quick("topk", tmp_path)
    assert data["cases"] and {"n", "k", "microseconds", "ratio_indices_vs_topk"} <= set(data["cases"][0])


def test_blocks(tmp_path):
    data = run_quick("blocks", tmp_path)
    row = data["results"][0]
    assert {"block", "sparsity", "speedup_vs_sdpa", "times"} <= set(row)
    assert row["max_abs_error_vs_masked_dense"] < 1e-4  # the block-sparse output is the masked softmax's


@pytest.mark.models
def test_encoder(tmp_path):
    data = run_quick("encoder", tmp_path)
    row = data["results"][0]
    assert {"ours_dense", "transformers_dense", "ours_vs_transformers_dense"} <= set(row)
    recipe = row["recipes"][0]
    assert {"speedup", "flop_ratio", "efficiency", "vs_transformers", "flops_kept"} <= set(recipe)
    assert 0 < recipe["flops_kept"] < 1


@pytest.mark.models
def test_prefill(tmp_path):
    data = run_quick("prefill", tmp_path)
    assert {"time_to_first_token", "perplexity"} <= set(data["dense"])
    assert {"speedup", "perplexity_cost", "flops_kept"} <= set(data["recipes"][0])


@pytest.mark.models
def test_decode(tmp_path):
    data = run_quick("decode", tmp_path)
    variants = data["results"][0]["variants"]
    assert set(variants) == {"dense", "kv=0.25"}
    assert variants["kv=0.25"]["kv_bytes_held"] < variants["dense"]["kv_bytes_held"]
    assert {"tokens_per_s", "speedup", "kv_bytes_held_vs_dense", "kv_bytes_allocated"} <= set(variants["dense"])


def test_memory_check_stops_before_the_run(monkeypatch, tmp_path):
    with pytest.raises(DynapruneError, match="needs about 2.0 GiB but only 1.0 GiB is available"):
        common.check_memory(2 << 30, "x", available=1 << 30)
    common.check_memory(1 << 30, "x", available=2 << 30)  # enough: no error
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 1 << 20)  # a 1 MiB machine
    out = tmp_path / "blocks.json"
    with pytest.raises(DynapruneError, match="blocks benchmark"):
        importlib.import_module("benchmarks.blocks").main(["--out", str(out)])
    assert not out.exists()

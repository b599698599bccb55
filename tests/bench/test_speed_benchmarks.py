"""Every speed benchmark runs end to end in --quick mode (tiny sizes, one repeat) and writes JSON of
the documented shape whose figures hold together: ratios are the quotients of the timings they come
from, counts (compactions, blocks kept, KV bytes) match a count made by hand from the settings. No
timing itself is asserted: the figures live in benchmarks/results/."""

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


@pytest.mark.models
def test_blocks(tmp_path):
    data = run_quick("blocks", tmp_path)
    (row,) = data["results"]
    assert row["max_abs_error_vs_masked_dense"] < 1e-4  # the block-sparse output is the masked softmax's
    # L = 128, block 32: 4 query-block rows seeing 1, 2, 3, 4 key blocks (10); at 75% sparsity each keeps
    # ceil(0.25 x visible) = 1 (its diagonal); batch 3 layers x 9 heads
    assert row["blocks_visible"] == 10 * 27
    assert row["blocks_kept"] == {"abs_sum": 4 * 27, "sum": 4 * 27}
    assert row["block_sparsity_realized"]["abs_sum"] == pytest.approx(1 - 4 / 10)
    t = {name: v["median_s"] for name, v in row["times"].items()}
    assert row["speedup_vs_sdpa"] == t["sdpa_dense"] / t["end_to_end_abs_sum"]
    assert row["speedup_vs_sdpa_sum_score"] == t["sdpa_dense"] / t["end_to_end_sum"]
    assert row["speedup_kernel_only"] == t["sdpa_dense"] / t["kernel_only"]


@pytest.mark.models
def test_encoder(tmp_path):
    data = run_quick("encoder", tmp_path)
    row = data["results"][0]
    assert {"ours_dense", "transformers_dense", "ours_vs_transformers_dense"} <= set(row)
    recipe = row["recipes"][0]
    assert {"speedup", "flop_ratio", "efficiency", "vs_transformers", "flops_kept"} <= set(recipe)
    assert 0 < recipe["flops_kept"] < 1
    times = {e["policy"]: e["time"]["median_s"] for e in row["recipes"]}  # --quick: one target, both policies
    merge = next(e for e in row["recipes"] if e["policy"] == "merge")
    assert merge["time_vs_drop"] == times["merge"] / times["drop"]
    assert data["policy"] == "both"


def test_encoder_partial_runs_do_not_overwrite_the_full_run():
    from benchmarks.encoder import default_name

    assert default_name("both", None) == "encoder"
    assert default_name("merge", [512]) == "encoder-merge"
    assert default_name("drop", None) == "encoder-drop"
    assert default_name("both", [512]) == "encoder-merge-vs-drop"


@pytest.mark.models
def test_prefill(tmp_path):
    data = run_quick("prefill", tmp_path)
    assert {"time_to_first_token", "valid_perplexity", "test_perplexity"} <= set(data["dense"])
    row = data["rows"][0]
    assert {"speedup", "valid_perplexity_cost", "test_perplexity_cost", "flops_kept"} <= set(row)
    assert row["speedup"] == data["dense"]["time_to_first_token"]["median_s"] / row["time_to_first_token"]["median_s"]
    assert 0 < row["flops_kept"] < 1


@pytest.mark.models
def test_decode(tmp_path):
    data = run_quick("decode", tmp_path)
    (case,) = data["results"]
    variants = case["variants"]
    assert set(variants) == {"dense", "kv=0.25"}
    dense, kv = variants["dense"], variants["kv=0.25"]
    # 256-token prompt, kv=0.25: a 64-token budget, evicted in chunks of 64 / 16 = 4. The prefill leaves
    # 60 tokens (untimed); steps 1-4 grow it to 64, step 5 to 65 > 64: compacted to 60; again at step 10.
    # The window is 2 periods of 5 steps, so exactly 2 compactions inside it, the last at its last step.
    assert case["new_tokens"] == 10 and dense["timed_steps"] == kv["timed_steps"] == 10
    assert kv["kv_budget_tokens"] == 64
    assert kv["compactions_in_window"] == 2 and dense["compactions_in_window"] == 0
    # prompt cut to 64; steps 1 and 6 go over it and drop to 60; 4 more steps each: 64 at the end
    assert kv["kv_tokens_held_per_layer"] == 64 and dense["kv_tokens_held_per_layer"] == 256 + 10
    per_token = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads, head dim 64, fp32
    assert kv["kv_bytes_held"] == 64 * per_token and dense["kv_bytes_held"] == 266 * per_token
    # every throughput is the quotient of the timings it comes from
    for v in variants.values():
        assert v["tokens_per_s"] == pytest.approx(1 / v["mean_step_s"])
        assert v["tokens_per_s_median"] == pytest.approx(1 / v["median_step_s"])
        assert v["mean_step_s"] == pytest.approx(v["window_s"] / 10)
        assert v["min_step_s"] <= v["median_step_s"] <= v["max_step_s"]
    assert kv["speedup"] == pytest.approx(dense["mean_step_s"] / kv["mean_step_s"])
    assert kv["speedup_median"] == pytest.approx(dense["median_step_s"] / kv["median_step_s"])
    assert kv["compaction_step_mean_s"] is not None and dense["compaction_step_mean_s"] is None


def test_sparse24_without_cuda_is_skipped(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = run_quick("sparse24", tmp_path)
    assert data["skipped"] is True and "CUDA" in data["reason"] and data["results"] == []


def test_cuda_device_refused_without_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "blocks.json"
    with pytest.raises(DynapruneError, match="no CUDA device"):
        importlib.import_module("benchmarks.blocks").main(["--quick", "--device", "cuda", "--out", str(out)])
    assert not out.exists()


def test_memory_check_stops_before_the_run(monkeypatch, tmp_path):
    with pytest.raises(DynapruneError, match="needs about 2.0 GiB but only 1.0 GiB is available"):
        common.check_memory(2 << 30, "x", available=1 << 30)
    common.check_memory(1 << 30, "x", available=2 << 30)  # enough: no error
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 1 << 20)  # a 1 MiB machine
    out = tmp_path / "blocks.json"
    with pytest.raises(DynapruneError, match="blocks benchmark"):
        importlib.import_module("benchmarks.blocks").main(["--out", str(out)])
    assert not out.exists()

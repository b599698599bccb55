"""benchmarks/peers: the bytes formula against hand counts, the row schema, the plan, and the committed
peers JSON against invariants that a wrong byte count or a wrong protocol would break. Needs no kvpress
(the peers run in their own venv; these are the pure helpers and the file they wrote)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.peers import schema
from benchmarks.peers.schema import HeldTensor

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "peers" / "kvpress.json"
# SmolLM2-135M: 30 layers, 3 KV heads of 64 channels; our protocol's context is 1536 tokens.
LAYERS, KV_HEADS, HEAD_DIM, CONTEXT = 30, 3, 64, 1536


def good_row(**over) -> dict:
    row = {"peer": "kvpress", "press": "KVzip", "options": {"keep": 0.25}, "split": "test", "perplexity": 15.4,
           "tokens_kept_share": 0.25, "kv_bytes_vs_fp16": 0.25, "kv_bytes_as_held_vs_fp16": 0.5, "seconds": 3.0,
           "versions": {"kvpress": "0.5.5", "transformers": "5.2.0", "torch": "2.13.0"}}
    return row | over


def test_fp16_cache_bytes_is_a_hand_count():
    # K and V, 30 layers, 3 heads, 64 channels, 1536 tokens, 2 bytes each
    assert schema.fp16_cache_bytes(LAYERS, KV_HEADS, HEAD_DIM, CONTEXT) == 2 * 30 * 3 * 64 * 1536 * 2 == 35_389_440
    assert schema.fp16_cache_bytes(1, 1, 64, 10, batch=3) == 3 * 2 * 64 * 10 * 2


def quanto_like(numel: int, bits: int, group: int, scale_bytes: int) -> list[HeldTensor]:
    """What quanto holds for ``numel`` values: packed uint8 codes, one scale and one shift per group."""
    groups = numel // group
    return [HeldTensor("codes", numel * bits // 8, numel * bits // 8),
            HeldTensor("float", groups, groups * scale_bytes), HeldTensor("float", groups, groups * scale_bytes)]


@pytest.mark.parametrize("bits", [2, 4])
def test_group_quantized_bytes_count_codes_scales_and_zero_points(bits):
    numel = KV_HEADS * CONTEXT * HEAD_DIM  # one layer's K
    fp16 = numel * 2
    # floats at 2 bytes: bits/16 for the codes + 2 x 2 bytes per 64 values
    assert schema.kv_bytes(quanto_like(numel, bits, 64, 4)) / fp16 == pytest.approx(bits / 16 + 4 / 128)
    assert schema.group_quant_ratio(bits, 64) == pytest.approx(bits / 16 + 4 / 128)
    assert schema.group_quant_ratio(4, 64) == 0.28125
    # as held (fp32 scales in an fp32 model): 8 bytes per 64 values
    assert schema.kv_bytes(quanto_like(numel, bits, 64, 4), as_held=True) / fp16 == pytest.approx(bits / 16 + 8 / 128)


def test_float_tensors_count_two_bytes_per_element_codes_their_real_size():
    fp32_rows = HeldTensor("float", 100, 400)
    assert schema.kv_bytes([fp32_rows]) == 200
    assert schema.kv_bytes([fp32_rows], as_held=True) == 400
    assert schema.kv_bytes([HeldTensor("codes", 7, 3)]) == 3
    assert schema.packed_code_bytes(7, 3) == 3  # 21 bits -> 3 bytes
    assert schema.packed_code_bytes(16, 4) == 8
    with pytest.raises(ValueError, match="kind"):
        schema.kv_bytes([HeldTensor("int", 1, 1)])


def test_compression_ratio_is_the_share_dropped():
    assert schema.compression_ratio_for_keep(0.25) == 0.75
    assert schema.compression_ratio_for_keep(1.0) == 0.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep share"):
            schema.compression_ratio_for_keep(bad)


@pytest.mark.parametrize(("change", "named"), [
    ({"perplexity": float("nan")}, "perplexity"),
    ({"perplexity": 0.5}, "perplexity"),
    ({"tokens_kept_share": 0.0}, "tokens_kept_share"),
    ({"kv_bytes_vs_fp16": 3.0}, "kv_bytes_vs_fp16"),
    ({"kv_bytes_vs_fp16": 0.6}, "cannot exceed"),
    ({"split": "train"}, "split"),
    ({"peer": "someone"}, "peer"),
    ({"versions": {"kvpress": "0.5.5"}}, "versions"),
])
def test_validate_row_names_the_problem(change, named):
    schema.validate_row(good_row())
    with pytest.raises(ValueError, match=named):
        schema.validate_row(good_row(**change))
    missing = good_row()
    del missing["seconds"]
    with pytest.raises(ValueError, match="seconds"):
        schema.validate_row(missing)


def test_rows_round_trip_and_a_bad_row_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "peers" / "kvpress.json"
    assert schema.load_rows(path) == []
    schema.write_rows_atomic(path, [good_row()], {"command": "x"})
    assert schema.load_rows(path) == [good_row()]
    with pytest.raises(ValueError):
        schema.write_rows_atomic(path, [good_row(), good_row(perplexity=-1.0)], {"command": "x"})
    assert schema.load_rows(path) == [good_row()]
    assert [p.name for p in path.parent.iterdir()] == ["kvpress.json"]  # no temp file left behind


def test_row_key_tells_rows_apart_by_peer_press_options_and_split():
    keys = {schema.row_key(good_row()), schema.row_key(good_row(split="valid")),
            schema.row_key(good_row(options={"keep": 0.5})), schema.row_key(good_row(press="SnapKV"))}
    assert len(keys) == 4
    assert schema.row_key(good_row(perplexity=99.0)) == schema.row_key(good_row())  # results are not the key


def test_the_plan_covers_the_brief():
    from benchmarks.peers import run_kvpress

    test = [s for s in run_kvpress.plan(["test"])]
    def has(press, keep, bits=None):
        return any(s["press"] == press and s["keep"] == keep and s["bits"] == bits for s in test)
    for press in ("ObservedAttention", "KVzip", "SnapKV", "ExpectedAttention", "TOVA", "StreamingLLM", "Knorm",
                  "AdaKV(ExpectedAttention)", "PyramidKV", "KeyDiff"):
        assert all(has(press, keep) for keep in (0.5, 0.25, 0.125)), press
    assert all(has(p, 0.0625) for p in run_kvpress.BEST_TWO)
    assert all(has(p, keep, 4) for p in run_kvpress.BEST_TWO for keep in (0.5, 0.25))
    first = run_kvpress.BEST_TWO[0]  # a press on the quantized cache at every share kept and both widths
    assert all(has(first, keep, bits) for keep in (0.5, 0.25, 0.125) for bits in (4, 2))
    assert {s["bits"] for s in test if s["peer"] == "quantized-cache"} == {2, 4}
    assert test[0]["peer"] == "dense"  # the dense check runs first
    specs = [run_kvpress.options_of(s) | {"press": s["press"]} for s in test]
    assert len({json.dumps(s, sort_keys=True) for s in specs}) == len(specs)  # no row twice
    assert run_kvpress.options_of({"press": "ObservedAttention", "keep": 0.5, "bits": None})[
        "attn_implementation"] == "eager"  # it reads the attention weights


@pytest.mark.skipif(not RESULTS.exists(), reason="no peers results committed yet")
def test_committed_peer_rows_hold_together():
    rows = json.loads(RESULTS.read_text())["rows"]
    for row in rows:
        schema.validate_row(row)
        opts = row["options"]
        assert (opts["context"], opts["continuation"], opts["max_examples"]) == (1536, 512, 8)
        keep = opts.get("keep", 1.0)
        # every press keeps its share of the context's (head, token) rows, rounded down per head
        assert row["tokens_kept_share"] == pytest.approx(math.floor(CONTEXT * keep) / CONTEXT, abs=2 / CONTEXT)
        if "nbits" in opts:
            # quanto: the whole context quantized (no fp residual after a one-pass prefill), groups of 64:
            # bits/16 + 2 fp16 parameters per 64 values, times the rows kept
            expected = schema.group_quant_ratio(opts["nbits"], opts["q_group_size"]) * row["tokens_kept_share"]
        else:
            expected = row["tokens_kept_share"]  # fp16 K/V rows only
        assert row["kv_bytes_vs_fp16"] == pytest.approx(expected, rel=1e-3), row["press"]
    dense = [r for r in rows if r["peer"] == "dense" and r["split"] == "test"]
    if dense:  # our `dynaprune eval smollm2-135m lm ... --protocol continue --max-examples 8` on test: 14.563
        assert dense[0]["perplexity"] == pytest.approx(14.563, abs=5e-4)

"""Our runs' workload traces: valid in the SpAtten schema and consistent with what the run did."""

from __future__ import annotations

from test_pruning import batch, tiny_bert

from dynaprune.hw.trace import read_trace
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.trace import trace_rows, write_run_trace


def test_trace_of_a_pruned_encoder_run(tmp_path):
    model = tiny_bert()
    ids, mask = batch()
    ctx = make_context("token_schedule=1:0.5,quant=4+4@0.3,value=0.5", model, trace=True)
    model(ids, mask, ctx=ctx)
    rows = trace_rows(ctx)
    n_real = int(mask[0].sum())
    kept = max(1, int(0.5 * n_real + 0.5))
    # every head of every layer, one row per real query of the first input
    assert len(rows) == 2 * 4 * n_real + 2 * 4 * kept
    assert {r.key_fetch_num for r in rows if r.layer_id < 2} == {n_real}
    assert {r.key_fetch_num for r in rows if r.layer_id >= 2} == {kept}
    assert [r.topk for r in rows if r.if_topk] == [kept]
    assert all(r.value_fetch_num == max(1, int(0.5 * r.key_fetch_num + 0.5)) for r in rows)
    assert len({r.if_requant for r in rows}) == 2  # threshold 0.3: some rows need their LSBs, some not
    # LSB rows by hand: threshold 1 sends every row for its LSBs, threshold 0 none
    for threshold, expected in ((1.0, True), (0.0, False)):
        every = make_context(f"token_schedule=1:0.5,quant=4+4@{threshold}", model, trace=True)
        model(ids, mask, ctx=every)
        assert {r.if_requant for r in trace_rows(every)} == {expected}
    trace = read_trace(write_run_trace(tmp_path / "t.csv", ctx))
    assert len(trace) == len(rows)


def test_trace_of_a_packed_kv_cache_records_its_key_and_value_bits():
    from test_pruning import tiny_llama

    model = tiny_llama()
    prompt = list(range(1, 40))
    rows = {}
    for recipe in ("kv_key_bits=6,kv_value_bits=4,kv_group=16", "kv_bits=3,kv_group=16", "kv=0.5"):
        ctx = make_context(recipe, model, trace=True)
        model.generate(prompt, max_new_tokens=4, stop_tokens=[], ctx=ctx)
        rows[recipe] = trace_rows(ctx)
    split = rows["kv_key_bits=6,kv_value_bits=4,kv_group=16"]
    assert {(r.quant_key_bit, r.quant_value_bit, r.quant_query_bit) for r in split} == {(6, 4, -1)}
    assert {(r.quant_key_bit, r.quant_value_bit) for r in rows["kv_bits=3,kv_group=16"]} == {(3, 3)}
    assert {(r.quant_key_bit, r.quant_value_bit) for r in rows["kv=0.5"]} == {(-1, -1)}  # not quantized

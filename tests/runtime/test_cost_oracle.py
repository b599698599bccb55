"""Cost figures against hand counts from first principles (issue 12 items 2-7): a tiny model whose
shape, batch and masks we count FLOPs, rows and bits of by hand, or a brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch
from test_head_skipping import tiny_llama
from test_pruning import batch, tiny_bert

from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context, merge_summaries

REAL = [12, 9, 5]  # real tokens of test_pruning.batch(): 3 rows padded to 12
LAYERS, HEADS, HEAD_DIM, HIDDEN, FFN = 4, 4, 8, 32, 48  # tiny_bert
VALID = sum(n * n for n in REAL) * HEADS * LAYERS  # (query, key, head) pairs an encoder attends: 4000


def run(recipe: str, model=None, **kwargs):
    model = model or tiny_bert()
    ids, mask = batch()
    ctx = make_context(recipe, model, **kwargs)
    with torch.inference_mode():
        model(ids, mask, ctx=ctx)
    return ctx, work_cost(cost_shape(model), ctx.work)


def test_hdp_attention_work_is_the_integer_pass_plus_kept_pairs_and_the_emulation_is_counted_apart():
    """Item 2. Nothing pruned (fixed point only): the accelerator runs the integer pass over all 4000
    valid pairs, then QK and PV of all of them: 3 x 4000 pair-MACs against dense 2 x 4000 = 1.5. Our
    emulation ran 5 float64 QK rectangles (integer, integer + 2 cross terms, near-zero count) and one PV
    over the padded 3 x 12 x 12 x 4 heads x 4 layers = 6912 pairs: 6 x 6912 / 8000."""
    _, whole = run("fixed=8.8,approx=on")
    assert whole["attention_flops_kept"] == 1.5
    assert whole["figure_kinds"]["attention_flops_kept"] == "modelled"
    assert whole["attention_flops_computed_kept"] == pytest.approx(6 * 3 * 144 * HEADS * LAYERS / (2 * VALID))
    ctx, blocks = run("block=0.3,block_score=max")
    kept = sum(s.counts["hdp"]["pairs_kept"] for s in ctx.layer_stats.values())
    assert sum(s.counts["hdp"]["pairs_valid"] for s in ctx.layer_stats.values()) == VALID
    assert 0 < kept < VALID
    assert blocks["attention_flops_kept"] == pytest.approx((VALID + 2 * kept) / (2 * VALID))
    assert blocks["attention_flops_computed_kept"] > 1.0  # the emulation computes more than dense


def test_flops_count_the_lm_head_and_the_padded_tensors_by_hand():
    """Item 7. Llama (hidden 48, 6 heads of 8, 2 KV heads, FFN 64 x 3, vocabulary 60, 4 layers), two rows
    of 10 positions, the second with 3 left-padding positions: 17 real tokens, 20 computed."""
    model = tiny_llama()
    ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    ctx = RunContext()
    with torch.inference_mode():
        model(ids, attention_mask=mask, ctx=ctx)
    cost = work_cost(cost_shape(model), ctx.work)
    useful, computed = cost["actual"]["flops"], cost["computed"]["flops"]
    assert useful["lm_head"] == 2 * 48 * 60 * 17 and computed["lm_head"] == 2 * 48 * 60 * 20
    proj = 2 * 48 * 8 * (2 * 6 + 2 * 2) * 4  # per token over 4 layers
    assert useful["proj_qkvo"] == proj * 17 and computed["proj_qkvo"] == proj * 20
    assert useful["ffn"] == 2 * 48 * 64 * 3 * 4 * 17 and computed["ffn"] == 2 * 48 * 64 * 3 * 4 * 20
    causal_pairs = 10 * 11 // 2 + 7 * 8 // 2  # real (query, key) pairs of the two rows
    assert useful["attn_qk"] == 2 * 8 * 6 * 4 * causal_pairs
    assert computed["attn_qk"] == 2 * 8 * 6 * 4 * 2 * 10 * 10  # a masked kernel scores the whole square
    assert cost["flops_useful"] == useful["total"] and cost["flops_computed"] == computed["total"]
    assert cost["flops_kept"] == 1.0 and cost["flops_computed_kept"] > 1.0

    last = RunContext()
    with torch.inference_mode():
        model(ids[:1], ctx=last, last_only=True)  # a prefill: logits of the last position only
    cost = work_cost(cost_shape(model), last.work)
    assert cost["actual"]["flops"]["lm_head"] == cost["computed"]["flops"]["lm_head"] == 2 * 48 * 60
    # no padding: SDPA's causal kernel skips the upper triangle, 55 pairs computed
    assert cost["computed"]["flops"]["attn_qk"] == cost["actual"]["flops"]["attn_qk"] == 2 * 8 * 6 * 4 * 55


def test_an_encoder_has_no_lm_head():
    _, cost = run("token=0.5")
    assert cost["actual"]["flops"]["lm_head"] == 0 and cost["shape"]["vocab"] == 0


@pytest.mark.parametrize(("threshold", "kv_bits"), [(0.0, 4), (1.0, 8)])
def test_bits_fetched_count_q_k_and_v_over_the_same_rows(threshold, kv_bits):
    """Items 4, 5. quant=4+4@T: K and V at 4 bits (T = 0: no row needs its LSBs) or 8 (T = 1: every
    row does), plus their fp16 scale and zero-point (32 bits) per group: keys per channel over 64
    tokens (+0.5 bit an element), values per token over head_dim = 8 channels (+4 bits); Q is not
    quantized (16 bits). Every real token is a Q row and a K/V row of every head, padding is neither,
    so the fractions are exact (an encoder: every key read quantized)."""
    ctx, cost = run(f"quant=4+4@{threshold}")
    s = ctx.summary()
    assert s["query_bits_fetched_vs_fp16"] == 1.0
    assert s["key_bits_fetched_vs_fp16"] == (kv_bits + 32 / 64) / 16
    assert s["value_bits_fetched_vs_fp16"] == (kv_bits + 32 / 8) / 16
    assert s["bits_fetched_vs_fp16"] == pytest.approx((16 + kv_bits + 0.5 + kv_bits + 4) / 48)
    assert s["counts"]["rows"] == sum(REAL) * HEADS * LAYERS
    assert s["lsb_row_fraction"] == (1.0 if threshold == 1.0 else 0.0)
    assert cost["storage"] == "simulated"
    assert "storage" not in run("token=0.5")[1]


def test_value_rows_fetched_are_the_union_over_queries_brute_force():
    """Item 3. value=0.5: each real query keeps keep_count(0.5, n) of its n visible V rows (ties to the
    earlier key); a head fetches the union over its queries. Counted here by a plain loop over the
    recorded probabilities."""
    ctx, _ = run("value=0.5", record_probs=True)
    used = fetched = 0
    for record in ctx.records:
        for b, n in enumerate(REAL):
            keep = max(1, math.floor(0.5 * n + 0.5))
            for h in range(HEADS):
                union: set[int] = set()
                for i in range(n):
                    row = record.probs[b, h, i, :n].tolist()
                    union |= set(sorted(range(n), key=lambda j, row=row: (-row[j], j))[:keep])
                    used += keep
                fetched += len(union)
    s = ctx.summary()
    assert len(ctx.records) == LAYERS
    assert s["value_rows_kept"] == fetched / (sum(REAL) * HEADS * LAYERS)
    assert s["value_rows_used_kept"] == used / VALID
    assert s["value_rows_kept"] > s["value_rows_used_kept"]  # every query's half covers most rows


class _Summary:
    """A stand-in context with a given summary (merge_summaries only reads summary())."""

    layer_stats: dict = {}

    def __init__(self, rows: int, lsb: int) -> None:
        self.counts = {"rows": rows, "rows_needing_lsb": lsb}

    def summary(self) -> dict:
        return {"tokens_per_layer": [1], "heads_per_layer": [4], "counts": self.counts, "enabled": ["quant"]}


def test_merged_fractions_are_weighted_by_the_rows_they_cover():
    """Item 6. 50 of 100 rows and 0 of 900: 50 / 1000 = 0.05 (the unweighted mean said 0.25)."""
    merged = merge_summaries([_Summary(100, 50), _Summary(900, 0)])
    assert merged["lsb_row_fraction"] == pytest.approx(0.05)
    assert merged["counts"]["rows"] == 1000

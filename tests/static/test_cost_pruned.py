"""FLOPs of a statically pruned model (runtime/cost.py with per-layer heads and FFN widths) against a
hand count and against the Linear layers the forward really ran (forward hooks: 2 x in x out per row)."""

from __future__ import annotations

import torch
from test_structured import tiny_bert, tiny_llama

from dynaprune.runtime.cost import cost_shape, dense_cost, work_cost
from dynaprune.runtime.pruning import make_context
from dynaprune.static import remove_ffn_neurons, remove_heads, remove_layers


def pruned_bert():
    m = tiny_bert()  # hidden 32, 3 layers x 4 heads of 8, FFN 48
    remove_heads(m, 1, [0, 2])  # layer 1: 2 heads
    remove_ffn_neurons(m, 2, range(20))  # layer 2: FFN 20
    return m


def hand_count_bert(L: int) -> int:
    d, D = 32, 8
    total = 0
    for heads, ffn in ((4, 48), (2, 48), (4, 20)):
        total += 2 * L * d * 4 * heads * D  # Q, K, V, O: each d x (heads D)
        total += 2 * 2 * heads * D * L * L  # QK^T and PV over L^2 pairs
        total += 2 * 2 * L * d * ffn  # fc1, fc2
    return total


def linear_flops(model, run) -> int:
    seen = []

    def hook(mod, args, out):
        seen.append(2 * args[0].shape[:-1].numel() * mod.in_features * mod.out_features)

    hooks = [m.register_forward_hook(hook) for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return sum(seen)


def test_pruned_bert_flops_hand_count_and_hooks():
    m, L = pruned_bert(), 7
    shape = cost_shape(m)
    assert shape.layer_heads == (4, 2, 4) and shape.layer_ffn == (48, 48, 20)
    flops = dense_cost(shape, [L])["dense_flops"]
    assert flops["total"] == hand_count_bert(L)
    ids = torch.randint(0, 60, (1, L))
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert flops["proj_qkvo"] + flops["ffn"] == linear_flops(m, lambda: m(ids, mask))
    # the uniform parent's count is larger, and the ratio is what per-layer shapes give
    parent = dense_cost(cost_shape(tiny_bert()), [L])["dense_flops"]["total"]
    assert parent > flops["total"]
    # a traced run of the pruned model counts the same work, and calls it all kept
    ctx = make_context("", m, trace=True)
    with torch.no_grad():
        m(ids, mask, ctx=ctx)
    cost = work_cost(shape, ctx.work)
    assert cost["actual"]["flops"]["total"] == cost["dense"]["flops"]["total"] == hand_count_bert(L)
    assert cost["flops_kept"] == 1.0


def test_pruned_llama_keeps_kv_and_counts_per_layer():
    m, L = tiny_llama(), 5  # hidden 48, 3 layers x 6 heads of 8 (2 KV heads), gated FFN 40, vocab 60
    remove_heads(m, 0, [0, 1, 3, 4])  # one query head per KV group removed: 4 heads, KV kept
    remove_ffn_neurons(m, 1, range(10))
    remove_layers(m, [2])
    shape = cost_shape(m)
    assert shape.layers == 2 and shape.layer_heads == (4, 6) and shape.layer_ffn == (40, 10)
    assert shape.kv_heads_of(0) == 2
    flops = dense_cost(shape, [L])["dense_flops"]
    d, D, pairs = 48, 8, L * (L + 1) // 2
    hand = 0
    for heads, ffn in ((4, 40), (6, 10)):
        hand += 2 * L * d * (2 * heads * D + 2 * 2 * D) + 2 * 2 * heads * D * pairs + 3 * 2 * L * d * ffn
    assert flops["total"] - flops["lm_head"] == hand
    ids = torch.randint(0, 60, (1, L))
    assert flops["proj_qkvo"] + flops["ffn"] == linear_flops(m, lambda: m(ids))

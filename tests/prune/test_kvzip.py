"""score=kvzip (context reconstruction) and kv_alloc=global, against a brute-force oracle: the dense model
run on the context followed by its repeat (what the reconstruction pass over the cached context is), the
causal softmax recomputed by hand (float64) from each layer's q and k, the max over the repeat's queries
and each KV head's query heads, and the top scores picked by hand (per head, or over all layers/heads)."""

from __future__ import annotations

import pytest
import torch
from kv_oracle import QKOracle, causal_probs, run_with_reconstruction, tiny_llama, top_positions

from dynaprune.errors import DynapruneError
from dynaprune.prune.kv_alloc import global_select, layer_widths
from dynaprune.runtime.pruning import make_context

N, LAYERS, KV_HEADS, GROUP = 20, 3, 2, 3


def ids_of(seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 60, (1, N), generator=torch.Generator().manual_seed(seed))


def oracle_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """(Hkv, N) per layer: max attention of the repeat's queries (a model without a tokenizer repeats the
    context alone) to the context keys, by hand."""
    oracle = QKOracle()
    with torch.inference_mode():
        model(torch.cat([ids, ids], 1), ctx=oracle)
    out = []
    for layer in range(LAYERS):
        probs = causal_probs(*oracle.qk[layer])[0]  # (Hq, 2N, 2N)
        out.append(probs[:, N:, :N].amax(1).view(KV_HEADS, GROUP, N).amax(1))
    return out


def run(model, ids: torch.Tensor, recipe: str):
    return run_with_reconstruction(model, ids, recipe, room=4)


def test_scores_are_the_reconstruction_max_attention():
    model, ids = tiny_llama(), ids_of()
    cache, ctx = run(model, ids, f"kv_tokens={N},score=kvzip,kv_alloc=head")  # nothing evicted: scores only
    want = oracle_scores(model, ids)
    for layer in range(LAYERS):
        got = ctx.scores.by_layer[layer][0].double()
        torch.testing.assert_close(got, want[layer], atol=1e-5, rtol=1e-4)
    assert cache.lengths == [N] * LAYERS  # the repeat's K/V are not left in the cache
    assert int(cache.next_position[0]) == N
    assert ctx.summary()["kv_reconstruction_tokens"] == N
    # by hand: 3 layers x (q,k,v,o: 2*48*8*(6+6+2+2) + MLP 2*3*48*64) per token, attention 6*6*8 per pair
    pairs = N * N + N * (N + 1) // 2
    assert (
        ctx.summary()["kv_reconstruction_flops"] == 3 * (2 * 48 * 8 * 16 + 2 * 3 * 48 * 64) * N + 3 * 6 * 6 * 8 * pairs
    )


@pytest.mark.parametrize("budget", [6, 11])
def test_per_head_selection_keeps_the_top_reconstruction_scores(budget):
    model, ids = tiny_llama(), ids_of()
    cache, _ = run(model, ids, f"kv_tokens={budget},score=kvzip,kv_alloc=head")
    want = oracle_scores(model, ids)
    sinks = set(range(min(4, budget)))  # KVzip's 4 sinks, no recent window
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            assert cache.head_cached_positions(layer)[0, head].tolist() == top_positions(
                want[layer][head].tolist(), budget, sinks
            ), (layer, head)


def test_global_selection_is_one_threshold_over_layers_and_heads():
    model, ids, budget = tiny_llama(), ids_of(5), 6
    cache, _ = run(model, ids, f"kv_tokens={budget},score=kvzip,kv_alloc=global,sink=1")
    want = oracle_scores(model, ids)
    ranked = sorted(
        (-float(want[layer][h][i]), layer, h, i)
        for layer in range(LAYERS)
        for h in range(KV_HEADS)
        for i in range(1, N)
    )  # token 0 is the sink of every head
    chosen = {(layer, h, i) for _, layer, h, i in ranked[: budget * KV_HEADS * LAYERS - KV_HEADS * LAYERS]}
    counts = []
    for layer in range(LAYERS):
        valid = cache.head_valid_mask(layer)[0]
        for h in range(KV_HEADS):
            kept = cache.head_cached_positions(layer)[0, h][valid[h]].tolist()
            assert kept == [0] + sorted(i for (lay, hh, i) in chosen if lay == layer and hh == h), (layer, h)
            counts.append(len(kept))
    assert sum(counts) == budget * KV_HEADS * LAYERS
    assert len(set(counts)) > 1  # heads and layers keep unequal counts


def test_global_select_by_hand():
    scores = [torch.tensor([[[5.0, 1.0, 4.0]]]), torch.tensor([[[2.0, 3.0, 0.0], [9.0, 0.5, 0.1]]])]
    protected = [torch.zeros(1, 1, 3, dtype=torch.bool), torch.tensor([[[False, False, True], [False] * 3]])]
    valid = [torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 2, 3, dtype=torch.bool)]
    (i0, m0), (i1, m1) = global_select(scores, 4, protected, valid)  # protected + 9, 5, 4
    assert i0[m0].tolist() == [0, 2]
    assert [i1[0, h][m1[0, h]].tolist() for h in range(2)] == [[2], [0]]


def test_kvzip_needs_the_prompt_ids_and_global_needs_flat_depth():
    model, ids = tiny_llama(), ids_of()
    cache, ctx = model.new_cache(1, N), make_context("kv_tokens=6,score=kvzip,kv_alloc=head", model)
    with pytest.raises(DynapruneError, match="score=kvzip"), torch.inference_mode():
        model(ids, cache=cache, ctx=ctx)
    with pytest.raises(DynapruneError, match="kv_depth"):
        make_context("kv=0.5,score=h2o,kv_alloc=global,kv_depth=pyramid", model)


def test_decode_tokens_after_the_prompt_get_the_head_mean_and_the_budget_holds():
    model, ids = tiny_llama(), ids_of()
    cache, ctx = run(model, ids, "kv_tokens=8,score=kvzip,kv_alloc=global,recent=2")
    total = sum(int(cache.head_valid_mask(layer).sum()) for layer in range(LAYERS))
    with torch.inference_mode():
        for step in range(3):
            model(torch.tensor([[5 + step]]), cache=cache, ctx=ctx)
    for layer in range(LAYERS):
        assert ctx.scores.by_layer[layer].shape[-1] == cache.lengths[layer]  # aligned with the cache
        assert int(cache.head_valid_mask(layer).sum(-1).max()) <= cache.lengths[layer]
    assert sum(int(cache.head_valid_mask(layer).sum()) for layer in range(LAYERS)) <= total + 3 * LAYERS * KV_HEADS
    assert int(cache.next_position[0]) == N + 3


def test_global_layer_widths_are_the_greedy_optimum_and_heads_keep_their_top():
    model, ids, budget = tiny_llama(), ids_of(7), 6
    cache, _ = run(model, ids, f"kv_tokens={budget},score=kvzip,kv_alloc=global_layer,sink=1")
    want = oracle_scores(model, ids)
    ranked = [
        [sorted((float(x) for x in want[layer][h][1:]), reverse=True) for h in range(KV_HEADS)]
        for layer in range(LAYERS)
    ]
    widths = [1] * LAYERS  # the sink of every head
    for _ in range(budget * LAYERS - LAYERS):  # one more slot per head where the heads gain the most
        gain = [sum(ranked[layer][h][widths[layer] - 1] for h in range(KV_HEADS)) for layer in range(LAYERS)]
        widths[max(range(LAYERS), key=gain.__getitem__)] += 1
    assert cache.lengths == widths and len(set(widths)) > 1
    for layer in range(LAYERS):
        assert bool(cache.head_valid_mask(layer).all())  # no padding: every head keeps the layer's width
        for h in range(KV_HEADS):
            assert cache.head_cached_positions(layer)[0, h].tolist() == top_positions(
                want[layer][h].tolist(), widths[layer], {0}
            )


def test_global_layer_widths_in_whole_blocks_by_hand():
    # one head per layer: layer 0 gains 9, 8 | 1, 1; layer 1 gains 5, 5 | 4, 4 -> blocks 17, 2 | 10, 8
    scores = [torch.tensor([[[9.0, 8.0, 1.0, 1.0]]]), torch.tensor([[[5.0, 4.0, 5.0, 4.0]]])]
    none = [torch.zeros(1, 1, 4, dtype=torch.bool)] * 2
    every = [torch.ones(1, 1, 4, dtype=torch.bool)] * 2
    assert layer_widths(scores, 4, none, every, align=2) == [2, 2]
    assert layer_widths(scores, 5, none, every, align=2) == [2, 2]  # 5 // 2 blocks
    assert layer_widths(scores, 6, none, every, align=2) == [2, 4]
    assert layer_widths(scores, 3, none, every) == [2, 1]


def test_a_context_too_long_to_repeat_is_reconstructed_in_chunks():
    """max_positions 32 < 2N: the context repeats in two chunks of 10 (each after the context, alone);
    a key's score is its max over both chunks' queries, each chunk by hand on context + chunk."""
    model, ids = tiny_llama(), ids_of()
    model.config.max_positions = N + N // 2  # room for half the context after it
    cache, ctx = run(model, ids, f"kv_tokens={N},score=kvzip,kv_alloc=head")
    want = []
    for a, b in ((0, N // 2), (N // 2, N)):
        oracle = QKOracle()
        with torch.inference_mode():
            model(torch.cat([ids, ids[:, a:b]], 1), ctx=oracle)
        want.append([causal_probs(*oracle.qk[layer])[0][:, N:, :N].amax(1).view(KV_HEADS, GROUP, N).amax(1)
                     for layer in range(LAYERS)])
    for layer in range(LAYERS):
        got = ctx.scores.by_layer[layer][0].double()
        torch.testing.assert_close(got, torch.maximum(want[0][layer], want[1][layer]), atol=1e-5, rtol=1e-4)
    assert ctx.summary()["kv_reconstruction_tokens"] == N  # no instruction without a tokenizer
    model.config.max_positions = N  # no room at all: one clear error
    with pytest.raises(DynapruneError, match="no room to repeat"):
        run(model, ids, f"kv_tokens={N},score=kvzip,kv_alloc=head")

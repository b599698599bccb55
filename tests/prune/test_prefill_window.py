"""Prefill selection (prefill_keep / prefill=F): the selection against a brute-force reference (full
softmax rows of the window queries, a hand max-pool, a hand top-k), the cache per layer, nothing pruned
= dense, bad input naming its key."""

from __future__ import annotations

import pytest
import torch
from kv_oracle import QKOracle
from kv_oracle import tiny_llama as _tiny_llama

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.techniques.prefill_window import prefill_choices, resolve_prefill
from dynaprune.runtime.pruning import make_context


def tiny_llama(layers: int = 4) -> Llama:
    return _tiny_llama(layers, max_positions=256)


KeepQK = QKOracle  # a dense run that keeps each layer's q and k (after RoPE)


def expected_kept(q, k, window, sinks, pool, keep) -> list[int]:
    """By hand: each window query's full causal softmax row, summed over queries and heads; a max over
    each token's pool neighbourhood; sinks and window first, then the highest, ties to the earlier."""
    L = k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    score = [0.0] * L
    for h in range(q.shape[1]):
        for i in range(L - window, L):
            row = torch.tensor([float(q[0, h, i] @ k[0, h, j]) / q.shape[-1] ** 0.5 for j in range(i + 1)],
                               dtype=torch.float64).softmax(0)
            for j in range(i + 1):
                score[j] += float(row[j])
    r = pool // 2
    pooled = [max(score[max(0, j - r): j + r + 1]) for j in range(L)]
    n_keep = max(int(keep * L + 0.5), 1)
    protected = set(range(sinks)) | set(range(L - window, L))
    rest = sorted((j for j in range(L) if j not in protected), key=lambda j: (-pooled[j], j))
    return sorted(protected | set(rest[: max(0, n_keep - len(protected))]))


@pytest.mark.parametrize("layer,keep,window,sinks,pool", [(1, 0.5, 4, 2, 3), (0, 0.3, 2, 1, 1), (2, 0.7, 6, 0, 5)])
def test_selection_and_cache_match_brute_force(layer, keep, window, sinks, pool):
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40), generator=torch.Generator().manual_seed(layer))
    oracle = KeepQK()
    with torch.no_grad():
        model(ids, ctx=oracle)
    want = expected_kept(*oracle.qk[layer], window, sinks, pool, keep)
    recipe = (f"prefill_keep={keep},prefill_layer={layer},prefill_window={window},prefill_sinks={sinks},"
              f"prefill_pool={pool}")
    ctx = make_context(recipe, model)
    cache = model.new_cache(1, 64)
    model(ids, cache=cache, ctx=ctx, last_only=True)
    for i in range(4):  # every layer holds the tokens it computed: all up to the selection layer
        held = cache.cached_positions(i)[0].tolist()
        assert held == (list(range(40)) if i <= layer else want), i
    assert cache.next_position.tolist() == [40]  # decoding continues at the prompt's end
    assert ctx.summary()["prefill"]["tokens_kept"] == len(want)
    # up to the selection layer the states saw the whole prompt: K equals the dense run's
    torch.testing.assert_close(cache.k[layer][0, :, :40], oracle.qk[layer][1][0])


def test_nothing_pruned_is_dense():
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 30), generator=torch.Generator().manual_seed(5))
    dense_cache, cache = model.new_cache(1, 40), model.new_cache(1, 40)
    ctx = make_context("prefill_keep=1,prefill_layer=1,prefill_window=4", model)
    want = model(ids, cache=dense_cache, last_only=True)
    got = model(ids, cache=cache, ctx=ctx, last_only=True)
    assert torch.equal(want, got)
    nxt = torch.tensor([[7, 9]])
    assert torch.equal(model(nxt, cache=dense_cache), model(nxt, cache=cache, ctx=ctx))
    for i in range(4):
        assert torch.equal(cache.k[i][:, :, :32], dense_cache.k[i][:, :, :32])


def test_flops_kept_counts_the_selection():
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40), generator=torch.Generator().manual_seed(2))
    ctx = make_context("prefill_keep=0.25,prefill_layer=1,prefill_window=4,prefill_sinks=2", model)
    model(ids, cache=model.new_cache(1, 48), ctx=ctx, last_only=True)
    # query tokens entering each layer: 40, 40, then 10 (sinks and window are inside the 10)
    assert [ctx.layer_stats[i].tokens_in for i in range(4)] == [40, 40, 10, 10]


@pytest.mark.parametrize("recipe,key", [
    ("prefill_keep=0.5,prefill_window=0", "prefill_window"),
    ("prefill_keep=0.5,prefill_pool=4", "prefill_pool"),
    ("prefill_layer=2", "prefill_layer"),
    ("prefill=0.5,prefill_keep=0.3", "prefill_keep"),
    ("prefill=0.01", "prefill"),
])
def test_bad_recipes_name_their_key(recipe, key):
    with pytest.raises(DynapruneError, match=f"'?{key}'?"):
        Recipe.parse(recipe)


@pytest.mark.parametrize("recipe,key", [
    ("prefill_keep=0.5,prefill_layer=4", "prefill_layer"),
    ("prefill_keep=0.5,prefill_window=41", "prefill_window"),
    ("prefill_keep=0.5,prefill_window=38,prefill_sinks=4", "prefill_sinks"),
])
def test_bad_input_for_the_model_or_prompt(recipe, key):
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40))
    with pytest.raises(DynapruneError, match=key):
        ctx = make_context(recipe, model)
        model(ids, cache=model.new_cache(1, 48), ctx=ctx, last_only=True)


def test_prefill_resolves_to_a_shipped_point():
    choices = prefill_choices()
    top = choices[-1]
    assert resolve_prefill(top["flops_kept"]) == top
    assert resolve_prefill(1.0) == top
    r = Recipe.parse(f"prefill={top['flops_kept']}")
    assert str(r) == f"prefill={top['flops_kept']:g}"


@pytest.mark.parametrize("recipe,key", [("prefill_keep=0.5,prefill_window=0", "prefill_window"),
                                        ("prefill_keep=0.5,prefill_layer=30", "prefill_layer"),
                                        ("prefill_keep=0.5,prefill_window=300", "prefill_window")])
def test_cli_bad_prefill_input_is_one_line_and_exit_2(dynaprune_cli, smollm2_path, recipe, key):
    code, text = dynaprune_cli("eval", "smollm2-135m", "lm", "--protocol", "continue", "--context", "256",
                               "--max-examples", "1", "--recipe", recipe)
    assert code == 2 and "Traceback" not in text and key in text
    assert len([line for line in text.splitlines() if line.startswith("error")]) == 1


def test_schedule_cascades_two_selections_like_brute_force():
    """prefill_schedule=1:0.6/2:0.3: layer 1 selects exactly as the brute force does on the dense run;
    layer 2 then keeps 0.3 of the whole prompt, from layer 1's survivors, sinks and window included."""
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40), generator=torch.Generator().manual_seed(11))
    recipe = "prefill_schedule=1:0.6/2:0.3,prefill_window=4,prefill_sinks=2,prefill_pool=3"
    ctx = make_context(recipe, model)
    cache = model.new_cache(1, 64)
    model(ids, cache=cache, ctx=ctx, last_only=True)
    oracle = KeepQK()
    with torch.no_grad():
        model(ids, ctx=oracle)
    first = expected_kept(*oracle.qk[1], 4, 2, 3, 0.6)
    assert cache.cached_positions(2)[0].tolist() == first
    held = cache.cached_positions(3)[0].tolist()
    assert len(held) == int(0.3 * 40 + 0.5) and set(held) <= set(first)
    assert set(held) >= {0, 1, *range(36, 40)}  # sinks and window survive both selections
    assert ctx.summary()["prefill"]["schedule"] == ((1, 0.6), (2, 0.3))
    assert [ctx.layer_stats[i].tokens_in for i in range(4)] == [40, 40, len(first), len(held)]


@pytest.mark.parametrize("recipe,key", [
    ("prefill_schedule=2:0.5/1:0.3", "prefill_schedule"),
    ("prefill_schedule=1:0.3/2:0.5", "prefill_schedule"),
    ("prefill_schedule=1:0.5,prefill_keep=0.5", "prefill_schedule"),
])
def test_bad_schedules_name_their_key(recipe, key):
    with pytest.raises(DynapruneError, match=key):
        Recipe.parse(recipe)


def test_one_point_schedule_is_prefill_keep():
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40), generator=torch.Generator().manual_seed(12))
    outs = []
    for recipe in ("prefill_keep=0.5,prefill_layer=1,prefill_window=4", "prefill_schedule=1:0.5,prefill_window=4"):
        cache = model.new_cache(1, 48)
        outs.append((model(ids, cache=cache, ctx=make_context(recipe, model), last_only=True),
                     [cache.cached_positions(i)[0].tolist() for i in range(4)]))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]

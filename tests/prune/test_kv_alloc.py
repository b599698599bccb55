"""KV budget allocation (kv_alloc=layer|head|ada, kv_depth): Ada-KV's selection against brute force, the
depth schedules by hand, the default (one token set per layer, score=h2o) against attention by hand,
and bad input naming the key."""

from __future__ import annotations

import itertools

import pytest
import torch
from kv_oracle import causal_probs, prefill, tiny_llama, top_positions

from dynaprune.errors import DynapruneError
from dynaprune.prune.kv_alloc import ada_select, layer_budgets
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.pruning import make_context


def brute_force_ada(scores, budget, protected, floor):
    """Per head: protected + its top max(1, round(floor x budget)); then the best of all heads' other
    tokens until budget x heads are kept (ties: lower head, then earlier token)."""
    heads, length = scores.shape
    floor_n = max(1, round(floor * budget))
    kept = set()
    for h in range(heads):
        prot = [i for i in range(length) if protected[h, i]]
        kept |= {(h, i) for i in top_positions(scores[h].tolist(), max(floor_n, len(prot)), set(prot))}
    rest = sorted(((h, i) for h, i in itertools.product(range(heads), range(length)) if (h, i) not in kept),
                  key=lambda hi: (-float(scores[hi]), hi[0] * length + hi[1]))
    kept |= set(rest[: max(0, budget * heads - len(kept))])
    return [sorted(i for hh, i in kept if hh == h) for h in range(heads)]


@pytest.mark.parametrize("seed", range(4))
def test_ada_select_is_the_global_top_with_a_floor(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 3, 12, generator=g) ** 4  # skewed, so heads get different counts
    protected = torch.zeros(1, 3, 12, dtype=torch.bool)
    protected[..., 0] = protected[..., -1] = True
    valid = torch.ones(1, 3, 12, dtype=torch.bool)
    index, mask = ada_select(scores, 4, protected, valid, floor=0.5)
    got = [index[0, h][mask[0, h]].tolist() for h in range(3)]
    assert got == brute_force_ada(scores[0], 4, protected[0], 0.5)
    assert int(mask.sum()) == 12


def test_depth_schedules_keep_the_total():
    assert layer_budgets(100, "flat", 4) == [100] * 4
    pyramid = layer_budgets(100, "pyramid", 5)  # weights 1.5, 1.25, 1, 0.75, 0.5
    assert pyramid == [150, 125, 100, 75, 50]
    assert sum(layer_budgets(37, "pyramid", 30)) == 37 * 30
    assert layer_budgets(10, "3/1", 2) == [15, 5]  # weights normalised to mean 1


def test_default_layer_h2o_keeps_the_summed_attention_by_hand():
    """kv_alloc=layer (default) with score=h2o: one token set per layer, attention summed over every head
    and query (today's behaviour, also spelled out with kv_alloc=layer)."""
    model, n, budget = tiny_llama(), 20, 6
    base = f"kv_tokens={budget},score=h2o,sink=1,recent=1"
    for recipe in (base, base + ",kv_alloc=layer"):
        oracle, cache = prefill(model, recipe, n)
        for layer in range(3):
            score = causal_probs(*oracle.qk[layer])[0].sum((0, 1))
            assert cache.cached_positions(layer)[0].tolist() == top_positions(score.tolist(), budget, {0, n - 1})
            assert cache.head_positions[layer] is None  # no per-head state at all
    assert str(Recipe.parse(f"kv_tokens={budget},kv_alloc=layer,kv_depth=flat")) == f"kv_tokens={budget}"


def test_ada_prefill_keeps_budget_times_heads_and_decodes():
    model, n, budget = tiny_llama(), 20, 6
    ids = torch.randint(1, 60, (1, n + 2), generator=torch.Generator().manual_seed(5))
    ctx = make_context(f"kv_tokens={budget},score=observed,kv_alloc=ada,sink=1,recent=1", model)
    cache = model.new_cache(1, n + 4)
    with torch.inference_mode():
        model(ids[:, :n], cache=cache, ctx=ctx)
        kept = [int(cache.head_valid_mask(layer).sum()) for layer in range(3)]
        assert kept == [budget * 2] * 3
        logits = model(ids[:, n:], cache=cache, ctx=ctx)  # the padded per-head cache decodes
    assert torch.isfinite(logits).all()


def test_bad_input_names_the_key():
    with pytest.raises(DynapruneError, match="kv_alloc"):
        Recipe.parse("kv=0.25,kv_alloc=heads")
    with pytest.raises(DynapruneError, match="kv_depth"):
        Recipe.parse("kv=0.25,kv_depth=1/0/2")
    with pytest.raises(DynapruneError, match="kv_depth.*needs kv"):
        Recipe.parse("kv_depth=pyramid")
    with pytest.raises(DynapruneError, match="kv_alloc.*score=spatten"):
        Recipe.parse("kv=0.25,kv_alloc=head")
    model = tiny_llama()
    with pytest.raises(DynapruneError, match="kv_depth.*2 layer weights for a model of 3"):
        make_context("kv=0.25,score=h2o,kv_depth=1/2", model)
    # pyramid: the last layer gets half the mean budget, too small for 3 sinks + 3 recent tokens
    ctx = make_context("kv_tokens=8,score=h2o,kv_depth=pyramid,sink=3,recent=3", model)
    with pytest.raises(DynapruneError, match="sink \\+ recent.*of layer 2"), torch.inference_mode():
        model(torch.ones(1, 12, dtype=torch.long), cache=model.new_cache(1, 16), ctx=ctx)


def test_cli_unknown_kv_alloc_one_line_exit_2(dynaprune_cli) -> None:
    code, out = dynaprune_cli("eval", "smollm2-135m", "lm", "--protocol", "continue", "--recipe",
                              "kv=0.25,score=h2o,kv_alloc=heads")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "kv_alloc" in lines[0], out

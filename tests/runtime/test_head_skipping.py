"""Skipping the projections of pruned heads: the same outputs as projecting every head and then
dropping the pruned ones (the oracle: a context that never hands the models a head plan)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynaprune.models.bert import Bert, BertConfig
from dynaprune.models.gpt2 import GPT2, GPT2Config
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.head_skipping import HeadPlan, head_rows
from dynaprune.runtime.pruning import PruningContext, make_context

TOL = dict(atol=1e-5, rtol=1e-5)


class ProjectEveryHead(PruningContext):
    """The same pruning, but the models project every head (attention still drops the pruned ones)."""

    def head_plan(self):
        return None


def oracle_context(recipe: str, model) -> PruningContext:
    ctx = make_context(recipe, model)
    return ProjectEveryHead(ctx.recipe, ctx.shape, protect_first=ctx.protect_first, protect_last=ctx.protect_last)


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def tiny_bert() -> Bert:
    cfg = BertConfig(vocab_size=60, hidden_size=48, num_layers=4, num_heads=6, intermediate_size=64,
                     max_position_embeddings=64)
    return randomized(Bert(cfg))


def tiny_llama(kv_heads: int = 2) -> Llama:
    cfg = LlamaConfig(vocab=60, hidden=48, layers=4, heads=6, kv_heads=kv_heads, head_dim=8, intermediate=64,
                      max_positions=128)
    return randomized(Llama(cfg))


def tiny_gpt2() -> GPT2:
    return randomized(GPT2(GPT2Config.from_hf({"vocab_size": 60, "n_positions": 64, "n_embd": 48, "n_layer": 4,
                                               "n_head": 6})))


def padded_batch():
    """Three rows of 14, 10 and 6 real tokens (right padding)."""
    ids = torch.randint(1, 60, (3, 14), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(14) < torch.tensor([14, 10, 6])[:, None]


def test_plan_projects_the_heads_alive_in_any_row_and_zeros_the_rest():
    torch.manual_seed(0)
    heads, kv_heads, dim, hidden = 6, 3, 4, 16
    qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * dim)
    out = nn.Linear(heads * dim, hidden)
    x = torch.randn(2, 5, hidden)
    alive = torch.tensor([[0, 1, 4], [0, 1, 5]])  # rows differ: heads 0, 1, 4, 5 run, KV groups 0 and 2
    plan = HeadPlan.make(alive, heads, kv_heads, dim)
    assert plan.projected.tolist() == [0, 1, 4, 5] and plan.kv.tolist() == [0, 2] and plan.kv_computed == 2
    q, k, v = plan.qkv(x, qkv)
    full_q, full_k, full_v = qkv(x).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    for h in range(heads):
        expected = full_q[..., h * dim:(h + 1) * dim] if h in (0, 1, 4, 5) else torch.zeros(2, 5, dim)
        torch.testing.assert_close(q[:, h], expected, **TOL)
    for g in range(kv_heads):
        for got, full in ((k, full_k), (v, full_v)):
            expected = full[..., g * dim:(g + 1) * dim] if g in (0, 2) else torch.zeros(2, 5, dim)
            torch.testing.assert_close(got[:, g], expected, **TOL)
    # the attention hands back zeros for the heads a row pruned; the output projection then equals the full one
    y = torch.randn(2, heads, 5, dim)
    dead = torch.ones(2, heads, dtype=torch.bool).scatter(1, alive, False)
    zeroed = y.masked_fill(dead[:, :, None, None], 0.0)
    torch.testing.assert_close(plan.output(zeroed, out), out(zeroed.transpose(1, 2).reshape(2, 5, -1)), **TOL)


def test_query_head_pruning_under_gqa_keeps_a_kv_head_while_any_of_its_query_heads_lives():
    plan = HeadPlan.make(torch.tensor([[0, 1, 4]]), heads=6, kv_heads=2, head_dim=4)
    assert plan.kv.tolist() == [0, 1] and plan.kv_computed == 2 and plan.projected.tolist() == [0, 1, 4]
    mha = HeadPlan.make(torch.tensor([[0, 4], [1, 2]]), heads=6, kv_heads=6, head_dim=4)
    assert mha.kv.tolist() == [0, 1, 2, 4] and mha.projected.tolist() == [0, 1, 2, 4]
    assert head_rows(torch.tensor([1, 3]), 2, offset=10).tolist() == [12, 13, 16, 17]


@pytest.mark.parametrize("recipe", ["head_schedule=1:0.5", "head=0.5", "token=0.6,head=0.7"])
def test_bert_with_skipped_projections_matches_projecting_every_head(recipe):
    model = tiny_bert()
    ids, mask = padded_batch()
    ctx, oracle = make_context(recipe, model), oracle_context(recipe, model)
    hidden, kept = model(ids, mask, ctx=ctx)
    expected, expected_kept = model(ids, mask, ctx=oracle)
    assert ctx.head_plan() is not None  # heads really were pruned
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(hidden, expected, **TOL)
    assert torch.equal(ctx.head_index, oracle.head_index)


class PerRowHeads:
    """After layer 0, each row of the batch keeps different heads (the projections run on their union)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stage = next(s for s in self.stages if hasattr(s, "prune_heads"))

        def prune_heads(layer):
            if layer == 0:
                stage.head_index = torch.tensor([[0, 1, 2], [1, 2, 3], [0, 2, 3]])

        stage.prune_heads = prune_heads


class PerRowSkipping(PerRowHeads, PruningContext):
    pass


class PerRowOracle(PerRowHeads, ProjectEveryHead):
    pass


def test_rows_keeping_different_heads_match_projecting_every_head():
    model = tiny_bert()
    ids, mask = padded_batch()
    shape = make_context("head=0.5", model).shape
    ctx = PerRowSkipping(Recipe.parse("head=0.5"), shape)
    hidden, _ = model(ids, mask, ctx=ctx)
    assert ctx.head_plan().projected.tolist() == [0, 1, 2, 3]  # heads 4 and 5 pruned in every row
    expected, _ = model(ids, mask, ctx=PerRowOracle(Recipe.parse("head=0.5"), shape))
    torch.testing.assert_close(hidden, expected, **TOL)


@pytest.mark.parametrize("kv_heads,recipe", [(2, "head=0.5,head_unit=kv"), (2, "head=0.5"), (6, "head=0.5")],
                         ids=["gqa-kv-groups", "gqa-query-heads", "mha"])
def test_llama_prefill_and_decode_with_skipped_projections(kv_heads, recipe):
    model = tiny_llama(kv_heads)
    prompts = [[5, 9, 3, 22, 7, 1, 40, 2, 8, 11], [4, 4, 17, 30, 2, 19]]
    ours = model.generate(prompts, max_new_tokens=12, stop_tokens=[], ctx=make_context(recipe, model))
    reference = model.generate(prompts, max_new_tokens=12, stop_tokens=[], ctx=oracle_context(recipe, model))
    assert ours.new_ids == reference.new_ids
    ids = torch.tensor([prompts[0]])
    ctx = make_context(recipe, model)
    logits = model(ids, ctx=ctx)
    torch.testing.assert_close(logits, model(ids, ctx=oracle_context(recipe, model)), **TOL)
    assert ctx.head_plan() is not None


def test_gpt2_with_skipped_projections_matches_projecting_every_head():
    model = tiny_gpt2()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    ctx = make_context("head=0.5", model)
    torch.testing.assert_close(model(ids, ctx=ctx), model(ids, ctx=oracle_context("head=0.5", model)), **TOL)
    assert ctx.head_plan() is not None


def test_projection_flops_count_only_the_alive_heads():
    """Projection FLOPs = 2 d D (2 query-head tokens + 2 KV-head tokens), summed over the layers with the
    heads each layer really ran (from the per-layer head counts), and below the oracle's."""
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 60, (1, 20), generator=torch.Generator().manual_seed(5))
    shape = cost_shape(model)
    ctx, oracle = make_context("head=0.34,head_unit=kv", model), oracle_context("head=0.34,head_unit=kv", model)
    model(ids, ctx=ctx)
    model(ids, ctx=oracle)
    heads_per_layer = ctx.summary()["heads_per_layer"]
    assert min(heads_per_layer) < shape.heads
    group = shape.heads // shape.kv_heads
    expected = sum(2 * shape.hidden * shape.head_dim * (2 * 20 * h + 2 * 20 * (h // group)) for h in heads_per_layer)
    assert work_cost(shape, ctx.work)["actual"]["flops"]["proj_qkvo"] == expected
    oracle_proj = work_cost(shape, oracle.work)["actual"]["flops"]["proj_qkvo"]
    assert expected < oracle_proj <= work_cost(shape, ctx.work)["dense"]["flops"]["proj_qkvo"]

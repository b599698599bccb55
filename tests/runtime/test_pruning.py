"""The pruning run context inside a real (random-weight) encoder, against independent oracles."""

from __future__ import annotations

import torch

from dynaprune.models.bert import Bert, BertConfig
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.pruning import PruningContext, make_context


def tiny_bert(seed: int = 0) -> Bert:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48,
                     max_position_embeddings=64)
    model = Bert(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    mask[2, 5:] = False
    return ids, mask


class Spy(PruningContext):
    """Remembers what between_layers handed on after each layer."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.after: dict[int, dict] = {}

    def between_layers(self, layer, hidden, keep):
        hidden, keep = super().between_layers(layer, hidden, keep)
        self.after[layer] = {"hidden": hidden, **keep}
        return hidden, keep


def test_dense_recipe_is_bit_identical():
    model = tiny_bert()
    ids, mask = batch()
    ctx = make_context("dense", model)
    assert type(ctx) is RunContext
    dense_hidden, _ = model(ids, mask)
    hidden, _ = model(ids, mask, ctx=ctx)
    assert torch.equal(hidden, dense_hidden)


def test_token_pruning_gathers_the_top_tokens_and_then_runs_dense_on_them():
    model = tiny_bert()
    ids, mask = batch()
    recipe = Recipe.parse("token_schedule=1:0.5")
    spy = Spy(recipe, make_context(recipe, model).shape, keep_pruned_states=False)
    hidden, kept_mask = model(ids, mask, ctx=spy)

    # oracle 1: importance = attention received over heads, real queries and layers 0-1, from a dense run
    dense = RunContext(record_probs=True)
    model(ids, mask, ctx=dense)
    importance = torch.zeros(3, 12)
    for rec in dense.records[:2]:
        importance += (rec.probs * mask[:, None, :, None]).sum(dim=(1, 2))
    pos = spy.after[1]["pos"]
    for b in range(3):
        n_real = int(mask[b].sum())
        n_keep = max(1, int(0.5 * n_real + 0.5))
        scores = importance[b, :n_real].clone()
        scores[0] = float("inf")  # [CLS] is protected
        expected = sorted(torch.argsort(scores, descending=True, stable=True)[:n_keep].tolist())
        assert pos[b][spy.after[1]["mask"][b]].tolist() == expected

    # oracle 2: dense layers 0-1 on everything, gather the kept tokens, dense layers 2-3 on them
    x = model.emb_ln(model.tok_emb(ids) + model.pos_emb(torch.arange(12)) + model.type_emb.weight[0])
    for i in range(2):
        x = model.layers[i](x, mask, i, RunContext())
    x = torch.gather(x, 1, pos[:, :, None].expand(-1, -1, x.shape[-1]))
    for i in range(2, 4):
        x = model.layers[i](x, kept_mask, i, RunContext())
    real = kept_mask[:, :, None]
    torch.testing.assert_close(hidden * real, x * real, atol=1e-5, rtol=1e-5)
    assert spy.summary()["tokens_per_layer"][:2] == [int(mask.sum())] * 2
    assert spy.summary()["tokens_per_layer"][2] == int(kept_mask.sum())


def test_pruned_tokens_keep_their_frozen_state_for_pooling():
    model = tiny_bert()
    ids, mask = batch()
    recipe = Recipe.parse("token_schedule=1:0.5")
    spy = Spy(recipe, make_context(recipe, model).shape)
    states, pooled_mask = model(ids, mask, ctx=spy)
    assert states.shape[1] == 12 and torch.equal(pooled_mask, mask)


def test_head_pruning_zeroes_the_least_important_heads():
    model = tiny_bert()
    ids, mask = batch()
    recipe = Recipe.parse("head_schedule=2:0.5")
    ctx = make_context(recipe, model, record_probs=True)
    model(ids, mask, ctx=ctx)
    dense = RunContext(record_head_outputs=True)
    model(ids, mask, ctx=dense)
    importance = sum((r.head_outputs.abs() * mask[:, None, :, None]).sum(dim=(2, 3)) for r in dense.records[:3])
    expected = torch.argsort(importance, dim=1, descending=True, stable=True)[:, :2].sort(dim=1).values
    assert torch.equal(ctx.head_index, expected)
    assert ctx.summary()["heads_per_layer"] == [4, 4, 4, 2]


def tiny_llama():
    from dynaprune.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=50, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=48,
                      max_positions=256)
    return Llama(cfg).eval()


def test_kv_budget_bounds_the_cache_and_reports_the_work_saved():
    from dynaprune.runtime.cost import cost_shape, work_cost

    model = tiny_llama()
    prompt = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    dense, pruned = RunContext(), make_context("kv_tokens=10,sink=2,recent=3", model)
    model.generate(prompt, max_new_tokens=120, stop_tokens=[], ctx=dense)
    caches = []
    original = model.new_cache
    model.new_cache = lambda *a, **k: caches.append(original(*a, **k)) or caches[-1]
    model.generate(prompt, max_new_tokens=120, stop_tokens=[], ctx=pruned)
    cache = caches[0]
    # generated 3x past the budget: every layer holds the budget, sinks are the first positions
    assert cache.lengths == [10, 10]
    assert cache.cached_positions(0)[0, :2].tolist() == [0, 1]
    assert cache.bytes_held() == 2 * 2 * 2 * 10 * 16 * 4  # layers x (K, V) x kv heads x tokens x dim x fp32
    shape = cost_shape(model)
    ours, reference = work_cost(shape, pruned.work), work_cost(shape, dense.work)
    assert ours["dense"]["flops"] == reference["actual"]["flops"]  # the same dense reference
    assert ours["attention_flops_kept"] < 0.25 and ours["kv_bytes_kept"] < 0.25


def test_a_large_kv_budget_evicts_in_chunks_and_never_holds_more_than_the_budget():
    from dynaprune.runtime.pruning import EVICT_SLACK

    model = tiny_llama()
    prompt = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    ctx = make_context("kv_tokens=128", model)
    held = []
    ends = ctx.end_forward
    ctx.end_forward = lambda cache: (ends(cache), held.append(list(cache.lengths)))
    model.generate(prompt, max_new_tokens=30, stop_tokens=[], ctx=ctx)
    floor = 128 - int(128 * EVICT_SLACK)
    assert all(floor <= n <= 128 for lengths in held for n in lengths)
    assert held[0] == [128, 128]  # the prompt is cut to exactly the budget (the slack is for decoding)
    assert [floor, floor] in held  # the first decode step past the budget drops to the chunk's floor

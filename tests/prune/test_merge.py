"""Token merging (token_policy=merge, prune/merge.py): one merge step against a loop written from ToMe's
definition, exact invariants (sizes add up, nothing pruned = dense bit for bit, a token of size s with
+log s = s copies of it), the pooled embedding as a size-weighted mean, the work counted by hand, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.bert import Bert, BertConfig
from dynaprune.prune.keys import keep_count
from dynaprune.prune.merge import key_metric, merge_into_kept, proportional_probs
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.tokens import select_tokens_to_keep
from dynaprune.runtime.attention import attention_with_received, sdpa
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context


def tiny_bert(seed: int = 0) -> Bert:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48,
                     max_position_embeddings=64)
    model = Bert(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    mask[2, 5:] = False
    return ids, mask


def merge_by_hand(hidden, sizes, keys, kept_positions, valid):
    """One row, in loops: each real token not kept joins the kept token whose head-averaged key has the
    largest cosine with its own (ties: the earlier kept token); a kept token's new state is the
    size-weighted mean of its group, its size the group's total size."""
    H, L, D = keys.shape
    mean = [[sum(float(keys[h, i, c]) for h in range(H)) / H for c in range(D)] for i in range(L)]

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    groups = {j: [j] for j in kept_positions}
    for i in range(L):
        if valid[i] and i not in groups:
            best, best_sim = None, -math.inf
            for j in kept_positions:  # in order: a later equal similarity does not replace the earlier
                s = cos(mean[i], mean[j])
                if s > best_sim:
                    best, best_sim = j, s
            groups[best].append(i)
    states, new_sizes = [], []
    for j in kept_positions:
        total = sum(float(sizes[i]) for i in groups[j])
        states.append([sum(float(sizes[i]) * float(hidden[i, c]) for i in groups[j]) / total
                       for c in range(hidden.shape[1])])
        new_sizes.append(total)
    return torch.tensor(states, dtype=torch.float64), torch.tensor(new_sizes, dtype=torch.float64)


def test_one_merge_step_matches_the_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, H, L, D, d = 3, 2, 9, 4, 5
    hidden = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    keys = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    keys[0, :, 7] = keys[0, :, 2] * 3.0  # same direction as a kept token: cosine 1 whatever the length
    sizes = torch.randint(1, 4, (B, L), generator=g).double()
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 7:] = False
    valid[2, 4:] = False
    importance = torch.rand(B, L, generator=g)
    importance[0, 2], importance[0, 7] = 10.0, -1.0  # 2 kept, 7 merged
    selection = select_tokens_to_keep(importance, torch.tensor([4, 3, 2]), valid=valid)
    merged = merge_into_kept(hidden, sizes, key_metric(keys), selection.index, selection.mask, valid)
    for b in range(B):
        n = int(selection.mask[b].sum())
        kept = selection.index[b, :n].tolist()
        want_states, want_sizes = merge_by_hand(hidden[b], sizes[b], keys[b], kept, valid[b].tolist())
        torch.testing.assert_close(merged.hidden[b, :n], want_states, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.sizes[b, :n], want_sizes, rtol=0, atol=0)
        assert merged.sizes[b, n:].abs().sum() == 0  # filler entries stand for nothing
        # sizes add up: the row still stands for every real token it had, with their sizes
        assert float(merged.sizes[b].sum()) == float((sizes[b] * valid[b]).sum())
    assert merged.dest[0, 7] == selection.index[0].tolist().index(2)  # cosine 1 with token 2


def test_an_untouched_kept_token_keeps_its_state_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 6, 8, generator=g)
    keys = torch.randn(1, 2, 6, 4, generator=g)
    valid = torch.ones(1, 6, dtype=torch.bool)
    selection = select_tokens_to_keep(torch.arange(6.0)[None], 5, valid=valid)  # drops token 0 only
    sizes = torch.full((1, 6), 3.0)
    merged = merge_into_kept(hidden, sizes, key_metric(keys), selection.index, selection.mask, valid)
    target = int(merged.dest[0, 0])
    for slot in range(5):
        if slot != target:
            assert torch.equal(merged.hidden[0, slot], hidden[0, slot + 1])


def test_size_s_with_log_s_bias_equals_s_copies_without_bias():
    """The exact oracle of proportional attention: key j of size s_j, +log s_j on its logits, gives the
    attention of a sequence holding s_j identical copies of key j (and of its value)."""
    g = torch.Generator().manual_seed(2)
    B, H, Lq, Lk, D = 2, 3, 5, 4, 8
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    sizes = torch.tensor([[1, 3, 2, 1], [4, 1, 1, 2]], dtype=torch.float64)
    copies = [sizes[b].long().tolist() for b in range(B)]
    width = max(sum(c) for c in copies)
    k_rep = torch.zeros(B, H, width, D, dtype=torch.float64)
    v_rep = torch.zeros(B, H, width, D, dtype=torch.float64)
    key_mask = torch.zeros(B, width, dtype=torch.bool)
    for b in range(B):
        idx = torch.tensor([j for j, n in enumerate(copies[b]) for _ in range(n)])
        k_rep[b, :, : len(idx)], v_rep[b, :, : len(idx)], key_mask[b, : len(idx)] = k[b][:, idx], v[b][:, idx], True
    scale = D**-0.5
    want = sdpa(q, k_rep, v_rep, key_mask, False, scale)
    bias = sizes.log()
    torch.testing.assert_close(sdpa(q, k, v, None, False, scale, key_bias=bias), want, rtol=1e-12, atol=1e-12)
    out, received = attention_with_received(q, k, v, scale, None, False, key_bias=bias)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # what each merged key received = what its copies received together
    _, received_rep = attention_with_received(q, k_rep, v_rep, scale, key_mask, False)
    for b in range(B):
        idx = torch.tensor([j for j, n in enumerate(copies[b]) for _ in range(n)])
        summed = torch.zeros(Lk, dtype=torch.float64).index_add_(0, idx, received_rep[b, : len(idx)])
        torch.testing.assert_close(received[b], summed, rtol=1e-12, atol=1e-12)
    # the probabilities path (explicit attention: quantization, value pruning) reweights p s / sum(p s)
    probs = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
    torch.testing.assert_close(proportional_probs(probs, sizes) @ v, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recipe", ["token=1.0", "token_schedule=1:1.0"])
def test_nothing_pruned_merge_equals_drop_equals_dense_bit_for_bit(recipe):
    model, (ids, mask) = tiny_bert(), batch()
    with torch.inference_mode():
        dense, dense_mask = model(ids, mask)
        drop = model(ids, mask, ctx=make_context(recipe, model))
        merge = model(ids, mask, ctx=make_context(recipe + ",token_policy=merge", model))
    assert torch.equal(dense, drop[0]) and torch.equal(dense, merge[0])
    assert torch.equal(dense_mask, drop[1]) and torch.equal(dense_mask, merge[1])


def test_pooled_states_are_the_size_weighted_mean_and_sizes_add_up():
    model, (ids, mask) = tiny_bert(), batch()
    ctx = make_context("token_schedule=0:0.7/2:0.4,token_policy=merge", model)
    with torch.inference_mode():
        full, full_mask = model(ids, mask, ctx=ctx)
    stage = ctx.stages[0]
    assert torch.equal(full_mask, mask)  # every original real token is pooled
    assert torch.equal(stage.sizes.sum(-1), mask.sum(-1).to(stage.sizes.dtype))  # sizes add up
    # any final states of the survivors: pooling the put-back states = the size-weighted mean of survivors
    survivors = torch.randn(3, stage.sizes.shape[1], 32, dtype=torch.float64)
    put_back, put_mask = stage.final_states(survivors, {})
    pooled = (put_back * put_mask[..., None]).sum(1) / put_mask.sum(1, keepdim=True)
    weighted = (survivors * stage.sizes[..., None]).sum(1) / stage.sizes.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, weighted, rtol=1e-12, atol=1e-12)
    assert bool((stage.slot[:, 0] == 0).all())  # [CLS] stays first: CLS pooling reads hidden[:, 0]


def test_merge_changes_what_drop_gives_and_keeps_the_same_tokens_per_layer():
    model, (ids, mask) = tiny_bert(), batch()
    recipe = "token_schedule=0:0.7/2:0.4"
    drop_ctx, merge_ctx = make_context(recipe, model), make_context(recipe + ",token_policy=merge", model)
    with torch.inference_mode():
        drop = model(ids, mask, ctx=drop_ctx)[0]
        merge = model(ids, mask, ctx=merge_ctx)[0]
    assert drop_ctx.summary()["tokens_per_layer"] == merge_ctx.summary()["tokens_per_layer"]
    assert not torch.allclose(drop, merge)
    real = mask.sum(-1).tolist()
    assert merge_ctx.summary()["tokens_merged"] == sum(real) - sum(keep_count(0.4, n) for n in real)


def hand_merge_flops(n_before: int, n_after: int, heads: int, head_dim: int, hidden: int) -> int:
    pruned = n_before - n_after
    return n_before * head_dim * (heads + 3) + pruned * n_after * (2 * head_dim + 1) + 2 * hidden * (pruned + n_after)


def test_minilm_merge_runs_and_counts_its_work(minilm_path):
    from dynaprune.models import load

    model = load(str(minilm_path))
    text = ["A man is playing a large guitar on the stage tonight while his friends sing along loudly."]
    n = len(model.tokenize(text)[0])
    recipe = Recipe.parse("token=0.5,token_policy=merge")
    costs = {}
    for policy in ("drop", "merge"):
        ctx = make_context(f"token=0.5,token_policy={policy}", model)
        emb = model.embed(text, ctx_factory=lambda ctx=ctx: ctx)
        assert torch.isfinite(emb).all()
        costs[policy] = work_cost(cost_shape(model), ctx.work)
    counts = [n, *recipe.token_keep_counts(6, n)]
    shape = cost_shape(model)
    want = sum(hand_merge_flops(counts[i], counts[i + 1], shape.heads, shape.head_dim, shape.hidden)
               for i in range(6) if counts[i + 1] < counts[i])
    assert costs["merge"]["actual"]["flops"]["token_merge"] == want > 0
    assert costs["drop"]["actual"]["flops"]["token_merge"] == 0
    dense_total = costs["merge"]["dense"]["flops"]["total"]
    assert costs["merge"]["flops_kept"] == pytest.approx(costs["drop"]["flops_kept"] + want / dense_total, abs=1e-12)


@pytest.mark.parametrize("recipe, needle", [
    ("token=0.5,token_policy=squash", "recipe key 'token_policy': 'squash' is not one of drop, merge"),
    ("token_policy=merge", "recipe key 'token_policy'"),
    ("token=0.5,token_policy=merge,block_sparsity=0.5", "recipe key 'token_policy': merge needs proportional"),
])
def test_bad_policies_name_the_key(recipe, needle):
    with pytest.raises(DynapruneError, match="token_policy") as err:
        Recipe.parse(recipe)
    assert needle in str(err.value)


def test_merge_on_a_decoder_is_refused():
    from dynaprune.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab=60, hidden=48, layers=2, heads=6, kv_heads=2, head_dim=8, intermediate=64,
                      max_positions=64)
    with pytest.raises(DynapruneError, match="recipe key 'token_policy': merge is for encoders"):
        make_context("token=0.5,token_policy=merge", Llama(cfg))


def test_cli_unknown_policy_is_one_error_line(dynaprune_cli):
    code, text = dynaprune_cli("eval", "minilm-l6", "sts", "--recipe", "token=0.5,token_policy=average")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "token_policy" in lines[0], text


def bipartite_by_hand(metric, valid, protected):
    """One row, in loops: free real tokens alternate A, B, A, ... (protected ones are B); an A token
    scores minus its best cosine with a B token, a B token 2, padding -inf."""
    L = len(valid)
    free = [i for i in range(L) if valid[i] and not protected[i]]
    a_set = set(free[0::2])
    b_set = [i for i in range(L) if valid[i] and i not in a_set]
    out = []
    for i in range(L):
        if not valid[i]:
            out.append(-math.inf)
        elif i in a_set:
            out.append(-max(float(metric[i] @ metric[j]) for j in b_set))
        else:
            out.append(2.0)
    return torch.tensor(out, dtype=torch.float64)


def test_bipartite_importance_matches_the_loop_reference_and_drops_the_closest_pair_first():
    from dynaprune.prune.merge import bipartite_importance
    from dynaprune.prune.tokens import edge_token_mask

    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 10, 4, generator=g, dtype=torch.float64)
    keys[0, :, 3] = keys[0, :, 2] * 2.0  # token 3 (A: free rank 2) is a copy of token 2 (B: free rank 1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    protected = edge_token_mask(valid, first=1, last=1)
    metric = key_metric(keys)
    got = bipartite_importance(metric, valid, protected)
    for b in range(2):
        torch.testing.assert_close(got[b], bipartite_by_hand(metric[b], valid[b].tolist(), protected[b].tolist()))
    selection = select_tokens_to_keep(got, 9, protected, valid)
    assert 3 not in selection.index[0, :9].tolist()  # the exact duplicate goes first
    assert {0, 9} <= set(selection.index[0, :9].tolist())  # [CLS] and [SEP] stay


def test_tome_policy_keeps_the_token_counts_and_sizes_add_up():
    model, (ids, mask) = tiny_bert(), batch()
    recipe = "token_schedule=0:0.7/2:0.4"
    drop_ctx, tome_ctx = make_context(recipe, model), make_context(recipe + ",token_policy=tome", model)
    with torch.inference_mode():
        model(ids, mask, ctx=drop_ctx)
        full, full_mask = model(ids, mask, ctx=tome_ctx)
    stage = tome_ctx.stages[0]
    assert drop_ctx.summary()["tokens_per_layer"] == tome_ctx.summary()["tokens_per_layer"]
    assert torch.equal(full_mask, mask)
    assert torch.equal(stage.sizes.sum(-1), mask.sum(-1).to(stage.sizes.dtype))
    assert tome_ctx.summary()["tokens_merged"] == int(mask.sum()) - sum(keep_count(0.4, int(n)) for n in mask.sum(-1))


def merge_full_width(hidden, sizes, metric, keep_index, keep_mask, valid):
    """The textbook tensor form, every kept token weighted and divided (no compaction): the kept
    states scaled by their sizes, each pruned token's ``s h`` added into its nearest kept token in order,
    the sums divided by the summed sizes; untouched kept tokens copied as they are."""
    B, L, d = hidden.shape
    K = keep_index.shape[1]
    kept = torch.zeros_like(valid).scatter(1, keep_index, keep_mask)
    gathered = torch.gather(hidden, 1, keep_index[..., None].expand(-1, -1, d))
    weight = sizes * valid.to(hidden.dtype)
    new_sizes = torch.gather(weight, 1, keep_index) * keep_mask.to(hidden.dtype)
    total = gathered * new_sizes[..., None]
    similarity = metric @ torch.gather(metric, 1, keep_index[..., None].expand(-1, -1, metric.shape[-1])).mT
    nearest = similarity.masked_fill(~keep_mask[:, None, :], float("-inf")).argmax(-1)  # (B, L)
    grew = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        for i in range(L):  # in token order, as the pruned tokens are listed
            if valid[b, i] and not kept[b, i]:
                j = int(nearest[b, i])
                total[b, j] += hidden[b, i] * weight[b, i]
                new_sizes[b, j] += weight[b, i]
                grew[b, j] = True
    out = torch.where(grew[..., None], total / new_sizes.clamp_min(1e-12)[..., None], gathered)
    return out, new_sizes * keep_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compacted_merge_equals_the_full_width_form_bit_for_bit(dtype):
    """merge_into_kept only weights, divides and writes back the kept tokens something joined; the
    numbers are those of the full-width form (same operations in the same order), padding, filler
    entries, exact ties and rows where nothing is merged included."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        B, L, H, D, d = 4, int(torch.randint(2, 30, (1,), generator=g)), 3, 4, 6
        hidden = torch.randn(B, L, d, generator=g, dtype=dtype)
        keys = torch.randn(B, H, L, D, generator=g, dtype=dtype)
        if seed % 3 == 0:  # repeated keys: exact ties go to the earlier kept token
            keys[:, :, L // 2:] = keys[:, :, : L - L // 2]
        n = torch.randint(1, L + 1, (B,), generator=g)
        n[0] = L
        valid = torch.arange(L)[None] < n[:, None]
        sizes = torch.randint(1, 5, (B, L), generator=g).to(dtype)
        target = (n * torch.rand(B, generator=g)).long().clamp_min(1)
        target[-1] = n[-1]  # a row that merges nothing
        selection = select_tokens_to_keep(torch.rand(B, L, generator=g), target, valid=valid)
        metric = key_metric(keys)
        merged = merge_into_kept(hidden, sizes, metric, selection.index, selection.mask, valid)
        want_states, want_sizes = merge_full_width(hidden, sizes, metric, selection.index, selection.mask, valid)
        assert torch.equal(merged.hidden, want_states), seed
        assert torch.equal(merged.sizes, want_sizes), seed

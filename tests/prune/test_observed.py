"""score=observed: attention received / queries that could see the key, per KV head (kv_alloc=head) and
per layer, against the causal softmax recomputed by hand from each layer's q and k."""

from __future__ import annotations

import torch
from kv_oracle import causal_probs, prefill, tiny_llama, top_positions

from dynaprune.prune.scorers.observed import queries_seeing_keys


def test_queries_seeing_keys_by_hand():
    # 3 new queries over 5 keys (2 cached): keys 0..2 seen by all 3, key 3 by 2, key 4 by 1
    assert queries_seeing_keys(3, 5, None, 1).tolist() == [[3, 3, 3, 2, 1]]
    # left padding: the first query is padding, so it sees nothing and counts for no key
    mask = torch.tensor([[False, True, True]])
    assert queries_seeing_keys(3, 3, mask, 1).tolist() == [[2, 2, 1]]


def test_per_head_selection_is_the_normalised_observed_attention():
    model, n, budget = tiny_llama(), 20, 7
    oracle, cache = prefill(model, f"kv_tokens={budget},score=observed,kv_alloc=head,sink=1,recent=2", n)
    kept = cache.head_cached_positions
    for layer in range(3):
        probs = causal_probs(*oracle.qk[layer])[0]  # (Hq, L, L)
        per_kv = probs.sum(1).view(2, 3, n).sum(1) / torch.arange(n, 0, -1).double()  # L - i queries see key i
        for head in range(2):
            want = top_positions(per_kv[head].tolist(), budget, {0, n - 2, n - 1})
            assert kept(layer)[0, head].tolist() == want, (layer, head)
    heads_differ = any(kept(i)[0, 0].tolist() != kept(i)[0, 1].tolist() for i in range(3))
    assert heads_differ  # each KV head its own tokens


def test_layer_selection_sums_the_heads():
    model, n, budget = tiny_llama(), 20, 6
    oracle, cache = prefill(model, f"kv_tokens={budget},score=observed,sink=0,recent=1", n)
    for layer in range(3):
        probs = causal_probs(*oracle.qk[layer])[0]
        score = probs.sum((0, 1)) / torch.arange(n, 0, -1).double()
        assert cache.cached_positions(layer)[0].tolist() == top_positions(score.tolist(), budget, {n - 1})

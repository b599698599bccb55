"""score=snapkv: the last WINDOW queries' attention per KV head, max-pooled over KERNEL neighbours, against
the causal softmax recomputed by hand from each layer's q and k."""

from __future__ import annotations

import torch
from kv_oracle import causal_probs, prefill, tiny_llama, top_positions

from dynaprune.prune.scorers import snapkv


def test_per_head_selection_is_the_pooled_window_attention(monkeypatch):
    monkeypatch.setattr(snapkv, "WINDOW", 4)
    monkeypatch.setattr(snapkv, "KERNEL", 3)
    model, n, budget = tiny_llama(), 24, 9
    oracle, cache = prefill(model, f"kv_tokens={budget},score=snapkv,kv_alloc=head,sink=0", n)
    for layer in range(3):
        probs = causal_probs(*oracle.qk[layer])[0]  # (Hq, L, L)
        window = probs[:, n - 4:].sum(1).view(2, 3, n).sum(1)  # (Hkv, L)
        pooled = [[max(window[h, max(0, i - 1): i + 2].tolist()) for i in range(n)] for h in range(2)]
        for head in range(2):
            want = top_positions(pooled[head], budget, set(range(n - 4, n)))  # the window is protected
            assert cache.head_cached_positions(layer)[0, head].tolist() == want, (layer, head)


def test_window_scores_only_read_the_window_rows():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    got = snapkv.window_scores(q, k, None, 8**-0.5, window=3, kernel=1)
    probs = causal_probs(q, k)[0]
    torch.testing.assert_close(got[0].double(), probs[:, 7:].sum(1).view(2, 3, 10).sum(1), rtol=1e-5, atol=1e-6)

"""Per-KV-head compaction (issue 14 item 1) against a brute-force gather, and the attention it feeds
against a materialised softmax over each head's own tokens."""

from __future__ import annotations

import torch

from dynaprune.runtime.attention import attention_with_received, sdpa
from dynaprune.runtime.kvcache import KVCache


def _filled(batch=2, n_kv=2, length=10, dim=4, seed=0) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(2, batch, n_kv, dim, 16)
    k = torch.randn(batch, n_kv, length, dim, generator=g)
    v = torch.randn(batch, n_kv, length, dim, generator=g)
    cache.update(0, k, v)
    cache.next_position += length
    return cache, k, v


def test_per_head_compact_is_a_per_head_gather():
    cache, k, v = _filled()
    index = torch.tensor([[[0, 3, 7], [1, 2, 9]], [[4, 5, 6], [0, 8, 9]]])
    cache.compact(0, index)
    for b in range(2):
        for h in range(2):
            for j, t in enumerate(index[b, h].tolist()):  # brute force: token by token
                assert torch.equal(cache.k[0][b, h, j], k[b, h, t]) and torch.equal(cache.v[0][b, h, j], v[b, h, t])
                assert int(cache.head_cached_positions(0)[b, h, j]) == t
    assert cache.lengths[0] == 3 and cache.key_mask(0) is None  # equal counts: no padding, SDPA's fast path
    # a decode step appends the same new token to every head, at the next position
    cache.update(0, torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert cache.head_cached_positions(0)[:, :, 3].tolist() == [[10, 10], [10, 10]]
    # a second (uniform) compaction composes with the per-head one
    cache.compact(0, torch.tensor([[1, 3], [0, 3]]))
    assert cache.head_cached_positions(0).tolist() == [[[3, 10], [2, 10]], [[4, 10], [0, 10]]]


def test_unequal_counts_pad_with_invalid_slots_masked_and_not_counted():
    cache, k, v = _filled(batch=1)
    full = cache.bytes_held()
    index = torch.tensor([[[0, 4, 6], [2, 5, 5]]])  # head 1 keeps two tokens; its third slot is filler
    keep = torch.tensor([[[True, True, True], [True, True, False]]])
    cache.compact(0, index, keep)
    assert cache.key_mask(0).tolist() == keep.tolist()
    per_token = 2 * k.shape[3] * k.element_size()  # K and V of one token of one head
    assert full - cache.bytes_held() == (20 - 5) * per_token  # 5 real tokens of 20 remain in layer 0
    # attention of 2 query heads per KV head over this cache = softmax over each head's real tokens
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 2, 4, generator=g)
    kn, vn = torch.randn(1, 2, 2, 4, generator=g), torch.randn(1, 2, 2, 4, generator=g)
    kc, vc = cache.update(0, kn, vn)
    mask = cache.key_mask(0)
    out = sdpa(q, kc, vc, mask, True, 0.5)
    out2, received = attention_with_received(q, kc, vc, 0.5, mask, True, None, per_kv_head=True)
    for h in range(4):
        kv = h // 2
        toks = [i for i in range(3) if bool(mask[0, kv, i])]
        for i in range(2):
            keys = toks + [3 + j for j in range(i + 1)]
            p = ((q[0, h, i] @ kc[0, kv, keys].T) * 0.5).softmax(-1)
            torch.testing.assert_close(out[0, h, i], p @ vc[0, kv, keys])
            torch.testing.assert_close(out2[0, h, i], p @ vc[0, kv, keys])
    assert float(received[0, 1, 2]) == 0.0 and received.shape == (1, 2, 5)
    torch.testing.assert_close(received.sum(), torch.tensor(8.0))  # 4 heads x 2 queries, rows sum to 1

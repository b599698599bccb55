"""KV cache: append, positions, padding mask, compaction (gather to the front), limits, byte counts."""

from __future__ import annotations

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.kvcache import KVCache, default_positions


def kv(b, h, n, d, start=0.0):
    return torch.arange(start, start + b * h * n * d).reshape(b, h, n, d)


def test_update_appends_and_returns_views():
    c = KVCache(n_layers=2, batch=2, n_kv_heads=3, head_dim=4, max_len=10)
    k1, v1 = kv(2, 3, 4, 4), -kv(2, 3, 4, 4)
    k, v = c.update(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1) and k.data_ptr() == c.k[0].data_ptr()
    k2 = kv(2, 3, 1, 4, start=1000)
    k, v = c.update(0, k2, k2)
    assert k.shape == (2, 3, 5, 4) and torch.equal(k[:, :, 4:], k2)
    assert c.lengths == [5, 0]
    assert c.cached_positions(0).tolist() == [[0, 1, 2, 3, 0]] * 2  # next_position not advanced by update
    assert c.key_mask(0) is None  # no padding: attention runs unmasked
    assert c.bytes_held() == 2 * 2 * 3 * 5 * 4 * 4
    assert c.bytes_allocated() == 2 * 2 * 2 * 3 * 10 * 4 * 4


def test_positions_and_padding_mask_are_stored():
    c = KVCache(1, 2, 1, 2, 8)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    pos = default_positions(torch.zeros(2, 3, dtype=torch.long), c, mask)
    assert pos.tolist() == [[0, 0, 1], [0, 1, 2]]
    c.update(0, kv(2, 1, 3, 2), kv(2, 1, 3, 2), positions=pos, mask=mask)
    assert c.key_mask(0).tolist() == mask.tolist()
    c.next_position = torch.tensor([2, 3])
    assert default_positions(torch.zeros(2, 1, dtype=torch.long), c).tolist() == [[2], [3]]


def test_overflow_is_a_clear_error():
    c = KVCache(1, 1, 1, 2, 4)
    c.update(0, kv(1, 1, 3, 2), kv(1, 1, 3, 2))
    with pytest.raises(DynapruneError, match="KV cache full.*max_len=4"):
        c.update(0, kv(1, 1, 2, 2), kv(1, 1, 2, 2))
    with pytest.raises(DynapruneError):
        KVCache(1, 1, 1, 2, 0)


def test_compact_gathers_kept_tokens_to_the_front_per_row():
    c = KVCache(2, 2, 2, 3, 10)
    k, v = kv(2, 2, 6, 3), -kv(2, 2, 6, 3)
    pos = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    c.update(0, k, v, positions=pos, mask=mask)
    c.update(1, k, v, positions=pos, mask=mask)
    keep = torch.tensor([[1, 3, 5], [0, 2, 4]])
    c.compact(0, keep)
    assert c.lengths == [3, 6]  # other layers untouched
    kk, vv = c.k[0][:, :, :3], c.v[0][:, :, :3]
    for r in range(2):
        assert torch.equal(kk[r], k[r][:, keep[r]]) and torch.equal(vv[r], v[r][:, keep[r]])
    assert c.cached_positions(0).tolist() == [[11, 13, 15], [20, 22, 24]]
    assert c.key_mask(0) is None  # the padded token was dropped
    assert c.bytes_held() == 2 * 2 * 2 * 3 * 3 * 4 + 2 * 2 * 2 * 6 * 3 * 4
    # appending continues after the survivors, at the positions the sequence really reached
    c.next_position = torch.tensor([16, 26])
    knew = kv(2, 2, 1, 3, start=-5)
    kall, _ = c.update(0, knew, knew)
    assert kall.shape[2] == 4 and torch.equal(kall[:, :, 3:], knew)
    assert c.cached_positions(0)[:, -1].tolist() == [16, 26]
    with pytest.raises(DynapruneError, match="out of range"):
        c.compact(0, torch.tensor([[0, 9], [0, 1]]))
    with pytest.raises(DynapruneError, match="keep_index must be"):
        c.compact(0, torch.tensor([0, 1]))


def test_compact_keeping_padding_keeps_its_mask():
    c = KVCache(1, 1, 1, 2, 6)
    c.update(0, kv(1, 1, 4, 2), kv(1, 1, 4, 2), mask=torch.tensor([[False, True, True, True]]))
    c.compact(0, torch.tensor([[0, 2]]))
    assert c.key_mask(0).tolist() == [[False, True]]


def test_model_decode_on_compacted_cache_equals_masking_the_dropped_keys():
    """Compaction (gather) and masking the same cached tokens are the same attention."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48)
    model = Llama(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    keep = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 11]])
    with torch.inference_mode():
        a, b = model.new_cache(2, 16), model.new_cache(2, 16)
        model(ids, cache=a)
        model(ids, cache=b)
        for layer in range(cfg.layers):
            a.compact(layer, keep)
            dropped = torch.ones(2, 12, dtype=torch.bool).scatter(1, keep, False)
            b.valid[layer][:, :12] = ~dropped
            b.has_padding[layer] = True
        nxt = torch.randint(0, 64, (2, 1))
        la, lb = model(nxt, cache=a), model(nxt, cache=b)
    assert (la - lb).abs().max() <= 1e-5
    assert a.lengths == [6, 6] and a.next_position.tolist() == [13, 13]
    assert a.cached_positions(0)[:, -1].tolist() == [12, 12]  # the new token got its true position


def test_slots_are_not_positions_a_small_cache_streams_far_past_its_capacity():
    """Capacity 5: append one token at a time and compact to the 2 oldest + 2 newest after each, for 100
    positions; the positions held are those of the kept tokens (the oracle keeps them in a list)."""
    cache = KVCache(1, 1, 1, 2, 5)
    assert cache.capacity == 5
    held: list[int] = []  # oracle: original positions of the tokens held
    for p in range(100):
        k = torch.full((1, 1, 1, 2), float(p))
        cache.update(0, k, k + 0.5)
        cache.next_position += 1
        held.append(p)
        if cache.lengths[0] > 4:
            keep = [0, 1, cache.lengths[0] - 2, cache.lengths[0] - 1]
            cache.compact(0, torch.tensor([keep]))
            held = [held[i] for i in keep]
        assert cache.cached_positions(0)[0].tolist() == held
        assert cache.k[0][0, 0, : cache.lengths[0], 0].tolist() == [float(x) for x in held]
    assert held == [0, 1, 98, 99] and int(cache.next_position[0]) == 100
    assert cache.bytes_allocated() == 2 * 5 * 2 * 4 and cache.bytes_held() == 2 * 4 * 2 * 4

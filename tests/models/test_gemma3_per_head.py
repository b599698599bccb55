"""Gemma 3 on a KV cache compacted per KV head (``kv_alloc=head|global_layer``, issue 20): every head keeps
its own tokens, and a sliding layer's queries see that head's keys by ORIGINAL position. Checked against a
dense forward whose attention is brute force (each (query, head, key) decided by loops over positions and
each head's survivor set)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_gemma3 import TINY, tiny

from dynaprune.models.gemma3 import Gemma3Config
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.kvcache import KVCache
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.sliding import window_keep

PROMPT, CONTINUATION = 20, 10


class BruteForce(RunContext):
    """Dense, every query computed; a query at position >= PROMPT sees a prompt key of KV head h in layer
    l only if it survived there (``alive[l][h]``); the window by position everywhere."""

    def __init__(self, alive: dict[int, list[set[int]]]):
        super().__init__()
        self.alive = alive

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        lq, lk, hq, hkv = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
        w = TINY.window(layer)
        ok = torch.zeros(hq, lq, lk, dtype=torch.bool)
        for h in range(hq):
            kept = self.alive[layer][h // (hq // hkv)]
            for i in range(lq):
                for j in range(lk):
                    ok[h, i, j] = j <= i and (w is None or j > i - w) and (i < PROMPT or j >= PROMPT or j in kept)
        k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
        return s.softmax(-1).nan_to_num(0.0) @ v


def _compact_per_head(cache: KVCache, seed: int) -> dict[int, list[set[int]]]:
    """Each layer keeps a different random subset per KV head (unequal counts: padded, masked slots)."""
    g = torch.Generator().manual_seed(seed)
    alive = {}
    for layer in range(TINY.layers):
        positions = cache.cached_positions(layer)[0].tolist()
        n = len(positions)
        picks, kept = [], []
        for h in range(TINY.kv_heads):
            count = max(1, n - 2 - 2 * h)  # head 1 keeps fewer: a padded, masked slot
            slots = torch.randperm(n, generator=g)[:count].sort().values.tolist()
            picks.append(slots)
            kept.append({positions[s] for s in slots})
        width = max(len(p) for p in picks)
        index = torch.tensor([[p + [p[-1]] * (width - len(p)) for p in picks]])
        keep = torch.tensor([[[i < len(p) for i in range(width)] for p in picks]])
        cache.compact(layer, index, keep)
        alive[layer] = kept
    return alive


def test_continuation_on_a_per_head_cache_equals_brute_force():
    model = tiny()
    ids = torch.randint(0, TINY.vocab, (1, PROMPT + CONTINUATION), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = model.new_cache(1, PROMPT + CONTINUATION)
        model(ids[:, :PROMPT], cache=cache)
        alive = _compact_per_head(cache, seed=3)
        assert alive[0][0] != alive[0][1]  # not vacuous: the heads keep different tokens
        got = model(ids[:, PROMPT:], cache=cache)
        want = model(ids, ctx=BruteForce(alive))[:, PROMPT:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_window_keep_evicts_a_head_whose_neighbour_sees_everything():
    """One head holding only visible tokens must not hide another head's expired token."""
    cache = KVCache(1, 1, 2, 4, 16)
    cache.update(0, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    cache.next_position += 6
    cache.compact(0, torch.tensor([[[2, 3, 4, 5], [0, 3, 4, 5]]]))  # head 1 holds position 0
    index, keep = window_keep(cache, 0, window=5)  # the next query (6) sees positions 2..6
    kept = [[int(cache.head_cached_positions(0)[0, h, i]) for i, ok in zip(index[0, h], keep[0, h], strict=True)
             if ok] for h in range(2)]
    assert kept == [[2, 3, 4, 5], [3, 4, 5]]


@pytest.mark.parametrize("recipe", ["kv_tokens=5,score=h2o", "kv_tokens=3,score=h2o,sink=1",
                                    "kv_tokens=5,score=h2o,kv_alloc=head",
                                    "kv_tokens=4,score=h2o,kv_alloc=global_layer"])
def test_batched_continuation_after_eviction_equals_stepwise_decoding(recipe):
    """A second oracle: one token at a time a single query attends to every cached key, and the model
    drops after each step what left the window by position (``window_keep``, every head on its own)."""
    model = tiny()
    ids = torch.randint(1, TINY.vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    cont = torch.randint(1, TINY.vocab, (1, 10), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=make_context(recipe, model))
        assert all(cache.lengths[i] < TINY.sliding_window - 1 for i in range(TINY.layers) if TINY.is_sliding(i))
        batched = model(cont, cache=copy.deepcopy(cache))
        c = copy.deepcopy(cache)
        stepwise = torch.cat([model(cont[:, i:i + 1], cache=c) for i in range(cont.shape[1])], 1)
    torch.testing.assert_close(batched, stepwise, atol=1e-4, rtol=1e-4)


def test_a_packed_sliding_layer_defers_expired_tokens_and_hides_them_exactly():
    """A packed (quantized) sliding layer keeps its expired tokens until a key group of them expired (each
    compaction re-packs the survivors from their dequantized values); meanwhile the mask hides them. Oracle:
    the same cache unpacked (the exact dequantized values) with the expired tokens gathered out in fp."""
    from dynaprune.runtime import kvquant

    config = Gemma3Config(vocab=97, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=96,
                          rms_eps=1e-6, sliding_window=24, pattern=3, query_scalar=12.0, max_positions=256)
    model = tiny(config)
    ids = torch.randint(1, config.vocab, (1, 40), generator=torch.Generator().manual_seed(4))
    ctx = make_context("kv_bits=4,kv_group=8", model)
    cache = model.new_cache(1, 64)
    deferred = 0
    with torch.inference_mode():
        model(ids[:, :30], cache=cache, ctx=ctx)
        for i in range(30, 40):
            for layer in (0, 1):  # the sliding layers
                assert cache.lengths[layer] <= config.sliding_window - 1 + 8 - 1
            expired = cache.lengths[0] - (config.sliding_window - 1)
            if expired > 0 and cache.packed[0] is not None:
                deferred += 1
                oracle = copy.deepcopy(cache)
                for layer in (0, 1):
                    kvquant.unpack_layer(oracle, layer)
                    n = oracle.lengths[layer]
                    oracle.compact(layer, torch.arange(n - (config.sliding_window - 1), n)[None])
                want = model(ids[:, i:i + 1], cache=oracle)
                got = model(ids[:, i:i + 1], cache=copy.deepcopy(cache), ctx=make_context("kv_bits=4,kv_group=8",
                                                                                           model))
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            model(ids[:, i:i + 1], cache=cache, ctx=ctx)
    assert deferred > 0  # not vacuous: expired tokens were held and hidden

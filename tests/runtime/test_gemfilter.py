"""GemFilter: the selection against the brute-force reference of tests/prune/test_prefill_window.py,
the cache after the second pass (selected tokens only, every layer), keep=1 = dense, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/prune's helpers import kv_oracle as a top-level module (pytest puts tests/prune on the path only
# when it collects a file there): this file alone needs it too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prune"))

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.runtime.gemfilter import GemFilter, GemFilterModel, gemfilter_prefill, gemfilter_select  # noqa: E402
from tests.prune.test_prefill_window import KeepQK, expected_kept, tiny_llama  # noqa: E402


@pytest.mark.parametrize("layer,keep,window,sinks,pool", [(1, 0.5, 4, 2, 3), (2, 0.3, 3, 1, 1)])
def test_selection_and_cache(layer, keep, window, sinks, pool):
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 40), generator=torch.Generator().manual_seed(layer + 10))
    oracle = KeepQK()
    with torch.no_grad():
        model(ids, ctx=oracle)
        g = GemFilter(layer, keep, window, sinks, pool)
        want = expected_kept(*oracle.qk[layer], window, sinks, pool, keep)
        assert gemfilter_select(model, ids, g)[0].tolist() == want
        cache = model.new_cache(1, 48)
        gemfilter_prefill(model, ids, cache, g)
    for i in range(4):  # pass 2 computed the selected tokens only, in every layer
        assert cache.cached_positions(i)[0].tolist() == want
    assert cache.next_position.tolist() == [40]
    # layer 0's K depends on the token and its position only: the dense run's K at the kept positions
    torch.testing.assert_close(cache.k[0][0, :, : len(want)], oracle.qk[0][1][0][:, want])


def test_keep_all_is_dense_and_decode_continues():
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, 30), generator=torch.Generator().manual_seed(1))
    wrapped = GemFilterModel(model, GemFilter(1, 1.0, 4, 2))
    with torch.no_grad():
        dense_cache, cache = model.new_cache(1, 40), model.new_cache(1, 40)
        want = model(ids, cache=dense_cache, last_only=True)
        got = wrapped(ids, cache=cache, last_only=True)
        torch.testing.assert_close(got, want)
        nxt = torch.tensor([[3, 4]])
        torch.testing.assert_close(wrapped(nxt, cache=cache), model(nxt, cache=dense_cache))


@pytest.mark.parametrize("g,word", [(GemFilter(4, 0.5), "layer"), (GemFilter(1, 0.0), "keep"),
                                    (GemFilter(1, 0.5, window=41), "window"),
                                    (GemFilter(1, 0.5, window=38, sinks=4), "sinks")])
def test_bad_input(g, word):
    model = tiny_llama()
    with pytest.raises(DynapruneError, match=f"gemfilter {word}"):
        gemfilter_select(model, torch.randint(0, 60, (1, 40)), g)


def _sliding_kept(q, k, scale, sliding, window, sinks, keep) -> list[int]:
    """By hand (pool 1): each observation query's softmax over the keys its sliding window (or None: all
    earlier keys) lets it see, summed over queries and heads; sinks and window first, then the highest."""
    L = k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    score = [0.0] * L
    for h in range(q.shape[1]):
        for i in range(L - window, L):
            seen = range(0 if sliding is None else max(0, i - sliding + 1), i + 1)
            row = torch.tensor([float(q[0, h, i] @ k[0, h, j]) * scale for j in seen], dtype=torch.float64).softmax(0)
            for j, p in zip(seen, row.tolist(), strict=True):
                score[j] += p
    n_keep = max(int(keep * L + 0.5), 1)
    protected = set(range(sinks)) | set(range(L - window, L))
    rest = sorted((j for j in range(L) if j not in protected), key=lambda j: (-score[j], j))
    return sorted(protected | set(rest[: max(0, n_keep - len(protected))]))


@pytest.mark.parametrize("layer", [1, 2])  # tiny Gemma 3: layer 1 slides (window 8), layer 2 is global
def test_gemma_selection_beyond_the_sliding_window(layer):
    """A prompt of 40 tokens, 5x the tiny Gemma's window: pass 1 scores with the selection layer's own
    window (brute force), pass 2 runs through the sliding layers and the global layers hold the selection."""
    from kv_oracle import QKOracle

    from tests.models.test_gemma3 import TINY, tiny

    model = tiny()
    ids = torch.randint(0, TINY.vocab, (1, 40), generator=torch.Generator().manual_seed(5))
    oracle, g = QKOracle(), GemFilter(layer, 0.4, 6, 2, 1)
    with torch.no_grad():
        model(ids, ctx=oracle)
        want = _sliding_kept(*oracle.qk[layer], TINY.query_scalar**-0.5, TINY.window(layer), 6, 2, 0.4)
        assert gemfilter_select(model, ids, g)[0].tolist() == want
        cache = model.new_cache(1, 48)
        gemfilter_prefill(model, ids, cache, g)
    assert cache.cached_positions(2)[0].tolist() == want  # a global layer: every selected token
    assert cache.lengths[0] <= TINY.sliding_window - 1
    if TINY.is_sliding(layer):  # not vacuous: scoring over all earlier keys picks other tokens
        assert _sliding_kept(*oracle.qk[layer], TINY.query_scalar**-0.5, None, 6, 2, 0.4) != want

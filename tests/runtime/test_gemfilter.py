"""GemFilter: the selection against the brute-force reference of tests/prune/test_prefill_window.py,
the cache after the second pass (selected tokens only, every layer), keep=1 = dense, bad input."""

from __future__ import annotations

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.runtime.gemfilter import GemFilter, GemFilterModel, gemfilter_prefill, gemfilter_select
from tests.prune.test_prefill_window import KeepQK, expected_kept, tiny_llama


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

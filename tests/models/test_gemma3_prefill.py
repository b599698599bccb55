"""Gemma 3 after a prefill selection (issue 20): sliding layers attend by ORIGINAL position (keys with
p - window < pos <= p), never "the latest ``window`` survivors"; checked against a dense forward whose
attention is brute force (each (query, key) pair decided by loops over positions and the survivor set)."""

from __future__ import annotations

import pytest
import torch
from test_gemma3 import TINY, tiny

from dynaprune.models import gemma3 as G
from dynaprune.prune.window import window_attention
from dynaprune.runtime.attention import RunContext, SlidingWindow, attention_with_received, build_mask, count_pairs
from dynaprune.runtime.pruning import make_context


class BruteForce(RunContext):
    """Dense, every query computed; in layers after ``layer`` only the ``alive`` positions are keys."""

    def __init__(self, config, layer: int, alive: set[int]):
        super().__init__()
        self.config, self.layer, self.alive = config, layer, alive

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        lq, lk = q.shape[2], k.shape[2]
        w = self.config.window(layer)
        ok = torch.zeros(lq, lk, dtype=torch.bool)
        for i in range(lq):
            for j in range(lk):
                ok[i, j] = j <= i and (w is None or j > i - w) and (layer <= self.layer or j in self.alive)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
        return s.softmax(-1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("layer", [0, 1, 3])  # sliding selection layers (2 and 5 are global)
def test_pruned_prefill_equals_dense_with_pruned_keys_hidden(layer):
    model = tiny()
    ids = torch.randint(0, TINY.vocab, (1, 40), generator=torch.Generator().manual_seed(5))
    recipe = f"prefill_keep=0.4,prefill_layer={layer},prefill_window=4,prefill_sinks=2,prefill_pool=1"
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        got = model(ids, cache=cache, ctx=make_context(recipe, model))
        alive = cache.cached_positions(TINY.layers - 1)[0].tolist()  # a global layer after the selection
        assert len(alive) == 16 and alive[-4:] == [36, 37, 38, 39]
        assert max(b - a for a, b in zip(alive, alive[1:], strict=False)) > 1  # not vacuous: positions have holes
        want = model(ids, ctx=BruteForce(TINY, layer, set(alive)))[:, alive]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_slot_window_would_differ():
    """Not vacuous: the latest-survivors window (a plain int) gives other logits than the position one."""
    model = tiny()
    ids = torch.randint(0, TINY.vocab, (1, 40), generator=torch.Generator().manual_seed(5))
    recipe = "prefill_keep=0.4,prefill_layer=0,prefill_window=4,prefill_sinks=2,prefill_pool=1"
    with torch.no_grad():
        right = model(ids, ctx=make_context(recipe, model))
        old = G.sliding_window
        G.sliding_window = lambda window, q_pos, k_pos: window
        try:
            wrong = model(ids, ctx=make_context(recipe, model))
        finally:
            G.sliding_window = old
    assert (right - wrong).abs().max() > 1e-3


def _positions(n: int, keep: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n - 1, generator=g)[:keep - 1].sort().values.tolist() + [n - 1]


def test_position_window_masks_and_counts_match_brute_force():
    pos = torch.tensor([_positions(30, 12, 1), _positions(30, 12, 2)])
    w = SlidingWindow(6, pos, pos)
    ok = torch.tensor([[[pj <= pi and pj > pi - 6 for pj in row] for pi in row] for row in pos.tolist()])
    assert torch.equal(build_mask(12, 12, None, True, pos.device, w)[:, 0], ok)
    assert count_pairs(12, 12, None, True, 2, w) == (24, int(ok.sum()))
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    out, received = attention_with_received(q, k, v, 0.3, None, True, window=w)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~ok[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(out, p @ vv)
    torch.testing.assert_close(received, p.sum((1, 2)))


def test_window_scores_respect_the_sliding_window_by_position():
    pos = torch.tensor([_positions(30, 12, 3)])
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    got = window_attention(q, k, 3, scale=0.5, sliding=6, positions=pos)
    kk = k.repeat_interleave(2, 1)
    want = torch.zeros(1, 4, 12)
    row = pos[0].tolist()
    for i in range(9, 12):
        ok = torch.tensor([pj <= row[i] and pj > row[i] - 6 for pj in row])
        want += (torch.einsum("bhd,bhkd->bhk", q[:, :, i], kk) * 0.5).masked_fill(~ok, float("-inf")).softmax(-1)
    torch.testing.assert_close(got, want)
    # slots (no positions): the plain sliding window over the last keys
    plain = window_attention(q, k, 3, scale=0.5, sliding=6)
    want = torch.zeros(1, 4, 12)
    for i in range(9, 12):
        ok = torch.tensor([i - 6 < j <= i for j in range(12)])
        want += (torch.einsum("bhd,bhkd->bhk", q[:, :, i], kk) * 0.5).masked_fill(~ok, float("-inf")).softmax(-1)
    torch.testing.assert_close(plain, want)

"""KV-budget and head-pruning baselines against brute-force references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.prune.baselines import (
    budget_keep,
    h2o_accumulate,
    instant_importance,
    random_keep,
    static_heads_to_keep,
    streaming_keep,
)
from dynaprune.prune.tokens import accumulate_token_importance


@given(st.integers(1, 60), st.integers(1, 40), st.data())
def test_streaming_keep(seq_len: int, budget: int, data: st.DataObject) -> None:
    sink = data.draw(st.integers(0, budget))
    kept = streaming_keep(seq_len, budget, sink).tolist()
    if seq_len <= budget:
        assert kept == list(range(seq_len))
    else:
        expected = list(range(sink)) + list(range(seq_len - (budget - sink), seq_len))
        assert kept == expected and len(kept) == budget


def test_streaming_keep_bad_arguments() -> None:
    with pytest.raises(ValueError):
        streaming_keep(10, 4, 5)
    with pytest.raises(ValueError):
        streaming_keep(10, 4, 2, recent=3)
    assert streaming_keep(10, 4, 1, recent=3).tolist() == [0, 7, 8, 9]


def test_h2o_accumulates_per_head_without_cascade() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 3, 4, 6, generator=gen).softmax(-1)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = h2o_accumulate(None, probs, key_mask)
    for b in range(2):
        for h in range(3):
            for t in range(6):
                expected = sum(float(probs[b, h, i, t]) for i in range(4)) if key_mask[b, t] else 0.0
                assert float(got[b, h, t]) == pytest.approx(expected, abs=1e-6)
    # decode step: one new key, zero history; summed over heads it is SpAtten's one-layer score
    step = torch.randn(2, 3, 1, 7, generator=gen).softmax(-1)
    after = h2o_accumulate(got, step)
    assert torch.allclose(after[..., :6], got + step[:, :, 0, :6]) and torch.allclose(after[..., 6], step[:, :, 0, 6])
    assert torch.allclose(h2o_accumulate(None, probs).sum(1), accumulate_token_importance(None, probs))


def test_instant_is_this_layers_attention_received_by_brute_force() -> None:
    """Oracle: loops over batch, heads and queries; padded keys score 0, padded queries give nothing.
    Two layers in a row give each layer's own sums (no history carried over)."""
    gen = torch.Generator().manual_seed(1)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    query_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for _layer in range(2):
        probs = torch.rand(2, 3, 4, 5, generator=gen).softmax(-1)
        got = instant_importance(probs, key_mask, query_mask=query_mask)
        assert got.shape == (2, 5)
        for b in range(2):
            for t in range(5):
                expected = sum(float(probs[b, h, i, t]) for h in range(3) for i in range(4) if query_mask[b, i])
                assert float(got[b, t]) == pytest.approx(expected if key_mask[b, t] else 0.0, abs=1e-6)
    assert float(instant_importance(probs).sum()) == pytest.approx(2 * 3 * 4, abs=1e-4)  # each row sums to 1


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_budget_keep_matches_brute_force(data: st.DataObject) -> None:
    length = data.draw(st.integers(2, 16))
    n_valid = data.draw(st.integers(1, length))
    budget = data.draw(st.integers(1, length))
    sink = data.draw(st.integers(0, budget))
    recent = data.draw(st.integers(0, budget - sink))
    scores = data.draw(st.lists(st.integers(0, 5), min_size=length, max_size=length))
    valid = torch.tensor([i < n_valid for i in range(length)])
    keep = budget_keep(torch.tensor([scores], dtype=torch.float32), budget, sink, recent, valid[None])
    kept = keep.index[0, keep.mask[0]].tolist()
    real = list(range(n_valid))
    protected = set(real[:sink]) | set(real[n_valid - recent :] if recent else [])
    count = max(min(budget, n_valid), len(protected))
    rest = sorted((i for i in real if i not in protected), key=lambda i: (-scores[i], i))
    assert kept == sorted(protected | set(rest[: count - len(protected)]))


def test_budget_keep_per_head_for_h2o() -> None:
    scores = torch.tensor([[[5.0, 0, 0, 1, 0, 0], [0, 5.0, 0, 0, 0, 0]]])
    keep = budget_keep(scores, budget=3, sink=0, recent=1)
    assert keep.index.tolist() == [[[0, 3, 5], [0, 1, 5]]]
    with pytest.raises(ValueError):
        budget_keep(scores, budget=2, sink=2, recent=1)


def test_random_keep() -> None:
    protected = torch.zeros(50, dtype=torch.bool)
    protected[[0, 49]] = True
    draws = [random_keep(50, 10, torch.Generator().manual_seed(s), protected).tolist() for s in range(20)]
    for kept in draws:
        assert len(kept) == 10 and kept == sorted(set(kept)) and {0, 49} <= set(kept)
    assert len({tuple(k) for k in draws}) > 15  # really random
    again = random_keep(50, 10, torch.Generator().manual_seed(3), protected).tolist()
    assert again == draws[3]  # and reproducible
    counts = torch.zeros(50)
    for s in range(400):
        counts[random_keep(50, 10, torch.Generator().manual_seed(s), protected)] += 1
    inner = counts[1:49] / 400
    assert float(inner.min()) > 0.05 and float(inner.max()) < 0.3  # about 8/48 each


def test_static_heads_to_keep() -> None:
    calibration = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.4, 0.4, 0.1]])
    assert static_heads_to_keep(calibration, 0.5).tolist() == [[1, 3], [0, 1]]
    assert static_heads_to_keep(calibration, 1.0).tolist() == [[0, 1, 2, 3]] * 2

"""Cascade head pruning against Python-loop references (Algorithm 2), query heads and KV groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.prune.heads import (
    accumulate_head_importance,
    gather_heads,
    kv_groups_needed,
    select_heads_to_keep,
)


def test_accumulate_matches_algorithm_2_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, heads, length, dim = 2, 3, 4, 5
    outputs = torch.randn(batch, heads, length, dim, generator=gen)
    previous = torch.rand(batch, heads, generator=gen)
    token_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = accumulate_head_importance(previous, outputs, token_mask)
    for b in range(batch):
        for head_id in range(heads):
            expected = float(previous[b, head_id])
            for l0 in range(length):
                for d in range(dim):
                    if token_mask[b, l0]:
                        expected += abs(float(outputs[b, head_id, l0, d]))
            assert float(got[b, head_id]) == pytest.approx(expected, rel=1e-6)
    shared = accumulate_head_importance(torch.zeros(heads), outputs, token_mask)
    assert shared.shape == (heads,) and torch.allclose(shared, (got - previous).sum(0))
    assert torch.allclose(accumulate_head_importance(None, outputs, token_mask), got - previous)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_select_matches_brute_force(data: st.DataObject) -> None:
    group_size = data.draw(st.sampled_from([1, 2, 3]))
    n_units = data.draw(st.integers(1, 6))
    batch = data.draw(st.integers(1, 3))
    n_heads = n_units * group_size
    values = data.draw(
        st.lists(st.lists(st.integers(0, 3), min_size=n_heads, max_size=n_heads), min_size=batch, max_size=batch)
    )
    n_keep = data.draw(st.integers(1, n_units))
    got = select_heads_to_keep(torch.tensor(values, dtype=torch.float32), n_keep, group_size)
    assert got.shape == (batch, n_keep * group_size)
    for b, row in enumerate(values):
        unit_scores = [sum(row[u * group_size : (u + 1) * group_size]) for u in range(n_units)]
        units = sorted(sorted(range(n_units), key=lambda u, s=unit_scores: (-s[u], u))[:n_keep])
        expected = [u * group_size + j for u in units for j in range(group_size)]
        assert got[b].tolist() == expected


def test_select_all_is_identity_and_1d() -> None:
    assert select_heads_to_keep(torch.rand(2, 6), 6).tolist() == [list(range(6))] * 2
    assert select_heads_to_keep(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert select_heads_to_keep(torch.tensor([0.1, 0.9, 0.5, 0.7, 0.0, 0.0]), 1, group_size=3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        select_heads_to_keep(torch.rand(6), 0)
    with pytest.raises(ValueError):
        select_heads_to_keep(torch.rand(6), 3, group_size=4)
    with pytest.raises(ValueError):
        select_heads_to_keep(torch.rand(6), 4, group_size=2)


def test_cascade_gather_keeps_pruned_heads_out() -> None:
    gen = torch.Generator().manual_seed(1)
    outputs = torch.randn(2, 6, 3, 4, generator=gen)
    importance = accumulate_head_importance(None, outputs)
    kept = select_heads_to_keep(importance, 4)
    outputs_kept = gather_heads(outputs, kept)
    for b in range(2):
        for j, h in enumerate(kept[b].tolist()):
            assert torch.equal(outputs_kept[b, j], outputs[b, h])
    # next layer: the compacted score only knows the survivors, so a pruned head cannot return
    importance = accumulate_head_importance(gather_heads(importance, kept), outputs_kept)
    again = kept.gather(1, select_heads_to_keep(importance, 2))
    assert all(set(again[b].tolist()) <= set(kept[b].tolist()) for b in range(2))
    shared = torch.tensor([0, 2, 5])
    assert torch.equal(gather_heads(outputs, shared), outputs[:, [0, 2, 5]])


def test_kv_groups_needed() -> None:
    query_heads = torch.tensor([[0, 1, 7], [3, 4, 5]])
    assert kv_groups_needed(query_heads, n_kv_heads=3, group_size=3).tolist() == [
        [True, False, True],
        [False, True, False],
    ]

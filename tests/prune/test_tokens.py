"""Cascade token pruning against Python-loop references (Algorithm 2) and exact invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.prune.tokens import (
    accumulate_token_importance,
    edge_token_mask,
    gather_tokens,
    select_tokens_to_keep,
)


def _probs(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).softmax(-1)


# ---------------------------------------------------------------------------- accumulation


def test_accumulate_matches_algorithm_2_loops() -> None:
    batch, heads, n_q, n_k = 2, 3, 4, 5
    probs = _probs(batch, heads, n_q, n_k)
    previous = torch.rand(batch, n_k, generator=torch.Generator().manual_seed(1))
    got = accumulate_token_importance(previous, probs)
    p = probs.double().numpy()
    for b in range(batch):
        expected = previous[b].double().numpy().copy()
        for token_id in range(n_k):
            for l0 in range(n_q):
                for head_id in range(heads):
                    expected[token_id] += p[b, head_id, l0, token_id]
        np.testing.assert_allclose(got[b].double().numpy(), expected, rtol=1e-6)


def test_accumulate_masks_and_decode_zero_extension() -> None:
    probs = _probs(2, 2, 3, 6, seed=2)
    key_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    query_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    got = accumulate_token_importance(None, probs, key_mask, query_mask=query_mask)
    for b in range(2):
        for t in range(6):
            expected = sum(
                float(probs[b, h, q, t]) for h in range(2) for q in range(3) if query_mask[b, q] and key_mask[b, t]
            )
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-6)
    # generation: the cumulative score covers the 4 older keys, two new keys start at zero
    previous = torch.ones(2, 4)
    got = accumulate_token_importance(previous, probs)
    assert torch.allclose(got[:, :4], 1 + probs.sum((1, 2))[:, :4])
    assert torch.allclose(got[:, 4:], probs.sum((1, 2))[:, 4:])
    with pytest.raises(ValueError):
        accumulate_token_importance(torch.ones(2, 7), probs)


def test_accumulate_low_precision_sums_in_float32() -> None:
    probs = _probs(1, 2, 3, 4).to(torch.bfloat16)
    assert accumulate_token_importance(None, probs).dtype == torch.float32


# ---------------------------------------------------------------------------- selection


def _reference_select(scores, n_keep, protected, valid):
    """Brute force: sort every position by (protected, valid, score, -position), take the top n."""
    rows = []
    for row_scores, k, prot, val in zip(scores, n_keep, protected, valid, strict=True):
        n_valid, n_prot = sum(val), sum(p and v for p, v in zip(prot, val, strict=True))
        count = max(min(k, n_valid), n_prot)
        order = sorted(
            range(len(row_scores)),
            key=lambda i, rs=row_scores, pr=prot, va=val: (-(2 * (pr[i] and va[i]) + va[i]), -rs[i], i),
        )
        rows.append(sorted(order[:count]))
    return rows


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_select_matches_brute_force(data: st.DataObject) -> None:
    batch = data.draw(st.integers(1, 4))
    length = data.draw(st.integers(1, 12))
    # small integer scores force many ties
    scores = data.draw(
        st.lists(st.lists(st.integers(0, 4), min_size=length, max_size=length), min_size=batch, max_size=batch)
    )
    valid = data.draw(
        st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch)
    )
    protected = data.draw(
        st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch)
    )
    n_keep = data.draw(st.lists(st.integers(0, length + 2), min_size=batch, max_size=batch))
    keep = select_tokens_to_keep(
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(n_keep),
        torch.tensor(protected),
        torch.tensor(valid),
    )
    expected = _reference_select(scores, n_keep, protected, valid)
    width = max(len(r) for r in expected)
    assert keep.index.shape == (batch, width) and keep.mask.shape == (batch, width)
    for b, kept in enumerate(expected):
        assert keep.mask[b].tolist() == [True] * len(kept) + [False] * (width - len(kept))
        assert keep.index[b, : len(kept)].tolist() == kept
        filler = keep.index[b, len(kept) :].tolist()
        assert filler == sorted(filler) and not set(filler) & set(kept)  # in range, never a kept token


def test_padding_never_selected_over_real_tokens() -> None:
    scores = torch.tensor([[0.1, 0.2, 9.0, 9.0], [5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    keep = select_tokens_to_keep(scores, 3, valid=valid)
    assert keep.index[0, :2].tolist() == [0, 1] and keep.mask[0].tolist() == [True, True, False]
    assert keep.index[1].tolist() == [0, 1, 2] and keep.mask[1].all()


def test_per_row_counts_and_protection() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    protected = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    keep = select_tokens_to_keep(scores, torch.tensor([2, 3]), protected)
    assert keep.index.tolist() == [[0, 4, 1], [0, 1, 4]]
    assert keep.mask.tolist() == [[True, True, False], [True, True, True]]


def test_full_keep_is_identity_bit_for_bit() -> None:
    hidden = torch.randn(2, 7, 5)
    keep = select_tokens_to_keep(torch.rand(2, 7), 7)
    assert keep.index.tolist() == [list(range(7))] * 2 and keep.mask.all()
    assert torch.equal(gather_tokens(hidden, keep.index), hidden)


def test_attention_over_kept_tokens_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    batch, heads, length, dim = 2, 2, 9, 4
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = torch.randn(batch, heads, length, dim, generator=gen)
    v = torch.randn(batch, heads, length, dim, generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 7:] = False  # row 1 is padded
    importance = accumulate_token_importance(None, torch.rand(batch, heads, length, length, generator=gen), valid)
    keep = select_tokens_to_keep(importance, torch.tensor([5, 4]), edge_token_mask(valid, first=1), valid)
    q_kept, k_kept, v_kept = (gather_tokens(t, keep.index, dim=2) for t in (q, k, v))
    scores = (q_kept @ k_kept.transpose(-1, -2)) / dim**0.5
    scores = scores.masked_fill(~keep.mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v_kept
    for b in range(batch):
        kept = keep.index[b, keep.mask[b]].tolist()
        assert kept[0] == 0 and all(valid[b, i] for i in kept)
        for h in range(heads):
            for row, i in enumerate(kept):  # dense attention restricted to the kept tokens, by hand
                logits = [float(q[b, h, i] @ k[b, h, j]) / dim**0.5 for j in kept]
                weights = np.exp(np.array(logits) - max(logits))
                weights /= weights.sum()
                expected = sum(w * v[b, h, j].double().numpy() for w, j in zip(weights, kept, strict=True))
                np.testing.assert_allclose(out[b, h, row].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_gather_tokens_shapes_and_per_head_index() -> None:
    kv = torch.randn(2, 3, 6, 4)
    per_head = torch.tensor([[[0, 2], [1, 5], [3, 4]], [[5, 0], [2, 2], [1, 3]]])
    got = gather_tokens(kv, per_head, dim=2)
    for b in range(2):
        for h in range(3):
            for j in range(2):
                assert torch.equal(got[b, h, j], kv[b, h, per_head[b, h, j]])
    index = torch.tensor([[4, 1], [0, 3]])
    assert torch.equal(gather_tokens(kv, index, dim=-2)[1, 2], kv[1, 2, [0, 3]])
    positions = torch.arange(6).expand(2, 6)
    assert gather_tokens(positions, index).tolist() == [[4, 1], [0, 3]]
    with pytest.raises(ValueError):
        gather_tokens(kv, per_head, dim=1)


def test_edge_token_mask_right_and_left_padding() -> None:
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mask = edge_token_mask(valid, first=1, last=2)
    for b in range(3):
        real = [i for i in range(7) if valid[b, i]]
        expected = set(real[:1]) | set(real[-2:])
        assert {i for i in range(7) if mask[b, i]} == expected
    assert not edge_token_mask(valid).any()

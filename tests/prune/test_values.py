"""Local value pruning against a Python-loop reference (Sec. III-C, no renormalization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.prune.recipe import keep_count
from dynaprune.prune.values import local_value_attention, local_value_mask


def _reference(probs: torch.Tensor, v: torch.Tensor, fraction: float, visible: torch.Tensor):
    """Per head and query: keep the keep_count(f, n_visible) most probable visible keys (ties: earlier),
    output = sum over kept of p * v, unnormalized."""
    batch, heads, n_q, n_k = probs.shape
    group = heads // v.shape[1]
    mask = np.zeros(probs.shape, dtype=bool)
    out = np.zeros((batch, heads, n_q, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                candidates = [j for j in range(n_k) if visible[b, h, i, j]]
                k = keep_count(fraction, len(candidates))
                ranked = sorted(candidates, key=lambda j, b=b, h=h, i=i: (-float(probs[b, h, i, j]), j))
                for j in ranked[:k]:
                    mask[b, h, i, j] = True
                    out[b, h, i] += float(probs[b, h, i, j]) * v[b, h // group, j].double().numpy()
    return mask, out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([(1, 1), (2, 2), (4, 2)]),
    st.integers(1, 5),
    st.integers(1, 9),
    st.sampled_from([0.05, 0.3, 0.5, 0.77, 1.0]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_matches_brute_force(batch, heads_kv, n_q, n_k, fraction, causal, seed) -> None:
    heads, kv_heads = heads_kv
    gen = torch.Generator().manual_seed(seed)
    # rounded logits make exact probability ties common
    logits = torch.randint(0, 3, (batch, heads, n_q, n_k), generator=gen).float()
    visible = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool)
    key_mask = None
    if causal:
        key_mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        visible = key_mask.expand(visible.shape)
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)  # causal with n_q > n_k leaves rows without keys
    v = torch.randn(batch, kv_heads, n_k, 3, generator=gen)
    expected_mask, expected_out = _reference(probs, v, fraction, visible)
    assert local_value_mask(probs, fraction, key_mask).numpy().tolist() == expected_mask.tolist()
    result = local_value_attention(probs, v, fraction, key_mask)
    np.testing.assert_allclose(result.output.double().numpy(), expected_out, rtol=1e-5, atol=1e-6)
    assert result.v_rows_used == int(expected_mask.sum())
    assert result.v_rows_fetched == int(expected_mask.any(axis=2).sum())
    assert result.v_rows_dense == int(visible.sum())


def test_keep_all_is_exact_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 4, 5, 7, generator=gen).softmax(-1)
    v = torch.randn(2, 4, 7, 8, generator=gen)
    result = local_value_attention(probs, v, 1.0)
    assert torch.equal(result.output, probs @ v)
    assert result.v_rows_used == result.v_rows_dense == probs.numel()


def test_not_renormalized() -> None:
    probs = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    v = torch.ones(1, 1, 3, 1)
    result = local_value_attention(probs, v, 2 / 3)
    assert float(result.output) == pytest.approx(0.8)  # 0.5 + 0.3, not rescaled to 1
    assert result.v_rows_used == 2 and result.v_rows_fetched == 2 and result.v_rows_dense == 3


def test_bad_fraction() -> None:
    with pytest.raises(ValueError):
        local_value_mask(torch.rand(1, 1, 1, 3), 0.0)


def test_fetched_rows_are_the_union_over_real_queries_by_hand():
    """One head, 3 keys. keep 1 of 3: query 0 keeps key 0, query 1 keeps key 2. Both queries real: 2
    products, 2 distinct rows fetched of 3 (dense: 6 products, 3 rows). Query 1 padding: 1 and 1."""
    probs = torch.tensor([[[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]])
    v = torch.randn(1, 1, 3, 4)
    both = local_value_attention(probs, v, 1 / 3)
    assert (both.v_rows_used, both.v_rows_fetched, both.v_rows_dense, both.v_rows_fetched_dense) == (2, 2, 6, 3)
    assert both.fetched.tolist() == [[[True, False, True]]]
    one = local_value_attention(probs, v, 1 / 3, query_mask=torch.tensor([[True, False]]))
    assert (one.v_rows_used, one.v_rows_fetched, one.v_rows_dense, one.v_rows_fetched_dense) == (1, 1, 3, 3)
    assert torch.equal(one.output, both.output)  # the mask only changes what is counted

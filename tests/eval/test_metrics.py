"""Metrics against scipy / hand-computed values, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dynaprune.errors import DynapruneError
from dynaprune.eval.metrics import accuracy, cosine_similarity, pearson, spearman


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert pearson(torch.tensor(x), list(y)) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(stats.spearmanr([1, 2, 2, 3], [1, 2, 3, 4])[0])
    assert spearman([1, 2, 3], [1, 4, 100]) == pytest.approx(1.0)  # rank-based, x1 scale


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1, 2], [1, 2, 3], "2 predictions vs 3"),
        ([1], [1], "at least 2"),
        ([1, 1, 1], [1, 2, 3], "constant"),
        ([1, float("nan")], [1, 2], "NaN"),
    ],
)
def test_correlation_refusals(x, y, match):
    with pytest.raises(DynapruneError, match=match):
        spearman(x, y)
    with pytest.raises(DynapruneError, match=match):
        pearson(x, y)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    with pytest.raises(DynapruneError, match="2 predictions vs 1"):
        accuracy([1, 0], [1])
    with pytest.raises(DynapruneError, match="no examples"):
        accuracy([], [])


def test_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0], [-3.0, -4.0]])
    assert torch.allclose(cosine_similarity(a, b), torch.tensor([0.0, 1.0, 0.0, -1.0]))
    x, y = torch.randn(7, 5), torch.randn(7, 5)
    assert torch.allclose(cosine_similarity(x, y), torch.nn.functional.cosine_similarity(x, y), atol=1e-6)
    with pytest.raises(DynapruneError, match="differ"):
        cosine_similarity(torch.zeros(2, 3), torch.zeros(3, 3))

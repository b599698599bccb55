"""Metrics against scipy / hand-computed values, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dynaprune.errors import DynapruneError
from dynaprune.eval.metrics import (
    accuracy,
    combine_seed_results,
    cosine_similarity,
    pearson,
    seed_spread,
    spearman,
)


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


def test_seed_spread_against_the_statistics_module():
    import statistics

    values = [0.61, 0.58, 0.66]
    got = seed_spread(values)
    assert got["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
    assert got["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # sample std, n - 1
    assert got["values"] == values and seed_spread([2.0])["std"] == 0.0
    with pytest.raises(DynapruneError, match="no values"):
        seed_spread([])


def test_combine_seed_results_means_every_number_and_keeps_each_seed():
    from dynaprune.eval.result import TaskResult

    runs = [TaskResult("m", "lm", "d", 2, {"name": "perplexity", "value": v, "nll": n, "tokens": 10},
                       cost={"flops_kept": f}, seconds=1.5, extra={"window": 4})
            for v, n, f in ((10.0, 2.0, 0.5), (14.0, 3.0, 0.52), (12.0, 2.5, 0.48))]
    out = combine_seed_results(runs, (0, 1, 2))
    assert out.metric["value"] == 12.0 and out.metric["nll"] == 2.5 and out.metric["tokens"] == 10
    assert out.metric["std"] == pytest.approx(2.0) and out.metric["per_seed"] == [10.0, 14.0, 12.0]
    assert out.metric["seeds"] == [0, 1, 2] and out.metric["name"] == "perplexity"
    assert out.cost == {"flops_kept": 0.5} and out.extra["flops_kept_per_seed"] == [0.5, 0.52, 0.48]
    assert out.seconds == 4.5 and out.extra["window"] == 4 and len(out.extra["per_seed_metric"]) == 3
    with pytest.raises(DynapruneError):
        combine_seed_results(runs, (0, 1))

"""Task metrics: rank/linear correlation (scipy), accuracy, cosine similarity; a metric over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from scipy import stats

from dynaprune.errors import DynapruneError


def _pair(x: Sequence[float] | np.ndarray | torch.Tensor, y: Sequence[float] | np.ndarray | torch.Tensor,
          what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).ravel()
    b = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DynapruneError(f"{what}: {a.size} predictions vs {b.size} gold values")
    if a.size < 2:
        raise DynapruneError(f"{what}: needs at least 2 examples, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DynapruneError(f"{what}: inputs contain NaN or infinity")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        # scipy would return NaN with a warning; a correlation of a constant is undefined, say so.
        raise DynapruneError(f"{what}: undefined, one side is constant")
    return a, b


def spearman(pred: Sequence[float] | np.ndarray | torch.Tensor,
             gold: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation (ties get average ranks), on the x1 scale (e.g. 0.867)."""
    a, b = _pair(pred, gold, "spearman")
    return float(stats.spearmanr(a, b).statistic)


def pearson(pred: Sequence[float] | np.ndarray | torch.Tensor,
            gold: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    a, b = _pair(pred, gold, "pearson")
    return float(stats.pearsonr(a, b).statistic)


def accuracy(pred: Sequence, gold: Sequence) -> float:
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold):
        raise DynapruneError(f"accuracy: {len(pred)} predictions vs {len(gold)} gold labels")
    if not gold:
        raise DynapruneError("accuracy: no examples")
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise cosine similarity of (N, d) and (N, d) -> (N,), in fp32 or better."""
    if a.shape != b.shape or a.dim() != 2:
        raise DynapruneError(f"cosine_similarity: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.float(), b.float()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


def seed_spread(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean and sample standard deviation (n - 1) of one metric over seeds, with the values."""
    if not values:
        raise DynapruneError("seed_spread: no values")
    data = np.asarray(values, dtype=np.float64)
    std = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return {"mean": float(data.mean()), "std": std, "values": [float(v) for v in data]}


def combine_seed_results(results: Sequence[Any], seeds: Sequence[int]) -> Any:
    """One TaskResult from the same run under each of ``seeds`` (a random baseline): every number of
    the metric is its mean over the seeds, ``std`` / ``per_seed`` / ``seeds`` say how much they spread;
    the cost is the first seed's (the work differs little between draws; each seed's FLOPs kept is in
    extra); seconds add up."""
    if len(results) != len(seeds) or not results:
        raise DynapruneError(f"combine_seed_results: {len(results)} results for {len(seeds)} seeds")
    base = results[0]
    metric = dict(base.metric)
    for name, value in base.metric.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metric[name] = float(np.mean([r.metric[name] for r in results]))
    spread = seed_spread([r.metric["value"] for r in results])
    metric.update(value=spread["mean"], std=spread["std"], per_seed=spread["values"], seeds=list(seeds),
                  over_seeds="each number is the mean over the seeds; per_seed: the value of each")
    extra = {**base.extra, "per_seed_metric": [r.metric for r in results], "cost_of_seed": seeds[0],
             "flops_kept_per_seed": [(r.cost or {}).get("flops_kept") for r in results]}
    return replace(base, metric=metric, extra=extra, seconds=sum(r.seconds for r in results))

"""The top-k engine's knobs (``TopkEngineConfig``: comparators per array, pipeline latencies), the
seeding of its random pivot, and the argument checks every path (reference, cycle draw, fast path)
shares. The cycle model the knobs feed is described in the package docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class TopkEngineConfig:
    """Top-k engine knobs: comparators per array (SpAtten uses 16) and fixed pipeline latencies."""

    parallelism: int = 16
    round_latency: int = 3
    filter_latency: int = 3

    def __post_init__(self) -> None:
        if int(self.parallelism) != self.parallelism or self.parallelism < 1:
            raise DynapruneError(f"top-k parallelism must be an integer >= 1, got {self.parallelism}")
        if self.round_latency < 0 or self.filter_latency < 0:
            raise DynapruneError("top-k pipeline latencies must be >= 0")

    def round_cycles(self, length: int) -> int:
        """One STATE_RUN round over a FIFO of ``length`` elements."""
        return -(-length // self.parallelism) + self.round_latency

    def filter_cycles(self, n: int) -> int:
        """The order-preserving filter pass over the ``n`` buffered inputs."""
        return -(-n // self.parallelism) + self.filter_latency


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed; any object with ``integers`` / ``random`` passes through (tests)."""
    return seed if hasattr(seed, "integers") else np.random.default_rng(seed)


def _check_values(values: Sequence[float], k: int) -> list[float]:
    vals = [float(v) for v in values]
    if any(math.isnan(v) for v in vals):
        raise DynapruneError("top-k input contains NaN; scores must be comparable numbers")
    if int(k) != k or not 0 <= k <= len(vals):
        raise DynapruneError(f"top-k needs 0 <= k <= n, got k={k} for n={len(vals)}")
    return vals


def _check_k_dtype(k: torch.Tensor) -> None:
    if k.dtype.is_floating_point or k.dtype == torch.bool:
        raise DynapruneError("per-row k must be an integer tensor")


def _check_k_range(lo: int, hi: int, n: int) -> None:
    """Per-row k: every row's k in 0..n."""
    if lo < 0 or hi > n:
        raise DynapruneError(f"top-k needs 0 <= k <= n={n} in every row")


def _check_scalar_k(k: int, n: int) -> int:
    if int(k) != k or not 0 <= k <= n:
        raise DynapruneError(f"top-k needs 0 <= k <= n, got k={k} for n={n}")
    return int(k)


def _nan_error() -> DynapruneError:
    return DynapruneError("top-k input contains NaN; scores must be comparable numbers")


"""Algorithm 3, bit-faithful: quick-select over FIFO_L / FIFO_R with a seedable random pivot, the
order-preserving filter (the earliest ties kept) and zero elimination, with the cycle counts of each
pass (see the package docstring for the reading of Algorithm 3 and the cycle model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynaprune.prune.topk.config import TopkEngineConfig, _check_values, _rng
from dynaprune.prune.topk.eliminator import zero_eliminate


@dataclass(frozen=True)
class QuickSelectResult:
    """Algorithm 3's output: the k-th largest value and how many elements equal to it are kept."""

    kth_largest: float | None  # None when k == 0
    num_equal: int
    round_lengths: tuple[int, ...]  # elements streamed by each STATE_RUN round
    cycles: int


@dataclass(frozen=True)
class TopkResult:
    """The engine's full output: selected positions (input order) and the cycle count."""

    indices: tuple[int, ...]
    kth_largest: float | None
    num_equal: int
    quickselect_cycles: int
    filter_cycles: int

    @property
    def cycles(self) -> int:
        return self.quickselect_cycles + self.filter_cycles

def quick_select(
    values: Sequence[float],
    k: int,
    config: TopkEngineConfig = TopkEngineConfig(),
    seed: int | np.random.Generator | None = 0,
) -> QuickSelectResult:
    """Algorithm 3 (START / STATE_RUN over FIFO_L and FIFO_R), literally, with a seedable random pivot."""
    vals = _check_values(values, k)
    if k == 0:
        return QuickSelectResult(None, 0, (), 0)
    rng = _rng(seed)
    fifo = [list(vals), []]  # [FIFO_L, FIFO_R]
    target = k - 1  # 0-based rank from the top (see the module docstring)
    num_eq_pivot = 0
    pivot = 0.0
    lengths: list[int] = []
    while True:
        # START
        size_r = len(fifo[1])
        if size_r + num_eq_pivot <= target:  # pivot too large: everything in FIFO_R (and = pivot) is in
            target -= size_r + num_eq_pivot
            fifo[1] = []
            select = 0
        elif size_r > target:  # pivot too small: the answer is in FIFO_R
            fifo[0] = []
            select = 1
        else:
            num_equal = target - size_r + 1
            cycles = sum(config.round_cycles(n) for n in lengths)
            return QuickSelectResult(pivot, num_equal, tuple(lengths), cycles)
        source = fifo[select]
        pivot = source[int(rng.integers(len(source)))]
        # STATE_RUN: pop every item of FIFO[select]; smaller -> FIFO_L, larger -> FIFO_R
        fifo[select] = []
        num_eq_pivot = 0
        lengths.append(len(source))
        for item in source:
            if item < pivot:
                fifo[0].append(item)
            elif item > pivot:
                fifo[1].append(item)
            else:
                num_eq_pivot += 1


def order_preserving_filter(values: Sequence[float], threshold: float, num_equal: int) -> list[int]:
    """Positions kept by the filter: ``x > threshold``, plus the first ``num_equal`` with ``x == threshold``."""
    kept, eq_left = [], num_equal
    for i, v in enumerate(values):
        if v > threshold:
            kept.append(i)
        elif v == threshold and eq_left > 0:
            kept.append(i)
            eq_left -= 1
    return kept


def topk_reference(
    values: Sequence[float],
    k: int,
    config: TopkEngineConfig = TopkEngineConfig(),
    seed: int | np.random.Generator | None = 0,
) -> TopkResult:
    """The whole engine: quick-select, then the filter pass and zero elimination (input order kept)."""
    vals = _check_values(values, k)
    qs = quick_select(vals, k, config, seed)
    if k == 0:
        return TopkResult((), None, 0, 0, 0)
    kept = order_preserving_filter(vals, qs.kth_largest, qs.num_equal)
    keep = [False] * len(vals)
    for i in kept:
        keep[i] = True
    compacted, _ = zero_eliminate(list(range(len(vals))), keep)
    indices = tuple(int(i) for i in compacted)
    assert len(indices) == k
    return TopkResult(indices, qs.kth_largest, qs.num_equal, qs.cycles, config.filter_cycles(len(vals)))

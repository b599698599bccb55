"""The engine's cycles drawn vectorised over many (n, k) requests: quick-select in rank space (a uniformly
random pivot rank per round), the filter pass, and Knuth's closed form to check them against. The
hardware models (``hw/spatten.py``) use these."""

from __future__ import annotations

import numpy as np

from dynaprune.errors import DynapruneError
from dynaprune.prune.topk.config import TopkEngineConfig, _rng


def sample_quickselect_cycles(
    n: np.ndarray | int,
    k: np.ndarray | int,
    config: TopkEngineConfig = TopkEngineConfig(),
    seed: int | np.random.Generator | None = 0,
    *,
    bypass_full: bool = True,
) -> np.ndarray:
    """Quick-select cycles (the STATE_RUN rounds) for many (n, k) pairs at once, drawn in rank space.

    Over distinct values, Algorithm 3's pivot is a uniformly random element of the FIFO it reads, so
    its rank is uniform; we draw that rank directly: O(rounds) per pair instead of O(n). k = 0 costs 0;
    with ``bypass_full`` a request with k >= n also costs 0 (the controller skips the engine when
    nothing would be pruned, as SpAtten's does).
    """
    rng = _rng(seed)
    shape = np.shape(n)
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.int64)).ravel()
    k_arr = np.broadcast_to(np.asarray(k, dtype=np.int64), shape).ravel().copy()
    if np.any(n_arr < 0) or np.any(k_arr < 0):
        raise DynapruneError("top-k sizes must be >= 0")
    k_arr = np.minimum(k_arr, n_arr)
    size = n_arr.copy()  # the FIFO streamed by the next round
    target = k_arr - 1  # 0-based rank from the top within the current FIFO
    cycles = np.zeros(n_arr.shape, dtype=np.int64)
    p, lat = config.parallelism, config.round_latency
    idx = np.nonzero(_runs(n_arr, k_arr, bypass_full))[0]
    while idx.size:
        m, t = size[idx], target[idx]
        cycles[idx] += -(-m // p) + lat
        above = np.floor(rng.random(m.shape) * m).astype(np.int64)  # elements larger than the pivot
        go_left = above + 1 <= t  # pivot too large: FIFO_R and the pivot's copies are all kept
        go_right = above > t  # pivot too small: the answer is in FIFO_R
        target[idx] = np.where(go_left, t - above - 1, t)
        size[idx] = np.where(go_left, m - above - 1, np.where(go_right, above, m))
        idx = idx[go_left | go_right]
    return cycles.reshape(shape)


def _runs(n: np.ndarray, k: np.ndarray, bypass_full: bool) -> np.ndarray:
    return (k > 0) & ((k < n) | (not bypass_full))


def filter_pass_cycles(
    n: np.ndarray | int, k: np.ndarray | int, config: TopkEngineConfig = TopkEngineConfig(), *,
    bypass_full: bool = True,
) -> np.ndarray:
    """Cycles of the order-preserving filter pass (0 where the engine does not run), vectorised."""
    n_arr = np.asarray(n, dtype=np.int64)
    k_arr = np.minimum(np.broadcast_to(np.asarray(k, dtype=np.int64), n_arr.shape), n_arr)
    return np.where(_runs(n_arr, k_arr, bypass_full), -(-n_arr // config.parallelism) + config.filter_latency, 0)


def sample_topk_cycles(
    n: np.ndarray | int,
    k: np.ndarray | int,
    config: TopkEngineConfig = TopkEngineConfig(),
    seed: int | np.random.Generator | None = 0,
    *,
    bypass_full: bool = True,
) -> np.ndarray:
    """Whole-engine cycles (quick-select, then the filter pass) for many (n, k) pairs; see above."""
    qs = sample_quickselect_cycles(n, k, config, seed, bypass_full=bypass_full)
    return qs + filter_pass_cycles(n, k, config, bypass_full=bypass_full)


def expected_quickselect_elements(n: int, k: int) -> float:
    """Knuth's expected comparisons of quick-select for the k-th largest of n distinct values.

    C(n, m) = 2[(n+1)H_n - (n+3-m)H_{n-m+1} - (m+2)H_m + n + 3] with m = k (the formula is symmetric in
    rank from the top or bottom); the elements streamed differ from it by one per round, so it is a
    closed form to sanity-check the sampled cycles against.
    """
    if not 1 <= k <= n:
        return 0.0

    def h(x: int) -> float:
        return sum(1.0 / i for i in range(1, x + 1))

    return 2 * ((n + 1) * h(n) - (n + 3 - k) * h(n - k + 1) - (k + 2) * h(k) + n + 3)

"""SpAtten's top-k engine (Algorithm 3, Sections IV-B and IV-C): a faithful reference and a fast path.

The engine finds the k-th largest element with a quick-select over two FIFOs and a random pivot, then
streams the buffered input through an order-preserving filter (keep ``x > threshold`` and the first
``num_equal`` elements ``x == threshold``, in input order), and compacts the survivors with a zero
eliminator (prefix sum + a log2-stage shifter). Because the filter runs in input order, ties at the
threshold are resolved by position: **the earliest equal elements are kept**. The fast path
(``topk_mask`` / ``topk_indices``) selects exactly that set, and returns indices in input order.

Reading of Algorithm 3. As printed, it initialises ``target = k`` and stops when
``size(FIFO_R) <= target < size(FIFO_R) + num_eq_pivot``; that test is consistent only for a 0-based
rank (the released RTL passes ``k - 1``), so we start from ``target = k - 1`` and report
``num_equal = target - size(FIFO_R) + 1`` elements equal to the threshold to keep. k = 0 selects
nothing and runs no round. The FIFO depth (64) only bounds the RTL's buffering; it does not change
the selected set or the cycle model below, so it is not modelled.

Cycle model (``TopkEngineConfig``, P = comparators per array):
  * every quick-select round (one STATE_RUN) streams the FIFO it partitions through the P-wide
    comparator arrays and zero eliminators: ``ceil(len / P) + round_latency`` cycles, where
    ``round_latency`` (default 3: compare, eliminate, push) is the fixed pipeline latency; the
    START decision is folded into it;
  * the filter pass streams the buffered input once: ``ceil(n / P) + filter_latency`` cycles; it has
    its own comparators and zero eliminator (Fig. 9), so in a pipeline it overlaps the next
    request's quick-select;
  * a zero eliminator of width w is ``1 + ceil(log2 w)`` pipelined stages (prefix sum, then one
    shifter layer per bit): m lines take ``m + stages - 1`` cycles. It is inside the two passes
    above, so it adds no cycles of its own there.
Cycles never increase with P for a fixed pivot sequence: each term is ``ceil(len / P)`` plus a
constant. ``sample_topk_cycles`` draws the same quick-select process in rank space (the pivot is a
uniformly random element, i.e. a uniformly random rank among distinct values), vectorised over many
(n, k) pairs; the hardware models use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dynaprune.errors import DynapruneError

# ----------------------------------------------------------------------------------------- config


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


def zero_eliminator_stages(width: int) -> int:
    """Pipeline stages of a zero eliminator of ``width`` lanes: a prefix sum, then log2(width) shifts."""
    return 1 + max(0, math.ceil(math.log2(width))) if width > 1 else 1


def zero_eliminator_cycles(lines: int, width: int) -> int:
    """Cycles to push ``lines`` vectors of ``width`` lanes through the pipelined eliminator."""
    return 0 if lines <= 0 else lines + zero_eliminator_stages(width) - 1


# -------------------------------------------------------------------------------------- reference


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


def zero_eliminate(values: Sequence[float], keep: Sequence[bool]) -> tuple[list[float], int]:
    """Compact the kept lanes to the front, in order (Section IV-C, Fig. 10); returns (lanes, stages).

    A prefix sum gives each lane the number of dropped lanes before it (``zero_cnt``); shifter layer s
    moves a lane left by 2**s when bit s of its ``zero_cnt`` is set. Layers go from the least to the most
    significant bit, which never makes two kept lanes collide (asserted).
    """
    if len(values) != len(keep):
        raise DynapruneError("zero eliminator: values and keep flags differ in length")
    n = len(values)
    zero_cnt, dropped = [], 0
    for flag in keep:
        zero_cnt.append(dropped)
        dropped += not flag
    triples = zip(values, zero_cnt, keep, strict=True)
    lanes: list[tuple[float, int] | None] = [(v, c) if f else None for v, c, f in triples]
    layers = max(0, math.ceil(math.log2(n))) if n > 1 else 0
    for s in range(layers):
        shifted: list[tuple[float, int] | None] = [None] * n
        for i, lane in enumerate(lanes):
            if lane is None:
                continue
            j = i - (1 << s) if lane[1] >> s & 1 else i
            assert shifted[j] is None, "zero eliminator collision"
            shifted[j] = lane
        lanes = shifted
    out = [lane[0] for lane in lanes if lane is not None]
    assert all(lane is not None for lane in lanes[: len(out)]), "zero eliminator left a gap"
    return out, 1 + layers


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


# -------------------------------------------------------------------------- vectorised cycle draw


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


# -------------------------------------------------------------------------------------- fast path


def _row_k(scores: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Validate k; returns (per-row k tensor or None for a scalar k, the largest k)."""
    n = scores.shape[-1]
    if isinstance(k, torch.Tensor):
        _check_k_dtype(k)
        kk = torch.broadcast_to(k.to(device=scores.device, dtype=torch.long), scores.shape[:-1]).contiguous()
        if not kk.numel():
            return kk, 0
        lo, hi = (int(v) for v in torch.aminmax(kk))
        _check_k_range(lo, hi, n)
        return kk, hi
    return None, _check_scalar_k(k, n)


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


def _lowest(t: torch.Tensor) -> float | int:
    return -math.inf if t.dtype.is_floating_point else torch.iinfo(t.dtype).min


def _top_two(scores: torch.Tensor, kk: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k-th largest, (k+1)-th largest or the dtype's lowest, some row tied?), thresholds shaped (..., 1).

    One torch.topk of k + 1 (unsorted for a scalar k: the two smallest of it are the k-th and (k+1)-th
    largest) tells whether the k-th largest is tied with an element outside the top k; only then does
    the position rule matter (one sync for the whole batch). torch.topk ranks NaN above everything,
    so a NaN anywhere in a row shows up in these k + 1 values.
    """
    n = scores.shape[-1]
    m = min(k + 1, n)
    per_row = kk is not None
    top = torch.topk(scores, m, dim=-1, sorted=per_row)
    check_nan = scores.dtype.is_floating_point
    if not per_row:
        if m == k:  # k == n: nothing outside the top k
            kth = top.values.amin(dim=-1, keepdim=True)
            nxt = torch.full_like(kth, _lowest(kth))
        else:
            low = torch.topk(top.values, 2, dim=-1, largest=False, sorted=True).values
            kth, nxt = low[..., 1:2], low[..., 0:1]
        flags = (nxt == kth).any()
        if check_nan:
            flags = flags | torch.isnan(top.values).any()
    else:
        kth = top.values.gather(-1, (kk - 1).clamp(min=0).unsqueeze(-1))
        padded = torch.cat([top.values, torch.full_like(top.values[..., :1], _lowest(top.values))], dim=-1)
        nxt = padded.gather(-1, kk.unsqueeze(-1).clamp(max=m))
        flags = ((nxt == kth).squeeze(-1) & (kk > 0)).any()
        if check_nan:  # sorted: a row's NaN comes first
            flags = flags | torch.isnan(top.values[..., :1]).any()
    problem = bool(flags)
    if problem and check_nan and bool(torch.isnan(top.values).any()):
        raise _nan_error()
    return kth, nxt, problem


def _fix_ties(scores: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor, want: torch.Tensor,
              rows: torch.Tensor) -> None:
    """In the ``rows`` where the threshold is tied, keep everything above it and the earliest ties."""
    idx = rows.nonzero(as_tuple=True)
    s, t, w = scores[idx], thr[idx], want[idx]
    gt = s > t
    eq = s == t
    need = (w - gt.sum(dim=-1)).unsqueeze(-1)
    fixed = gt | (eq & (eq.cumsum(dim=-1) <= need))
    mask[idx] = fixed & (w > 0).unsqueeze(-1)


def _prepare(scores: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    if scores.dim() < 1:
        raise DynapruneError("top-k scores need at least one dimension")
    return _row_k(scores, k)


def topk_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask (..., n) of Algorithm 3's selection: the k largest, earliest positions among ties.

    ``k`` is an int or an integer tensor broadcastable to ``scores.shape[:-1]`` (per-row k). CPU tensors
    take the numpy path (``_numpy_topk``: one partition, a comparison, a count). The torch path (other
    devices, NaN, bfloat16), for a scalar k: the (k+1)-th largest (torch.kthvalue, or torch.topk for
    small k), one comparison and one count; per-row k: one sorted torch.topk of max(k) + 1 and one
    comparison. Either path runs an exact tie fix-up (a cumsum over the elements equal to the k-th
    largest) only when some row's k-th largest value also occurs outside its top k.
    """
    out = _numpy_topk(scores, k, False)
    return _torch_mask(scores, k) if out is None else out


def _torch_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``topk_mask`` in torch ops (any device; every NaN input and every error goes through here)."""
    if scores.dim() == 1:  # one row: the batched code path with a unit batch
        return _torch_mask(scores.unsqueeze(0), k.reshape(1) if isinstance(k, torch.Tensor) else k)[0]
    kk, kmax = _prepare(scores, k)
    return _mask(scores, kk, kmax)


def _mask(scores: torch.Tensor, kk: torch.Tensor | None, kmax: int) -> torch.Tensor:
    n = scores.shape[-1]
    if kmax == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # The common case in a few dispatches: keep what is above the (k+1)-th largest, and check that this
    # is exactly k per row (else a tie at the threshold or a NaN: the exact path below).
    if kk is None and kmax < n:
        if 4 * (kmax + 1) <= n or n >= 4096:  # measured: the cheaper of the two on CPU
            nxt = torch.topk(scores, kmax + 1, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        else:
            nxt = torch.kthvalue(scores, n - kmax, dim=-1, keepdim=True).values
        mask = scores > nxt
        if bool((mask.sum(dim=-1) == kmax).all()):
            return mask
    elif kk is not None:
        top = torch.topk(scores, min(kmax + 1, n), dim=-1, sorted=True).values
        nxt = top.gather(-1, kk.clamp(max=top.shape[-1] - 1).unsqueeze(-1))
        mask = scores > nxt
        if bool((mask.sum(dim=-1) == kk).all()):
            return mask
    kth, nxt, tied_somewhere = _top_two(scores, kk, kmax)
    if kk is None and kmax == n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = scores >= kth
    if kk is not None:
        mask &= (kk > 0).unsqueeze(-1)
    if tied_somewhere:
        tied = (nxt == kth).squeeze(-1)
        want = kk if kk is not None else torch.full(scores.shape[:-1], kmax, device=scores.device)
        _fix_ties(scores, mask, kth, want, tied & (want > 0))
    return mask


def topk_indices(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Positions of Algorithm 3's selection in increasing (input) order, shape (..., k).

    With a per-row k the last dimension is max(k) and shorter rows are padded with -1 at the end.
    """
    out = _numpy_topk(scores, k, True)
    return _torch_indices(scores, k) if out is None else out


def _torch_indices(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``topk_indices`` in torch ops (any device; every NaN input and every error goes through here)."""
    if scores.dim() == 1:
        return _torch_indices(scores.unsqueeze(0), k.reshape(1) if isinstance(k, torch.Tensor) else k)[0]
    kk, kmax = _prepare(scores, k)
    lead = scores.shape[:-1]
    if kmax == 0:
        return torch.empty((*lead, 0), dtype=torch.long, device=scores.device)
    mask = _mask(scores, kk, kmax)
    if kk is None:  # exactly k kept per row: nonzero lists them row by row, in input order
        return mask.nonzero()[:, -1].view(*lead, kmax)
    return _indices_from_mask(mask, kmax)


def _indices_from_mask(mask: torch.Tensor, kmax: int) -> torch.Tensor:
    """Kept positions of each row in input order, padded with -1 to ``kmax`` (a cumsum + one scatter)."""
    slot = torch.where(mask, mask.cumsum(dim=-1) - 1, kmax)  # dropped lanes go to a spare column
    out = torch.full((*mask.shape[:-1], kmax + 1), -1, dtype=torch.long, device=mask.device)
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(slot)
    return out.scatter_(-1, slot, pos)[..., :kmax]


# -------------------------------------------------------------------- fast path on the CPU: numpy

# CPU tensors go through numpy (``_numpy_topk``) when a row holds at most NUMPY_MAX_N scores (None: any
# n). There a call is a few operations of about a microsecond each where a torch op costs 3-5 us of
# dispatch, no host sync is needed (the arrays are already on the host), and ``np.partition``
# (introselect) finds the threshold several times faster than torch.topk / torch.kthvalue. Measured by
# ``python -m benchmarks.topk`` (it times both paths at every n): the numpy path was the faster one at
# every n from 64 to 65,536, one row and eight, so there is no size limit; the torch path remains for
# other devices, NaN inputs and dtypes numpy lacks (bfloat16). Tests set it to 0 to run the torch path.
NUMPY_MAX_N: int | None = None

_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                           torch.int32, torch.int64})
_INTP_IS_INT64 = np.dtype(np.intp) == np.dtype(np.int64)  # nonzero / argsort positions are intp


def _numpy_topk(scores: torch.Tensor, k: int | torch.Tensor, indices: bool) -> torch.Tensor | None:
    """``topk_indices`` (``indices``) or ``topk_mask`` through numpy, or None where it does not apply.

    It applies to a strided CPU tensor of a dtype both libraries order alike, with 1 <= n (<=
    ``NUMPY_MAX_N`` when set) and max k >= 1, and holding no NaN; everything else (other devices,
    NaN, k = 0, a k tensor on another device or one that does not broadcast) returns None for the torch
    path, which decides and raises exactly as before. Bad k values raise here through ``_row_k``'s checks.

    Common case: one ``np.partition`` gives each row's (k+1)-th largest w, and ``x > w`` keeps at most
    k per row (NaN, which both libraries rank above everything, never compares greater); a count over
    the whole batch equal to the sum of the k's means every row kept exactly k, i.e. no tie at the
    threshold and no NaN, so the mask is exact. Otherwise (a tie at the threshold, a NaN, or k = n in
    some row): NaN goes to the torch path; ties are settled as ``_fix_ties`` does, from the k-th largest
    (a second partition) and a cumsum over the equal elements (the earliest kept, as Algorithm 3's
    filter keeps them).
    """
    if not scores.is_cpu or scores.dtype not in _NUMPY_DTYPES or scores.layout != torch.strided:
        return None
    shape = scores.shape
    if not shape:
        return None
    n = shape[-1]
    if n == 0 or (NUMPY_MAX_N is not None and n > NUMPY_MAX_N):
        return None
    if isinstance(k, torch.Tensor):
        kk = _numpy_row_k(k, shape)
        if kk is None:
            return None
        kmax = int(kk.max())
        _check_k_range(int(kk.min()), kmax, n)
    else:
        kk, kmax = None, _check_scalar_k(k, n)
    if kmax == 0:
        return None
    a = (scores.detach() if scores.requires_grad else scores).numpy()
    if kmax < n:
        if kk is None:
            mask = a > np.partition(a, n - kmax - 1, axis=-1)[..., n - kmax - 1, None]
            total = mask.size // n * kmax
        else:
            pos = n - 1 - kk  # ascending position of each row's (k+1)-th largest; n - 1 (the max) at k = 0
            part = np.partition(a, np.unique(pos), axis=-1)
            mask = a > np.take_along_axis(part, pos[..., None], axis=-1)
            total = int(kk.sum())
        if indices:  # the count is the number of positions found
            flat = mask.ravel().nonzero()[0]  # 1-D nonzero: several times faster than an N-D one
            if flat.size == total:
                return torch.from_numpy(_numpy_columns(flat, mask.shape, kk, kmax))
        elif np.count_nonzero(mask) == total:
            return torch.from_numpy(mask)
    if a.dtype.kind == "f" and np.isnan(a).any():
        return None
    # exact (as _fix_ties): keep what is above each row's k-th largest v and its earliest copies of v
    if kk is None:
        want: int | np.ndarray = kmax
        v = np.partition(a, n - kmax, axis=-1)[..., n - kmax, None]
    else:
        want = kk[..., None]
        pos = n - np.maximum(kk, 1)  # a row with k = 0 compares with its max: nothing above, none wanted
        v = np.take_along_axis(np.partition(a, np.unique(pos), axis=-1), pos[..., None], axis=-1)
    gt, eq = a > v, a == v
    mask = gt | (eq & (np.cumsum(eq, axis=-1) <= want - gt.sum(axis=-1, keepdims=True)))
    if indices:
        return torch.from_numpy(_numpy_columns(mask.ravel().nonzero()[0], mask.shape, kk, kmax))
    return torch.from_numpy(mask)


def _numpy_row_k(k: torch.Tensor, shape: torch.Size) -> np.ndarray | None:
    """Per-row k as int64 numpy broadcast to the rows, or None to leave it to ``_row_k``."""
    _check_k_dtype(k)
    if not k.is_cpu or k.dtype not in _NUMPY_DTYPES or k.layout != torch.strided:
        return None
    kn, lead = k.numpy(), shape[:-1]
    if not lead:  # one row: k must hold one value (the torch path reshapes it to (1,))
        if kn.size != 1:
            return None
        kn = kn.reshape(())
    try:
        kk = np.broadcast_to(kn, lead).astype(np.int64)
    except ValueError:
        return None
    return kk if kk.size else None


def _numpy_columns(flat: np.ndarray, shape: tuple[int, ...], kk: np.ndarray | None, kmax: int) -> np.ndarray:
    """Kept positions per row in input order, (..., kmax) int64, from the flat positions of the kept
    lanes (row by row, in order; exactly k in each row); rows with a smaller per-row k padded with -1."""
    n, lead = shape[-1], shape[:-1]
    flat = flat if _INTP_IS_INT64 else flat.astype(np.int64)
    if kk is None:
        if flat.size == kmax:  # one row: flat positions are the columns
            return flat.reshape(*lead, kmax)
        if flat.size <= 1024:  # flat position -> column: one op, cheaper for few positions
            return (flat % n).reshape(*lead, kmax)
        return (flat.reshape(-1, kmax) - np.arange(0, flat.size // kmax * n, n)[:, None]).reshape(*lead, kmax)
    out = np.full((*lead, kmax), -1, dtype=np.int64)
    out[np.arange(kmax) < kk[..., None]] = flat % n  # boolean assignment fills row by row, in order
    return out

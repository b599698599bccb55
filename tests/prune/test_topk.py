"""SpAtten top-k engine (Algorithm 3): reference vs torch.topk, fast path vs reference, cycle model.

Property tests total 10,000 hypothesis examples (see ``EXAMPLES``); values are drawn from a small
integer range half of the time so duplicates, all-equal rows and ties at the threshold are common.
The fast path has two implementations (numpy for CPU tensors, torch for the rest); every fast-path
property test checks both against the same oracle.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaprune.errors import DynapruneError
from dynaprune.prune import topk as topk_module
from dynaprune.prune.topk import (
    TopkEngineConfig,
    expected_quickselect_elements,
    order_preserving_filter,
    quick_select,
    sample_topk_cycles,
    topk_indices,
    topk_mask,
    topk_reference,
    zero_eliminate,
    zero_eliminator_cycles,
    zero_eliminator_stages,
)

EXAMPLES = {"ref_vs_torch": 3000, "fast_vs_ref": 3000, "batched": 2000, "eliminator": 1000,
            "ref_cycles_monotone": 500, "sampled_cycles_monotone": 500}
assert sum(EXAMPLES.values()) >= 10_000


def _settings(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_small_ints = st.integers(min_value=-3, max_value=3).map(float)  # many ties
_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


def _make_values(n: int, mode: str, seed: int) -> list[float]:
    """Row contents from a seed (cheap to draw many): few distinct values, floats, or all equal."""
    rng = np.random.default_rng(seed)
    if mode == "ties":
        return rng.integers(-3, 4, n).astype(float).tolist()
    if mode == "equal":
        return [2.0] * n
    return rng.standard_normal(n).astype(np.float32).astype(float).tolist()


# half drawn element by element (shrinks well), half from a seed (many cases per second)
seeded_lists = st.builds(_make_values, st.integers(1, 48), st.sampled_from(["ties", "floats", "equal"]),
                         st.integers(0, 2**32 - 1))
values_lists = st.one_of(st.lists(_small_ints, min_size=1, max_size=12),
                         st.lists(_floats, min_size=1, max_size=12), seeded_lists)


@st.composite
def values_and_k(draw):
    vals = draw(values_lists)
    k = draw(st.one_of(st.integers(0, len(vals)), st.sampled_from([0, len(vals)])))
    return vals, k


def earliest_among_ties(vals: list[float], k: int) -> list[int]:
    """The oracle: the k largest, ties broken by position, returned in input order."""
    return sorted(sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:k])


@contextmanager
def torch_path():
    """Run the fast path's torch implementation (the one for non-CPU tensors) on CPU tensors."""
    saved, topk_module.NUMPY_MAX_N = topk_module.NUMPY_MAX_N, 0
    try:
        yield
    finally:
        topk_module.NUMPY_MAX_N = saved


@contextmanager
def numpy_path():
    yield


PATHS = {"numpy": numpy_path, "torch": torch_path}


@_settings("ref_vs_torch")
@given(values_and_k(), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 3, 16, 64]))
def test_reference_selects_torch_topk_set_up_to_ties(case, seed, parallelism):
    vals, k = case
    res = topk_reference(vals, k, TopkEngineConfig(parallelism=parallelism), seed=seed)
    assert list(res.indices) == earliest_among_ties(vals, k)
    assert list(res.indices) == sorted(res.indices)  # input order preserved
    t = torch.tensor(vals, dtype=torch.float64)
    torch_vals = torch.topk(t, k).values.tolist()
    assert sorted(vals[i] for i in res.indices) == sorted(torch_vals)  # same multiset of values
    if k:
        assert res.kth_largest == min(torch_vals)
        assert res.num_equal == sum(1 for i in res.indices if vals[i] == res.kth_largest)


@_settings("fast_vs_ref")
@given(values_and_k(), st.integers(0, 2**31 - 1))
def test_fast_path_equals_reference(case, seed):
    vals, k = case
    ref = topk_reference(vals, k, seed=seed)
    t = torch.tensor(vals, dtype=torch.float32)
    for path in PATHS.values():
        with path():
            assert topk_indices(t, k).tolist() == list(ref.indices)
            mask = topk_mask(t, k)
            assert mask.nonzero().flatten().tolist() == list(ref.indices)
            # a per-row tensor k gives the same answer as the scalar
            assert topk_indices(t.unsqueeze(0), torch.tensor([k])).tolist() == [list(ref.indices)]


@_settings("batched")
@given(st.integers(1, 6), st.integers(1, 32), st.sampled_from(["ties", "floats", "equal"]),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_batched_per_row_k(rows, n, mode, seed, kseed):
    vals = [_make_values(n, mode, seed + r) for r in range(rows)]
    krng = np.random.default_rng(kseed)
    ks = krng.integers(0, n + 1, rows).tolist()
    t = torch.tensor(vals, dtype=torch.float32).reshape(rows, 1, n)  # an extra batch dim
    kk = torch.tensor(ks).reshape(rows, 1)
    same_k = int(krng.integers(0, n + 1))
    for path in PATHS.values():
        with path():
            mask, idx = topk_mask(t, kk), topk_indices(t, kk)
            idx2 = topk_indices(t, same_k)
        assert idx.shape == (rows, 1, max(ks))
        for r in range(rows):
            want = earliest_among_ties(vals[r], ks[r])
            assert mask[r, 0].nonzero().flatten().tolist() == want
            assert idx[r, 0].tolist() == want + [-1] * (max(ks) - ks[r])
            assert idx2[r, 0].tolist() == earliest_among_ties(vals[r], same_k)


def _oracle_rows(x: np.ndarray, k: np.ndarray) -> list[list[int]]:
    """Brute force for big rows: stable descending order (position breaks ties), first k, ascending."""
    rows = x.reshape(-1, x.shape[-1])
    return [sorted(np.lexsort((np.arange(row.size), -row.astype(np.float64)))[:kr].tolist())
            for row, kr in zip(rows, np.broadcast_to(k, x.shape[:-1]).reshape(-1), strict=True)]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("n", [3, 64, 1000, 5000, 70_000])
def test_both_paths_small_and_large_n_with_ties(path, n):
    """Both implementations at small and large n against brute force: rows with ties at the threshold
    (few distinct values), all-equal rows, distinct floats and +-inf; scalar and per-row k (0 and n
    included), several dtypes, a transposed input and one that requires grad."""
    rng = np.random.default_rng(n)
    rows = [rng.integers(-3, 4, n).astype(np.float32),  # many ties at every threshold
            np.full(n, 2.0, np.float32),
            rng.standard_normal(n).astype(np.float32),
            np.where(rng.random(n) < 0.3, np.float32(np.inf), rng.integers(0, 3, n)).astype(np.float32)]
    rows[2][rng.integers(0, n, max(1, n // 8))] = -np.inf
    x = np.stack(rows)
    ks = [1, n // 4, n // 2 + 1, n]
    per_row = np.array([0, n, max(1, n // 3), n // 2])
    with PATHS[path]():
        for dtype in (torch.float32, torch.float64, torch.float16, torch.int64):
            xt = torch.from_numpy(np.nan_to_num(x, posinf=7, neginf=-7) if dtype == torch.int64 else x).to(dtype)
            xv = xt.numpy().astype(np.float64)  # what the dtype holds (float16 rounds)
            for k in [*ks, torch.from_numpy(per_row)]:
                kn = k.numpy() if isinstance(k, torch.Tensor) else np.full(len(rows), k)
                want = _oracle_rows(xv, kn)
                mask, idx = topk_mask(xt, k), topk_indices(xt, k)
                for r, w in enumerate(want):
                    assert mask[r].nonzero().flatten().tolist() == w
                    assert idx[r].tolist() == w + [-1] * (idx.shape[-1] - len(w))
        # a transposed (non-contiguous) batch, a 1-D row and a tensor that requires grad
        xt = torch.from_numpy(x.T.copy()).T
        assert not xt.is_contiguous()
        assert topk_indices(xt, n // 4).tolist() == _oracle_rows(x, np.full(len(rows), n // 4))
        assert topk_indices(xt[0], n // 4).tolist() == _oracle_rows(x[:1], np.array([n // 4]))[0]
        g = torch.from_numpy(x[2:3].copy()).requires_grad_(True)  # distinct floats: no tie fix-up needed
        assert topk_mask(g, n // 4)[0].nonzero().flatten().tolist() == _oracle_rows(x[2:3], np.array([n // 4]))[0]
        assert topk_indices(g, torch.tensor([n // 3])).tolist() == _oracle_rows(x[2:3], np.array([n // 3]))


@pytest.mark.parametrize("n", [5, 300])
def test_both_paths_agree_on_nan(n):
    """NaN: the numpy path hands every NaN input to the torch path, so both raise (or not) alike."""
    rng = np.random.default_rng(n)
    x = torch.from_numpy(rng.integers(0, 3, (3, n)).astype(np.float32))
    x[1, 2] = float("nan")
    cases = [(x, 1), (x, n), (x, torch.tensor([1, 0, 1])), (x, torch.tensor([0, 2, 0])), (x, torch.tensor([0, 0, n])),
             (x[1], 1), (x, 0)]
    for scores, k in cases:
        outcome = {}
        for name, path in PATHS.items():
            with path():
                try:
                    outcome[name] = (topk_mask(scores, k).tolist(), topk_indices(scores, k).tolist())
                except DynapruneError as err:
                    outcome[name] = str(err)
        assert outcome["numpy"] == outcome["torch"], (k, outcome)
    with pytest.raises(DynapruneError, match="NaN"):
        topk_indices(x, 2)


def test_bfloat16_takes_the_torch_path():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], dtype=torch.bfloat16)
    assert topk_indices(x, 2).tolist() == [[1, 2]] and topk_mask(x, 4).tolist() == [[False, True, True, True, True]]


@_settings("eliminator")
@given(st.integers(0, 70), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_zero_eliminator_compacts_in_order(n, density, seed):
    rng = np.random.default_rng(seed)
    vals = rng.integers(-9, 10, n).astype(float).tolist()
    keep = (rng.random(n) < density).tolist()
    out, stages = zero_eliminate(vals, keep)
    assert out == [v for v, f in zip(vals, keep, strict=True) if f]
    assert stages == (1 + int(np.ceil(np.log2(len(vals)))) if len(vals) > 1 else 1)


@_settings("ref_cycles_monotone")
@given(values_and_k(), st.integers(0, 2**31 - 1))
def test_more_comparators_never_slower_reference(case, seed):
    vals, k = case
    # the pivot path does not depend on P, so one run's round lengths give every P's cycle count
    base = topk_reference(vals, k, TopkEngineConfig(parallelism=1), seed=seed)
    lengths = quick_select(vals, k, TopkEngineConfig(parallelism=1), seed=seed).round_lengths
    cycles = []
    for p in range(1, 65):
        cfg = TopkEngineConfig(parallelism=p)
        c = sum(cfg.round_cycles(m) for m in lengths) + (cfg.filter_cycles(len(vals)) if k else 0)
        cycles.append(c)
    assert cycles[0] == base.cycles
    for p in (2, 16, 64):
        assert topk_reference(vals, k, TopkEngineConfig(parallelism=p), seed=seed).cycles == cycles[p - 1]
    assert all(a >= b for a, b in zip(cycles, cycles[1:], strict=False))


@_settings("sampled_cycles_monotone")
@given(st.lists(st.tuples(st.integers(0, 1100), st.integers(0, 1100)), min_size=1, max_size=20),
       st.integers(0, 2**31 - 1))
def test_more_comparators_never_slower_sampled(pairs, seed):
    n = np.array([a for a, _ in pairs])
    k = np.minimum(np.array([b for _, b in pairs]), n)
    prev = None
    for p in (1, 2, 4, 8, 16, 32, 64):
        cyc = sample_topk_cycles(n, k, TopkEngineConfig(parallelism=p), seed=seed)
        assert cyc.shape == n.shape and np.all(cyc >= 0)
        if prev is not None:
            assert np.all(cyc <= prev)
        prev = cyc


class FixedPivots:
    """A stand-in RNG whose ``integers(n)`` returns scripted FIFO positions (hand-computed cases)."""

    def __init__(self, picks: list[int]):
        self.picks = list(picks)

    def integers(self, n: int) -> int:
        pick = self.picks.pop(0)
        assert 0 <= pick < n
        return pick


def test_hand_computed_quick_select_cycles():
    # values 5 1 4 2 3, k = 2, P = 2, round latency 3.
    # round 1 streams 5 items, pivot FIFO_L[4] = 3: L = [1, 2], R = [5, 4], eq = 1 -> 3 + 3 = 6 cycles;
    # START: |R| = 2 > target 1 -> pivot too small; round 2 streams R (2 items), pivot R[1] = 4:
    # L = [], R = [5], eq = 1 -> 1 + 3 = 4 cycles; START: |R| = 1 <= 1 < 2 -> k-th = 4, keep 1 equal.
    cfg = TopkEngineConfig(parallelism=2, round_latency=3, filter_latency=3)
    qs = quick_select([5, 1, 4, 2, 3], 2, cfg, seed=FixedPivots([4, 1]))
    assert (qs.kth_largest, qs.num_equal, qs.round_lengths, qs.cycles) == (4, 1, (5, 2), 10)
    res = topk_reference([5, 1, 4, 2, 3], 2, cfg, seed=FixedPivots([4, 1]))
    assert res.indices == (0, 2) and res.filter_cycles == 3 + 3 and res.cycles == 16


def test_ties_keep_earliest_and_count_equal():
    res = topk_reference([1, 2, 2, 2, 0], 2, seed=1)
    assert res.indices == (1, 2) and res.kth_largest == 2 and res.num_equal == 2
    assert order_preserving_filter([3, 3, 3], 3, 2) == [0, 1]
    allsame = topk_reference([7.0] * 9, 4, seed=3)
    assert allsame.indices == (0, 1, 2, 3) and allsame.num_equal == 4


def test_edge_sizes():
    assert topk_reference([1.5], 1).indices == (0,)
    assert topk_reference([1.5], 0).indices == () and topk_reference([1.5], 0).cycles == 0
    t = torch.tensor([[0.3]])
    assert topk_indices(t, 1).tolist() == [[0]] and topk_mask(t, 0).tolist() == [[False]]
    assert topk_indices(torch.zeros(2, 0), 0).shape == (2, 0)


def test_sampled_cycles_match_reference_in_distribution():
    cfg = TopkEngineConfig(parallelism=1, round_latency=0, filter_latency=0)
    rng = np.random.default_rng(7)
    ref = [quick_select(list(rng.permutation(120)), 30, cfg, seed=rng).cycles for _ in range(1500)]
    sampled = sample_topk_cycles(np.full(50_000, 120), 30, cfg, seed=1) - 120  # minus the filter pass
    assert abs(np.mean(ref) / sampled.mean() - 1) < 0.03
    # both stream about Knuth's expected comparisons plus one element per round
    assert abs(sampled.mean() / expected_quickselect_elements(120, 30) - 1) < 0.08


def test_sampled_cycles_bypass_and_zero():
    cfg = TopkEngineConfig(parallelism=16)
    assert sample_topk_cycles(np.array([100, 100, 0]), np.array([0, 100, 0]), cfg).tolist() == [0, 0, 0]
    assert int(sample_topk_cycles(100, 100, cfg, bypass_full=False)) > 0
    assert zero_eliminator_stages(16) == 5 and zero_eliminator_cycles(10, 16) == 14


@pytest.mark.parametrize("bad", [
    lambda: topk_reference([1.0, float("nan")], 1),
    lambda: topk_reference([1.0, 2.0], 3),
    lambda: topk_mask(torch.tensor([1.0, float("nan"), 0.0]), 1),
    lambda: topk_indices(torch.tensor([[1.0, float("nan")]]), torch.tensor([1])),
    lambda: topk_mask(torch.randn(3), -1),
    lambda: topk_mask(torch.randn(2, 3), torch.tensor([1, 4])),
    lambda: topk_mask(torch.randn(2, 3), torch.tensor([1.0, 2.0])),
    lambda: TopkEngineConfig(parallelism=0),
])
def test_bad_input_is_one_clear_error(bad):
    with pytest.raises(DynapruneError):
        bad()

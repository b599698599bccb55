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

The package, one idea per module: ``config`` (the engine's knobs and the argument checks every path
shares), ``eliminator`` (the zero eliminator), ``reference`` (Algorithm 3 literally), ``cycles`` (the
vectorised cycle draw the hardware models use), ``fast`` (``topk_mask`` / ``topk_indices`` in torch)
and ``numpy_path`` (their CPU implementation). Every public name is importable from here.
"""

from __future__ import annotations

from dynaprune.prune.topk.config import TopkEngineConfig
from dynaprune.prune.topk.cycles import (
    expected_quickselect_elements,
    filter_pass_cycles,
    sample_quickselect_cycles,
    sample_topk_cycles,
)
from dynaprune.prune.topk.eliminator import zero_eliminate, zero_eliminator_cycles, zero_eliminator_stages
from dynaprune.prune.topk.fast import topk_indices, topk_mask
from dynaprune.prune.topk.reference import (
    QuickSelectResult,
    TopkResult,
    order_preserving_filter,
    quick_select,
    topk_reference,
)

# CPU tensors go through numpy (``_numpy_topk``) when a row holds at most NUMPY_MAX_N scores (None: any
# n). There a call is a few operations of about a microsecond each where a torch op costs 3-5 us of
# dispatch, no host sync is needed (the arrays are already on the host), and ``np.partition``
# (introselect) finds the threshold several times faster than torch.topk / torch.kthvalue. Measured by
# ``python -m benchmarks.topk`` (it times both paths at every n): the numpy path was the faster one at
# every n from 64 to 65,536, one row and eight, so there is no size limit; the torch path remains for
# other devices, NaN inputs and dtypes numpy lacks (bfloat16). Tests set it to 0 to run the torch path.
NUMPY_MAX_N: int | None = None

__all__ = [
    "NUMPY_MAX_N",
    "QuickSelectResult",
    "TopkEngineConfig",
    "TopkResult",
    "expected_quickselect_elements",
    "filter_pass_cycles",
    "order_preserving_filter",
    "quick_select",
    "sample_quickselect_cycles",
    "sample_topk_cycles",
    "topk_indices",
    "topk_mask",
    "topk_reference",
    "zero_eliminate",
    "zero_eliminator_cycles",
    "zero_eliminator_stages",
]

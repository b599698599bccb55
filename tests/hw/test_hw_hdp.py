"""HDP co-processor model: a hand-derived head, early head pruning, and sparsity never costing cycles."""

from __future__ import annotations

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.hw.hdp import HdpConfig, head_work, simulate_hdp
from dynaprune.hw.trace import Trace, TraceRow


def head_rows(layer: int, head: int, kept: int, lq: int = 16, lk: int = 16, d: int = 16) -> list[TraceRow]:
    """One head of ``lq`` queries over ``lk`` keys with integer / fraction parts of 4 bits each."""
    return [TraceRow(0, layer, head, d, lk, kept, quant_key_bit=4, auto_requant_incre=4) for _ in range(lq)]


def test_one_dense_head_by_hand():
    # 16 queries x 16 keys, D = 16, a 16 x 16 PE array: one tile; 4-bit PEs, 4-bit int and fraction
    # HDP with nothing pruned: I x I 16 cycles + (I x F, F x I) 2 x 16 + prob x V 4 passes x 1 tile x 16
    # keys = 112; softmax 2 x 256 / 8 = 64, adders, engine, DRAM shorter; + fill (16 + 16 - 2) + DRAM
    # latency 100. The dense baseline is the same datapath with pruning off: the same 112 (F x F is
    # dropped by both), so nothing pruned is exactly 1.00x (the old baseline paid F x F: 128, 1.07x)
    r = simulate_hdp(Trace.from_rows(head_rows(0, 0, kept=16)))
    assert r.cycles == 112 + 30 + 100
    assert r.extra["dense_cycles"] == 112 + 30 + 100
    assert r.extra["speedup_vs_dense"] == 1.0
    assert r.dram_bytes == r.extra["dense_dram_bytes"]


@pytest.mark.parametrize("lq,lk,d", [(128, 128, 64), (1, 1000, 64), (40, 40, 32), (7, 300, 48)])
def test_nothing_pruned_is_exactly_dense(lq, lk, d):
    r = simulate_hdp(Trace.from_rows(head_rows(0, 0, lk, lq, lk, d) + head_rows(0, 1, lk, lq, lk, d)))
    assert r.extra["speedup_vs_dense"] == 1.0 and r.cycles == r.extra["dense_cycles"]


def test_block_sparsity_and_early_head_pruning():
    # layer 1 has only head 0: its head 1 was pruned early and costs only its integer pass
    rows = head_rows(0, 0, 16) + head_rows(0, 1, 16) + head_rows(1, 0, 16)
    w, _ = head_work(Trace.from_rows(rows), HdpConfig())
    assert list(w.kept) == [True, True, True, False]
    assert w.pe_busy[-1] == 16  # I x I only
    # a quarter of the blocks kept: fraction products and prob x V shrink
    sparse = simulate_hdp(Trace.from_rows(head_rows(0, 0, kept=4)))
    dense = simulate_hdp(Trace.from_rows(head_rows(0, 0, kept=16)))
    assert sparse.cycles < dense.cycles and sparse.dram_bytes <= dense.dram_bytes


@pytest.mark.parametrize("lq,lk,d", [(128, 128, 64), (1, 1000, 64), (40, 40, 32)])
def test_more_sparsity_never_slower(lq, lk, d):
    cycles = [simulate_hdp(Trace.from_rows(head_rows(0, 0, k, lq, lk, d))).cycles
              for k in range(lk, 0, -max(1, lk // 7))]
    assert all(a >= b for a, b in zip(cycles, cycles[1:], strict=False))


def test_blocks_and_heads_pruned_by_hand():
    # 2 layers x 2 heads, 32 queries x 32 keys, D = 16, 16 x 16 PEs, 4-bit parts: 2 x 2 = 4 score tiles,
    # prob x V 2 x 1 = 2 tiles; fill 30, DRAM latency 100 once; DRAM (~2 KB a head) never the longest unit.
    #   a quarter of the blocks kept (8 of 32 keys a query): I x I 4 x 16 = 64, fractions 2 x ceil(4/4)
    #     x 16 = 32, prob x V 4 passes x 2 tiles x 8 keys = 64 -> 160 (softmax 2 x 256 / 8 = 64) + 30 = 190
    #   nothing pruned: 64 + 2 x 4 x 16 + 4 x 2 x 32 = 448 (softmax 256) + 30 = 478
    #   pruned early (layer 1 lacks head 1): I x I only, 64 (engine 256 blocks / 16 = 16) + 30 = 94
    # dense baseline: every head as "nothing pruned", 4 x 478
    rows = head_rows(0, 0, 8, 32, 32) + head_rows(0, 1, 8, 32, 32) + head_rows(1, 0, 32, 32, 32)
    w, _ = head_work(Trace.from_rows(rows), HdpConfig())
    assert list(w.cycles) == [190, 190, 478, 94]
    assert list(w.dense_cycles) == [478] * 4
    r = simulate_hdp(Trace.from_rows(rows))
    assert r.cycles == 190 + 190 + 478 + 94 + 100
    assert r.extra["dense_cycles"] == 4 * 478 + 100
    assert r.extra["speedup_vs_dense"] == (4 * 478 + 100) / (190 + 190 + 478 + 94 + 100)
    assert r.extra["heads_pruned"] == 1


def test_config_validation():
    with pytest.raises(DynapruneError):
        HdpConfig(pe_rows=0)
    with pytest.raises(DynapruneError):
        HdpConfig(near_zero_fraction=1.0)

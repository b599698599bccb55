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
    # HDP: I x I 16 cycles + (I x F, F x I) 2 x 16 + prob x V 4 passes x 1 tile x 16 keys = 112
    # dense: 4 x 16 + 64 = 128; softmax 2 x 256 / 8 = 64, adders, engine, DRAM shorter
    # both + fill (16 + 16 - 2) + DRAM latency 100
    r = simulate_hdp(Trace.from_rows(head_rows(0, 0, kept=16)))
    assert r.cycles == 112 + 30 + 100
    assert r.extra["dense_cycles"] == 128 + 30 + 100
    assert r.extra["speedup_vs_dense"] == pytest.approx(258 / 242)


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


def test_bert_like_speedup_is_in_the_papers_range():
    # BERT-base shape, 75 % of blocks pruned (the summary's headline sparsity), 1 head in 12 pruned
    rows = []
    for layer in range(2):
        for head in range(12):
            if layer == 1 and head == 11:
                continue
            rows += head_rows(layer, head, 32, lq=128, lk=128, d=64)
    r = simulate_hdp(Trace.from_rows(rows))
    assert 2.5 < r.extra["speedup_vs_dense"] < 4.5
    assert r.extra["heads_pruned"] == 1


def test_config_validation():
    with pytest.raises(DynapruneError):
        HdpConfig(pe_rows=0)
    with pytest.raises(DynapruneError):
        HdpConfig(near_zero_fraction=1.0)

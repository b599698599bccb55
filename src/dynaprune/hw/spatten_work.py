"""SpAtten's per-row work (``row_work``): everything about each trace row that does not depend on timing
(DRAM transfer cycles, summarization reuse of keys and values, Q x K / softmax / prob x V cycles, top-k
cycles drawn from the engine's cycle model, energy counts), computed in bulk with numpy before
``simulate_spatten`` walks the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynaprune.hw.dram import row_bytes, transfer
from dynaprune.hw.energy import EXP_FLOPS, EnergyCounts
from dynaprune.hw.spatten_config import SpAttenConfig
from dynaprune.hw.trace import Trace
from dynaprune.prune.topk import filter_pass_cycles, sample_quickselect_cycles, sample_topk_cycles


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each run of equal keys, run id of every row) for consecutive rows."""
    diff = np.zeros(len(keys[0]), dtype=bool)
    diff[0] = True
    for k in keys:
        diff[1:] |= k[1:] != k[:-1]
    return np.nonzero(diff)[0], np.cumsum(diff) - 1


def _bits(col: np.ndarray, unquantized: int) -> np.ndarray:
    return np.where(col == -1, unquantized, col).astype(np.int64)


@dataclass(frozen=True)
class RowWork:
    """Per-row costs computed in bulk (numpy) before the pipeline walk."""

    k_fetch: np.ndarray  # DRAM cycles: Q + key MSBs (0 when reused)
    lsb_fetch: np.ndarray  # DRAM cycles for key LSBs (0 when not needed or already on chip)
    v_fetch: np.ndarray
    out_write: np.ndarray
    k_sram: np.ndarray  # on-chip bytes held in the Key SRAM by this row's fetch
    v_sram: np.ndarray
    qk: np.ndarray
    sm: np.ndarray
    topk_v: np.ndarray  # quick-select cycles of the local value top-k (0: bypassed)
    filter_v: np.ndarray  # its filter pass (a separate pipelined stage, Fig. 9)
    pv: np.ndarray
    topk_tok: np.ndarray
    requant: np.ndarray
    sm_shared: np.ndarray  # exps do not fit the softmax FIFO: the divide pass reuses the exp unit
    owner: np.ndarray  # the row whose fetch holds this row's keys/values (itself unless reused)
    dram_bytes: np.ndarray
    counts: EnergyCounts
    flops: np.ndarray  # executed multiply + add operations


def row_work(trace: Trace, cfg: SpAttenConfig) -> RowWork:
    """Everything about each row that does not depend on timing, vectorised over the trace."""
    dram = cfg.dram()
    t = trace
    n = len(t)
    D = t["embedding_length_D"].astype(np.int64)
    L = t["sentence_length_L"].astype(np.int64)
    nk = t["key_fetch_num"].astype(np.int64)
    nv = t["value_fetch_num"].astype(np.int64)
    kbits = _bits(t["quant_key_bit"], cfg.unquantized_bits)
    qbits = _bits(t["quant_query_bit"], cfg.unquantized_bits)
    vbits = _bits(t["quant_value_bit"], cfg.unquantized_bits)
    requant = t["if_requant"].astype(bool)
    lsb_bits = np.where(requant, np.maximum(t["auto_requant_incre"], 0), 0).astype(np.int64)

    # summarization: queries of one (iteration, layer, head) share the keys/values fetched by the first
    first, gid = _groups(t["iteration_id"], t["layer_id"], t["head_id"])
    is_first = np.zeros(n, dtype=bool)
    is_first[first] = True
    g_nk = np.maximum.reduceat(nk, first)[gid]
    onchip_row = row_bytes(D, cfg.onchip_bits)
    fits = (g_nk * onchip_row <= cfg.key_sram_bytes) & (g_nk * onchip_row <= cfg.value_sram_bytes)
    multi = np.bincount(gid)[gid] > 1
    reuse = multi & fits
    k_rows = np.where(reuse, np.where(is_first, g_nk, 0), nk)
    v_rows = np.where(reuse, np.where(is_first, g_nk, 0), nv)
    # LSBs: once per reused group (its first row that asks), else every row that asks
    first_req = np.zeros(n, dtype=bool)
    if requant.any():
        req_idx = np.nonzero(requant)[0]
        _, pos = np.unique(gid[req_idx], return_index=True)
        first_req[req_idx[pos]] = True
    lsb_rows = np.where(requant & (~reuse | first_req), np.where(reuse, g_nk, nk), 0)

    q = transfer(row_bytes(D, qbits), np.ones(n), np.ones(n), dram)
    k = transfer(row_bytes(D, kbits), k_rows, L, dram)
    lsb = transfer(row_bytes(D, lsb_bits), lsb_rows, L, dram)
    v = transfer(row_bytes(D, vbits), v_rows, L, dram)
    out = transfer(onchip_row, np.ones(n), np.ones(n), dram)

    def cyc(x: np.ndarray) -> np.ndarray:
        return np.ceil(x - 1e-9)  # whole cycles per transfer

    qk_per_cycle = np.where(D <= cfg.qk_multipliers, np.minimum(cfg.adder_tree_outputs,
                                                             np.maximum(cfg.qk_multipliers // D, 1)), 1)
    qk_cycles_per_score = np.where(D <= cfg.qk_multipliers, 1, np.ceil(D / cfg.qk_multipliers))
    qk = np.ceil(nk * qk_cycles_per_score / qk_per_cycle)
    sm = np.ceil(nk / cfg.softmax_parallelism)
    pv_per_cycle = np.maximum(cfg.pv_multipliers // D, 1)
    pv_cycles_per_prob = np.where(D <= cfg.pv_multipliers, 1, np.ceil(D / cfg.pv_multipliers))
    pv = np.ceil(nv * pv_cycles_per_prob / pv_per_cycle)

    rng = np.random.default_rng(cfg.seed)
    topk_cfg = cfg.topk()
    topk_v = sample_quickselect_cycles(nk, nv, topk_cfg, rng).astype(np.float64)
    filter_v = filter_pass_cycles(nk, nv, topk_cfg).astype(np.float64)
    tok_k = t["topk"].astype(np.int64)
    tok_n = np.where(tok_k <= nk, nk, L)  # after the last layer the selection is over all tokens
    topk_tok = np.where(t["if_topk"], sample_topk_cycles(tok_n, np.maximum(tok_k, 0), topk_cfg, rng), 0)

    passes = 1 + requant
    muls = nk * D * passes + nv * D
    counts = EnergyCounts(
        dram_bytes=float((q.bytes + k.bytes + lsb.bytes + v.bytes + out.bytes).sum()),
        sram_bytes=float(((k_rows + v_rows) * onchip_row + nk * onchip_row * passes + nv * onchip_row).sum()),
        muls=float(muls.sum()),
        adds=float(muls.sum()),
        softmax_flops=float((nk * (2 + EXP_FLOPS) * passes + nk).sum()),
        compares=float(((topk_v + filter_v + topk_tok) * 2 * cfg.topk_parallelism).sum()),
    )
    return RowWork(
        k_fetch=cyc(q.cycles + k.cycles), lsb_fetch=cyc(lsb.cycles), v_fetch=cyc(v.cycles),
        out_write=cyc(out.cycles), k_sram=np.minimum(k_rows * onchip_row, cfg.key_sram_bytes),
        v_sram=np.minimum(v_rows * onchip_row, cfg.value_sram_bytes), qk=qk, sm=sm, topk_v=topk_v,
        filter_v=filter_v, pv=pv,
        topk_tok=topk_tok.astype(np.float64), requant=requant,
        sm_shared=nk > cfg.softmax_fifo_depth * cfg.softmax_parallelism,
        owner=np.where(reuse, first[gid], np.arange(n)),
        dram_bytes=q.bytes + k.bytes + lsb.bytes + v.bytes + out.bytes, counts=counts, flops=2.0 * muls,
    )

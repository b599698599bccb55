"""Cycle-level (not RTL) model of the SpAtten accelerator pipeline (Section IV, Table I, Fig. 8).

One trace row is one query of one head. Its path through the pipeline (Fig. 8 module numbers):
  (3) Q-K-V fetcher: Q and the kept keys' MSBs from HBM (``dram.py``) through the 32x16 crossbar,
  (6) bit-width converter to the 12-bit on-chip format (``bitwidth_converter_latency``), into the
      196 KB Key SRAM;
  (7) Q x K: 512 multipliers + reconfigurable adder tree, min(512 / D, 8) scores per cycle;
  (8) softmax, parallelism 8, as two pipelined passes: scale + exp + accumulate, then divide by the
      sum (the 128-deep FIFO x 8 lanes holds up to 1024 exponentials between them; longer rows make
      the divide pass share the exp unit);
  (9) progressive quantization: when the row asks for LSBs (``if_requant``) the decision comes after
      the exp pass; the LSBs of K are fetched and Q x K and softmax run again (the first probabilities
      are discarded, modules 10-11 wait);
  (10) local value top-k: ``prune.topk`` quick-select with ``topk_parallelism`` comparators (cycles
      from the reference engine's cycle model, drawn vectorised by ``sample_topk_cycles``); bypassed
      when no value is pruned;
  (11) the kept V rows are fetched (into the 196 KB Value SRAM) and attention_prob x V runs on 512
      multipliers, 512 / D probabilities per cycle; the 12-bit output vector is written back.
The cascade token top-k (``if_topk`` rows: over the surviving tokens, or all ``sentence_length_L``
after the last layer) runs on the second engine, in parallel with the critical path; the next
layer's keys cannot be fetched before the token selection is known. The head top-k (a few cycles
over at most 16 heads, once per layer, on the same engine) and importance accumulation (parallel
adders) are not on the critical path and are not modelled.

Overlap: each unit is a streaming stage (a stage starts when its input starts arriving and cannot
end before its input ends); the DRAM system is one shared resource serving reads in issue order.
The next query's keys are prefetched as soon as the Key SRAM has room (Section V-C: 196 KB =
2 x 1024 x 64 x 12 bits, double buffering; ``prefetch_queries`` deepens it), and a query's value
request is issued after the key requests of the next ``value_issue_lag`` queries, so a value fetch
that waits for its top-k does not block the key stream (the RTL arbitrates key and value requests
round-robin; a fixed order keeps the schedule a max-plus system, see ``simulate_spatten``).
In generation (one row per (iteration, layer, head)) nothing is reused; in summarization
(consecutive rows with the same (iteration, layer, head) are the queries of one prefill) the keys
and values are fetched once and reused when they fit.
With ``layer_barrier`` the next layer starts only when the current one is done (its queries depend on
this layer's output through the FC layers, which are not modelled here).

Stage latencies are our choices (the paper gives none): converter 2, Q x K 8 (multiply + log2(64)
adder levels + register), exp pass 12 (dequantize 2, exp 6, accumulate 4), divide 8, LSB decision 4,
prob x V 5, importance accumulation 4 cycles; DRAM first-data latency 100 cycles.

This module is the pipeline walk (``simulate_spatten``); the parameters are in ``spatten_config.py``
and the timing-independent per-row work in ``spatten_work.py`` (both re-exported here).
"""

from __future__ import annotations

import math

import numpy as np

from dynaprune.hw.energy import EnergyTable
from dynaprune.hw.report import SimResult
from dynaprune.hw.spatten_config import SpAttenConfig
from dynaprune.hw.spatten_work import RowWork, _groups, row_work
from dynaprune.hw.trace import Trace

__all__ = ["RowWork", "SpAttenConfig", "row_work", "simulate_spatten"]


class _Buffer:
    """An on-chip SRAM holding whole fetches in order; a fetch leaves when its last user is done."""

    def __init__(self, capacity: float, sizes: np.ndarray) -> None:
        self.capacity = capacity
        self.sizes = sizes.tolist()
        self.release = [0.0 if z == 0 else math.inf for z in self.sizes]
        self.lo = 0  # oldest fetch that may still occupy the buffer
        self.held = 0.0  # bytes of fetches lo..(last placed)

    def ready_time(self, j: int, known_upto: int) -> float | None:
        """Earliest time fetch j fits, given fetches < j placed; None if it waits on an unknown release."""
        held, lo, t = self.held, self.lo, 0.0
        while held + self.sizes[j] > self.capacity and lo < j:
            if lo > known_upto and self.sizes[lo] > 0:
                return None
            t = max(t, self.release[lo])
            held -= self.sizes[lo]
            lo += 1
        return t

    def place(self, j: int, known_upto: int) -> float:
        t = self.ready_time(j, known_upto)
        assert t is not None, "buffer placement before the releases it needs"
        while self.held + self.sizes[j] > self.capacity and self.lo < j:
            self.held -= self.sizes[self.lo]
            self.lo += 1
        self.held += self.sizes[j]
        return t


def simulate_spatten(trace: Trace, cfg: SpAttenConfig = SpAttenConfig(),
                     energy: EnergyTable = EnergyTable()) -> SimResult:
    """Walk every row through the pipeline; returns cycles, bytes, utilisation and energy.

    Every unit, the DRAM system included, serves its requests in an order fixed by the trace (not by
    timing), and every start time is a max of ready times and every end a sum of durations, so the
    schedule is a max-plus system: shortening any duration (more bandwidth, more comparators, fewer
    bytes) never delays anything. Output writes (12-bit vectors, under 1 % of the bytes of the published
    traces) drain from a write FIFO off the read path: they count in bytes, energy and DRAM busy time,
    and each adds its transfer time to its query's completion.
    """
    w = row_work(trace, cfg)
    n = len(trace)
    lat_in = cfg.dram_latency + cfg.bitwidth_converter_latency
    _, layer_gid = _groups(trace["iteration_id"], trace["layer_id"])
    layer_gid = layer_gid.tolist()
    owner = w.owner.tolist()
    last_user = [i == n - 1 or owner[i + 1] != owner[i] for i in range(n)]

    kf, lf, vf, of = (x.tolist() for x in (w.k_fetch, w.lsb_fetch, w.v_fetch, w.out_write))
    qk, sm, tkv, pv, tkt = (x.tolist() for x in (w.qk, w.sm, w.topk_v, w.pv, w.topk_tok))
    requant, shared = w.requant.tolist(), w.sm_shared.tolist()
    if_topk = trace["if_topk"].tolist()
    filt = w.filter_v.tolist()

    kbuf = _Buffer(cfg.key_sram_bytes, w.k_sram)
    vbuf = _Buffer(cfg.value_sram_bytes, w.v_sram)
    fetched = [False] * n
    k_start, k_end = [0.0] * n, [0.0] * n
    v_start, v_end = [0.0] * n, [0.0] * n
    dram_free = qk_free = sm_free = div_free = topk_free = filter_free = pv_free = tok_free = 0.0
    known = -1  # fetches whose Key SRAM release time is final
    layer_ready = 0.0  # the next layer's keys may be fetched from here on (token top-k, barrier)
    layer_done = 0.0  # when every row of the current layer has finished
    k_release = v_release = 0.0
    finish = 0.0
    busy = {"dram": float(sum(kf) + sum(lf) + sum(vf) + sum(of)), "qk": 0.0, "softmax_exp": 0.0,
            "softmax_div": 0.0, "topk_value": 0.0, "topk_filter": 0.0, "topk_token": 0.0, "pv": 0.0}

    def read(ready: float, duration: float) -> tuple[float, float]:
        nonlocal dram_free
        start = max(ready, dram_free)
        dram_free = start + duration
        return start, dram_free

    def fetch_keys(j: int) -> None:
        k_start[j], k_end[j] = read(max(kbuf.place(j, known), layer_ready), kf[j])
        fetched[j] = True

    def prefetch(r: int) -> None:
        """Issue the keys of the next queries of this layer that the Key SRAM can already hold."""
        j = r + 1
        while j < min(n, r + 1 + cfg.prefetch_queries) and layer_gid[j] == layer_gid[r]:
            if not fetched[j]:
                if kbuf.ready_time(j, known) is None:
                    return
                fetch_keys(j)
            j += 1

    p_first, p_last, v_ready = [0.0] * n, [0.0] * n, [0.0] * n
    pending: list[int] = []  # rows whose value fetch and prob x V are still to be issued

    def back(r: int) -> None:
        """(11) values, prob x V and the output write of row r (issued ``value_issue_lag`` rows late)."""
        nonlocal pv_free, v_release, layer_done, finish
        o = owner[r]
        t = vbuf.place(r, r - 1)
        if vf[r] > 0:
            v_start[r], v_end[r] = read(max(v_ready[r], t), vf[r])
        else:
            v_start[r], v_end[r] = v_start[o], v_end[o]
        p0 = max(pv_free, v_start[r] + lat_in, p_first[r])
        p1 = max(p0 + pv[r], v_end[r] + lat_in, p_last[r])
        pv_free = p1
        busy["pv"] += pv[r]
        v_release = max(v_release, p1)
        if last_user[r]:
            vbuf.release[o] = v_release
            v_release = 0.0
        done = p1 + cfg.pv_latency + of[r]
        layer_done = max(layer_done, done)
        finish = max(finish, done)

    for r in range(n):
        if r > 0 and layer_gid[r] != layer_gid[r - 1]:  # a new layer: finish the previous one
            while pending:
                back(pending.pop(0))
            if cfg.layer_barrier:
                layer_ready = max(layer_ready, layer_done)
            layer_done = 0.0
        if not fetched[r]:
            fetch_keys(r)
        prefetch(r)
        o = owner[r]
        ks, ke = min(k_start[r], k_start[o]), max(k_end[r], k_end[o])
        # (7) Q x K and (8) the exp pass
        q0 = max(qk_free, ks + lat_in)
        q1 = max(q0 + qk[r], ke + lat_in)
        s0 = max(sm_free, q0 + cfg.qk_latency)
        s1 = max(s0 + sm[r], q1 + cfg.qk_latency)
        qk_free, sm_free = q1, s1
        busy["qk"] += qk[r]
        busy["softmax_exp"] += sm[r]
        if requant[r]:  # (9) LSBs needed: fetch them (unless on chip already), recompute
            decide = s1 + cfg.softmax_exp_latency + cfg.requant_decision_latency
            ls, le = read(decide, lf[r]) if lf[r] > 0 else (decide - lat_in, decide - lat_in)
            q0 = max(qk_free, ls + lat_in)
            q1 = max(q0 + qk[r], le + lat_in)
            s0 = max(sm_free, q0 + cfg.qk_latency)
            s1 = max(s0 + sm[r], q1 + cfg.qk_latency)
            qk_free, sm_free = q1, s1
            busy["qk"] += qk[r]
            busy["softmax_exp"] += sm[r]
        d0 = max(div_free, s1 + cfg.softmax_exp_latency)
        d1 = d0 + sm[r]
        div_free = d1
        if shared[r]:
            sm_free = max(sm_free, d1)
        busy["softmax_div"] += sm[r]
        k_release = max(k_release, q1)
        if last_user[r]:
            kbuf.release[o] = k_release
            k_release = 0.0
            known = r
        # cascade token top-k on the second engine, once this layer's importance is complete
        if if_topk[r]:
            t0 = max(tok_free, d1 + cfg.softmax_div_latency + cfg.importance_latency)
            tok_free = t0 + tkt[r]
            layer_ready = max(layer_ready, tok_free)
            busy["topk_token"] += tkt[r]
            finish = max(finish, tok_free)
        # (10) local value top-k: quick-select, then the filter pass (its own stage, Fig. 9)
        if tkv[r] > 0:
            topk_free = max(topk_free, d1 + cfg.softmax_div_latency) + tkv[r]
            f0 = max(filter_free, topk_free)
            filter_free = f0 + filt[r]
            busy["topk_value"] += tkv[r]
            busy["topk_filter"] += filt[r]
            p_first[r], p_last[r] = f0 + cfg.topk_filter_latency, filter_free
            v_ready[r] = p_first[r]  # value addresses stream out of the filter pass
        else:
            p_first[r], p_last[r] = d0 + cfg.softmax_div_latency, d1 + cfg.softmax_div_latency
            v_ready[r] = ks  # the kept tokens are known up front
        prefetch(r)  # this head's keys may have left the SRAM: more of the next ones fit
        pending.append(r)
        if len(pending) > cfg.value_issue_lag:
            back(pending.pop(0))
    while pending:
        back(pending.pop(0))

    return SimResult.build(
        arch="spatten", trace=trace, cycles=max(finish, dram_free), clock_ghz=cfg.clock_ghz,
        dram_bytes=float(w.dram_bytes.sum()), flops=float(w.flops.sum()), peak_gflops=cfg.peak_gflops,
        peak_gbps=cfg.dram().peak_gbps, busy=busy, multipliers=cfg.multipliers,
        counts=w.counts, config=cfg, energy=energy,
    )

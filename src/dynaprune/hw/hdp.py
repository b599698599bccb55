"""Performance model of the Hybrid Dynamic Pruning co-processor (HDP, arXiv 2407.12893, Sec. IV).

The HDP pipeline for one head (the summary's critical path): integer Q_I x K_I^T on the PE array ->
sparsity engine (early head decision from sum |S_I|, row-balanced 2x2 block decisions) -> fetch
upon mask (FUM) of the fraction parts of the kept blocks -> fraction products Q_I K_F^T and
Q_F K_I^T on the PE array (the F x F term is dropped; near-zero products skipped) -> adders
(S = S_I + both fraction terms) -> softmax -> attention_prob x V.

Our reading of the architecture (the summary gives the blocks, not their sizes; every size below
is a stated default and a ``--param``):
  * PE array: ``pe_rows x pe_cols`` processing elements, output-stationary: each PE owns one output
    of a tile (one score, or one output element of prob x V) and accumulates over the reduction
    dimension, one multiply-accumulate per cycle, so a tile costs its reduction length in cycles;
    tiles stream back to back and the array's fill/drain (rows + cols - 2 cycles) is paid once per
    head.
  * Bit-split PEs: a PE multiplies ``pe_bits``-wide operands (default: the wider of the integer and
    fraction parts). A full-precision product is four partial products (I x I, I x F, F x I, F x F).
    HDP computes I x I for every head and block, then I x F and F x I only for the kept blocks of
    kept heads; row-balanced block pruning keeps the same number of blocks in every block row, so
    kept blocks pack into dense tiles. prob x V runs at ``pv_passes`` partial products per MAC on
    the kept probabilities.
  * The dense baseline is the same datapath with pruning off: I x I, I x F and F x I for every score
    (F x F is the datapath's approximation, dropped in both), prob x V over every probability, every
    fraction part fetched, no sparsity engine; a head whose decisions prune nothing costs exactly the
    baseline (1.00x). (Until issue 12 the baseline paid all four partial products: 1.07x for such a head.)
  * Sparsity engine, adders and softmax are separate units that overlap the PE array; a head takes
    the longest of (PE array, sparsity engine, adders, softmax, DRAM) plus the array fill/drain.
  * DRAM: the integer parts of Q and K are fetched for every head (the head decision needs them);
    fraction parts, V rows and outputs only for kept heads, and only the K_F/V rows of keys that
    keep at least one block (expected over independent blocks). Same HBM model as SpAtten.

Trace mapping (the SpAtten schema carries HDP's decisions this way): consecutive rows with the same
(iteration, layer, head) are one head's queries (Lq) over ``sentence_length_L`` keys; a query's kept
fraction of blocks is ``key_fetch_num / sentence_length_L``; a head missing from an (iteration,
layer) that other layers have was pruned early (it still costs its integer pass);
``quant_key_bit`` / ``auto_requant_incre`` are the integer / fraction bits when not -1.
``value_fetch_num`` is not used (HDP has no local value pruning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from dynaprune.errors import DynapruneError
from dynaprune.hw.dram import DramConfig, row_bytes, transfer
from dynaprune.hw.energy import EXP_FLOPS, EnergyCounts, EnergyTable
from dynaprune.hw.report import SimResult
from dynaprune.hw.trace import Trace


@dataclass(frozen=True)
class HdpConfig:
    """HDP co-processor knobs (our stated defaults; see the module docstring)."""

    clock_ghz: float = 1.0
    pe_rows: int = 16
    pe_cols: int = 16
    pe_bits: int = 0  # 0: max(int_bits, frac_bits)
    int_bits: int = 4  # used where the trace says -1
    frac_bits: int = 4
    block_size: int = 2
    near_zero_fraction: float = 0.0  # share of kept fraction products skipped by near-zero pruning
    sparsity_engine_blocks_per_cycle: int = 16
    adder_lanes: int = 32
    softmax_parallelism: int = 8
    pv_passes: int = 4
    prob_bits: int = 8
    hbm_channels: int = 16
    channel_gbps: float = 32.0
    transaction_bytes: int = 32
    dram_stream_efficiency: float = 0.95
    dram_gather_efficiency: float = 0.8
    dram_latency: int = 100

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise DynapruneError(f"hdp parameter {f.name} must be finite, got {v}")
            if v < 0:
                raise DynapruneError(f"hdp parameter {f.name} must be >= 0, got {v}")
        for name in ("clock_ghz", "pe_rows", "pe_cols", "int_bits", "frac_bits", "block_size",
                     "sparsity_engine_blocks_per_cycle", "adder_lanes", "softmax_parallelism", "pv_passes",
                     "prob_bits", "hbm_channels", "channel_gbps", "transaction_bytes"):
            if getattr(self, name) <= 0:
                raise DynapruneError(f"hdp parameter {name} must be > 0, got {getattr(self, name)}")
        if self.near_zero_fraction >= 1:
            raise DynapruneError("near_zero_fraction must be in [0, 1)")
        self.dram()

    def dram(self) -> DramConfig:
        return DramConfig(channels=self.hbm_channels, channel_gbps=self.channel_gbps,
                          transaction_bytes=self.transaction_bytes, clock_ghz=self.clock_ghz,
                          stream_efficiency=self.dram_stream_efficiency,
                          gather_efficiency=self.dram_gather_efficiency, latency_cycles=self.dram_latency)

    @property
    def pes(self) -> int:
        return self.pe_rows * self.pe_cols

    @property
    def peak_gflops(self) -> float:
        """Partial-product MACs per cycle x 2 (multiply + add)."""
        return 2.0 * self.pes * self.clock_ghz


@dataclass(frozen=True)
class HeadWork:
    """One head (pruned or kept) and what it costs, as arrays over heads."""

    cycles: np.ndarray
    dense_cycles: np.ndarray
    dram_bytes: np.ndarray
    dense_dram_bytes: np.ndarray
    pe_busy: np.ndarray
    macs: np.ndarray  # partial-product multiply-accumulates executed
    density: np.ndarray
    kept: np.ndarray


def _heads(trace: Trace) -> dict[str, np.ndarray]:
    """Collapse rows into heads (plus early-pruned heads that the trace leaves out)."""
    it, layer, head = trace["iteration_id"], trace["layer_id"], trace["head_id"]
    change = np.ones(len(trace), dtype=bool)
    change[1:] = (it[1:] != it[:-1]) | (layer[1:] != layer[:-1]) | (head[1:] != head[:-1])
    first = np.nonzero(change)[0]
    lq = np.diff(np.append(first, len(trace)))
    density = np.add.reduceat(trace["key_fetch_num"] / trace["sentence_length_L"], first) / lq
    out = {
        "iteration": it[first], "layer": layer[first], "lq": lq, "lk": trace["sentence_length_L"][first],
        "d": trace["embedding_length_D"][first], "density": density, "kept": np.ones(len(first), dtype=bool),
        "ibits": trace["quant_key_bit"][first], "fbits": trace["auto_requant_incre"][first],
    }
    # heads absent from an (iteration, layer) were pruned early: add them with that layer's shape
    n_heads = int(head.max()) + 1
    lay_change = np.ones(len(first), dtype=bool)
    lay_change[1:] = (out["iteration"][1:] != out["iteration"][:-1]) | (out["layer"][1:] != out["layer"][:-1])
    lay_first = np.nonzero(lay_change)[0]
    present = np.diff(np.append(lay_first, len(first)))
    missing = n_heads - present
    if missing.any():
        rep = np.repeat(lay_first, missing)
        for k, v in list(out.items()):
            add = v[rep].copy()
            if k == "kept":
                add[:] = False
            if k == "density":
                add[:] = 0.0
            out[k] = np.concatenate([v, add])
    return out


@dataclass(frozen=True)
class _Datapath:
    """One pass of the co-processor over every head: unit cycles, bytes and work, as arrays over heads."""

    pe: np.ndarray
    engine: np.ndarray
    adders: np.ndarray
    softmax: np.ndarray
    dram_cycles: np.ndarray
    dram_bytes: np.ndarray
    macs: np.ndarray
    keys_used: np.ndarray
    kept_scores: np.ndarray
    blocks: np.ndarray

    def cycles(self, fill: int) -> np.ndarray:
        return np.maximum.reduce([self.pe, self.engine, self.adders, self.softmax, self.dram_cycles]) + fill


def _datapath(cfg: HdpConfig, lq: np.ndarray, lk: np.ndarray, d: np.ndarray, ib: np.ndarray, fb: np.ndarray,
              dens: np.ndarray, kept: np.ndarray, pruning: bool) -> _Datapath:
    """The co-processor's work for the given decisions. ``pruning=False`` is the same datapath with its
    pruning switched off (every block of every head kept, no near-zero skipping, no sparsity engine):
    the dense baseline, so a head whose decisions prune nothing costs exactly what the baseline does."""
    if not pruning:
        dens, kept = np.ones_like(dens), np.ones_like(kept)
    dram = cfg.dram()
    b = cfg.block_size
    tiles = np.ceil(lq / cfg.pe_rows) * np.ceil(lk / cfg.pe_cols)
    frac_share = (1 - cfg.near_zero_fraction) if pruning else 1.0
    # PE array (output stationary: a tile costs its reduction length); an operand wider than the PE
    # takes ceil(bits / pe_bits) slices, a partial product one pass per pair of slices. F x F is never
    # computed (HDP's approximation belongs to the datapath, not to its pruning)
    pe_b = cfg.pe_bits if cfg.pe_bits else np.maximum(ib, fb)
    si, sf = np.ceil(ib / pe_b), np.ceil(fb / pe_b)
    pe_int = tiles * d * si * si
    pe_frac = np.where(kept, 2 * np.ceil(dens * tiles) * d * frac_share * si * sf, 0)
    pv_tiles = np.ceil(lq / cfg.pe_rows) * np.ceil(d / cfg.pe_cols)
    pe_pv = np.where(kept, cfg.pv_passes * pv_tiles * np.ceil(dens * lk), 0)
    # sparsity engine over the 2x2 blocks (only when pruning), adders (S_I + two fraction terms) and
    # softmax over the kept scores
    blocks = np.ceil(lq / b) * np.ceil(lk / b)
    engine = np.ceil(blocks / cfg.sparsity_engine_blocks_per_cycle) if pruning else np.zeros_like(blocks)
    kept_scores = np.where(kept, dens * lq * lk, 0)
    adders = np.ceil(2 * kept_scores / cfg.adder_lanes)
    softmax = np.ceil(2 * kept_scores / cfg.softmax_parallelism)
    # DRAM: integer parts always; fractions, V, outputs for kept heads (FUM: keys keeping a block)
    keys_used = np.where(kept, lk * (1 - (1 - dens) ** np.maximum(lq / b, 1)), 0)
    keys_used = np.minimum(lk, keys_used)
    vbits = ib + fb
    moves = [transfer(row_bytes(d, ib), lq, lq, dram), transfer(row_bytes(d, ib), lk, lk, dram),
             transfer(row_bytes(d, fb), np.where(kept, lq, 0), lq, dram),
             transfer(row_bytes(d, fb), keys_used, lk, dram), transfer(row_bytes(d, vbits), keys_used, lk, dram),
             transfer(row_bytes(d, vbits), np.where(kept, lq, 0), lq, dram)]
    macs = (lq * lk * d + np.where(kept, 2 * dens * lq * lk * d * frac_share, 0)
            + np.where(kept, cfg.pv_passes * dens * lq * lk * d, 0))
    return _Datapath(pe=pe_int + pe_frac + pe_pv, engine=engine, adders=adders, softmax=softmax,
                     dram_cycles=sum(m.cycles for m in moves), dram_bytes=sum(m.bytes for m in moves), macs=macs,
                     keys_used=keys_used, kept_scores=kept_scores, blocks=blocks)


def head_work(trace: Trace, cfg: HdpConfig) -> tuple[HeadWork, EnergyCounts]:
    """Cycles, bytes and operations of every head, HDP and dense (the same datapath, pruning off)."""
    h = _heads(trace)
    lq, lk, d = (h[k].astype(np.int64) for k in ("lq", "lk", "d"))
    ib = np.where(h["ibits"] > 0, h["ibits"], cfg.int_bits).astype(np.int64)
    fb = np.where(h["fbits"] > 0, h["fbits"], cfg.frac_bits).astype(np.int64)
    dens = np.clip(h["density"], 0.0, 1.0)
    kept = h["kept"]
    fill = cfg.pe_rows + cfg.pe_cols - 2
    hdp = _datapath(cfg, lq, lk, d, ib, fb, dens, kept, pruning=True)
    dense = _datapath(cfg, lq, lk, d, ib, fb, dens, kept, pruning=False)
    onchip = row_bytes(d, ib + fb)
    pe_b = cfg.pe_bits if cfg.pe_bits else np.maximum(ib, fb)
    mul_scale = (float(np.max(pe_b)) / 12) ** 2  # the table's multiply is 12-bit; energy ~ width^2
    counts = EnergyCounts(
        dram_bytes=float(hdp.dram_bytes.sum()),
        sram_bytes=float(((lq + lk + hdp.keys_used) * onchip * 2).sum()),
        muls=float(hdp.macs.sum()) * mul_scale, adds=float(hdp.macs.sum() + (2 * hdp.kept_scores).sum()),
        softmax_flops=float(((2 + EXP_FLOPS) * hdp.kept_scores + hdp.kept_scores).sum()),
        compares=float((hdp.blocks * 2).sum()),
    )
    work = HeadWork(cycles=hdp.cycles(fill), dense_cycles=dense.cycles(fill), dram_bytes=hdp.dram_bytes,
                    dense_dram_bytes=dense.dram_bytes, pe_busy=hdp.pe, macs=hdp.macs, density=dens, kept=kept)
    return work, counts


def simulate_hdp(trace: Trace, cfg: HdpConfig = HdpConfig(), energy: EnergyTable = EnergyTable()) -> SimResult:
    """HDP cycles, bytes and energy for a trace, with the speed-up over the same co-processor dense."""
    w, counts = head_work(trace, cfg)
    cycles = float(w.cycles.sum()) + cfg.dram_latency
    dense = float(w.dense_cycles.sum()) + cfg.dram_latency
    kept_scores = float((w.density * w.kept).mean())
    return SimResult.build(
        arch="hdp", trace=trace, cycles=cycles, clock_ghz=cfg.clock_ghz, dram_bytes=float(w.dram_bytes.sum()),
        flops=2.0 * float(w.macs.sum()), peak_gflops=cfg.peak_gflops, peak_gbps=cfg.dram().peak_gbps,
        busy={"pe_array": float(w.pe_busy.sum())}, multipliers=cfg.pes, counts=counts, config=cfg, energy=energy,
        extra={
            "dense_cycles": int(math.ceil(dense)), "speedup_vs_dense": dense / cycles,
            "dense_dram_bytes": float(w.dense_dram_bytes.sum()),
            "heads": int(len(w.kept)), "heads_pruned": int((~w.kept).sum()),
            "kept_score_fraction": kept_scores,
        },
    )

"""SpAtten's parameters (``SpAttenConfig``): Table I's units and memory, the stage latencies we chose
(the paper gives none; listed in ``hw/spatten.py``'s docstring) and how traces are read; it validates
them and derives the DRAM and top-k engine configurations the pipeline model uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from dynaprune.errors import DynapruneError
from dynaprune.hw.dram import DramConfig
from dynaprune.prune.topk import TopkEngineConfig


@dataclass(frozen=True)
class SpAttenConfig:
    """SpAtten's parameters (Table I), plus the stage latencies and trace-reading choices we state."""

    clock_ghz: float = 1.0
    # HBM2: 16 x 128-bit channels @ 2 GHz, 32 GB/s each (Table I)
    hbm_channels: int = 16
    channel_gbps: float = 32.0
    transaction_bytes: int = 32
    dram_stream_efficiency: float = 0.95
    dram_gather_efficiency: float = 0.8
    dram_latency: int = 100
    # Q-K-V fetcher (32x16 crossbar, conflict-free) and bit-width converter
    onchip_bits: int = 12
    bitwidth_converter_latency: int = 2
    # Q x K: 196 KB Key SRAM, 512 x 12-bit multipliers, adder tree <= 8 outputs per cycle
    key_sram_bytes: int = 196_608
    qk_multipliers: int = 512
    adder_tree_outputs: int = 8
    qk_latency: int = 8
    # softmax: FIFO depth 128, parallelism 8
    softmax_parallelism: int = 8
    softmax_fifo_depth: int = 128
    softmax_exp_latency: int = 12
    softmax_div_latency: int = 8
    requant_decision_latency: int = 4
    # top-k engines: 16 comparators per array
    topk_parallelism: int = 16
    topk_round_latency: int = 3
    topk_filter_latency: int = 3
    importance_latency: int = 4
    # attention_prob x V: 196 KB Value SRAM, 512 x 12-bit multipliers
    value_sram_bytes: int = 196_608
    pv_multipliers: int = 512
    pv_latency: int = 5
    # keys of this many next queries are fetched ahead when the Key SRAM holds them (1: double
    # buffering); a query's values are requested after the keys of this many later queries
    prefetch_queries: int = 1
    value_issue_lag: int = 4
    # reading traces: bits fetched for a -1 ("not quantized") column; layer barrier; top-k pivot seed
    unquantized_bits: int = 12
    layer_barrier: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise DynapruneError(f"spatten parameter {f.name} must be finite, got {v}")
            if v < 0:
                raise DynapruneError(f"spatten parameter {f.name} must be >= 0, got {v}")
        for name in ("clock_ghz", "hbm_channels", "channel_gbps", "transaction_bytes", "qk_multipliers",
                     "adder_tree_outputs", "softmax_parallelism", "softmax_fifo_depth", "topk_parallelism",
                     "pv_multipliers", "onchip_bits", "unquantized_bits", "key_sram_bytes", "value_sram_bytes"):
            if getattr(self, name) <= 0:
                raise DynapruneError(f"spatten parameter {name} must be > 0, got {getattr(self, name)}")
        if self.unquantized_bits > 32:
            raise DynapruneError("unquantized_bits must be <= 32")
        self.dram()  # validates the DRAM efficiencies

    def dram(self) -> DramConfig:
        return DramConfig(channels=self.hbm_channels, channel_gbps=self.channel_gbps,
                          transaction_bytes=self.transaction_bytes, clock_ghz=self.clock_ghz,
                          stream_efficiency=self.dram_stream_efficiency,
                          gather_efficiency=self.dram_gather_efficiency, latency_cycles=self.dram_latency)

    def topk(self) -> TopkEngineConfig:
        return TopkEngineConfig(self.topk_parallelism, self.topk_round_latency, self.topk_filter_latency)

    @property
    def multipliers(self) -> int:
        return self.qk_multipliers + self.pv_multipliers

    @property
    def peak_gflops(self) -> float:
        """Compute roof: every multiplier does a multiply and an add per cycle (Section V-C: 2 TFLOP/s)."""
        return 2.0 * self.multipliers * self.clock_ghz

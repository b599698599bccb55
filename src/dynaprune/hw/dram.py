"""HBM2 model: channel-interleaved bandwidth, 32-byte transactions, gathered-row inefficiency.

SpAtten Section IV-D and Table I: 16 HBM2 channels of 128 bits at 2 GHz (32 GB/s each, 512 GB/s in
all); Q, K and V are interleaved across the channels and a 32x16 crossbar routes every gathered row
request to its channel, at most one request per channel per cycle, so no channel conflicts.

Simplifications (this stands in for the paper's Ramulator):
  * Perfect interleaving: a transfer's transactions spread evenly over the channels (the crossbar and
    its 64-deep FIFOs absorb short-term imbalance), so a transfer of T transactions occupies the
    whole memory system for ``T * transaction_bytes / bytes_per_cycle`` cycles at peak.
  * Granularity: a matrix is stored row after row (MSBs and LSBs in separate arrays, Section III-D),
    rows of ``row_bytes`` packed back to back; a fetch moves whole 32-byte transactions. Fetching a
    subset of rows costs the expected number of distinct 32-byte blocks the kept rows touch, with the
    kept rows spread uniformly at random over the matrix (token pruning keeps scattered tokens).
  * Random access: every kept row whose predecessor was not fetched starts a new burst (a new DRAM
    row access and request); its transactions run at ``gather_efficiency`` of the streaming rate,
    the stand-in for row-buffer misses and command overhead that bank parallelism does not hide.
  * Streams (dense fetches, runs of consecutive rows) reach ``stream_efficiency`` of peak (refresh,
    read/write turnarounds). Reads and writes share the same bandwidth.
  * A request's first data arrives ``latency_cycles`` after it is issued (pipeline fill only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class DramConfig:
    """HBM2 knobs; defaults are Table I (16 x 32 GB/s) plus our stated efficiency/latency choices."""

    channels: int = 16
    channel_gbps: float = 32.0
    transaction_bytes: int = 32
    clock_ghz: float = 1.0  # the accelerator clock that counts the cycles
    stream_efficiency: float = 0.95
    gather_efficiency: float = 0.8
    latency_cycles: int = 100

    def __post_init__(self) -> None:
        if self.channels < 1 or self.channel_gbps <= 0 or self.transaction_bytes < 1 or self.clock_ghz <= 0:
            raise DynapruneError("DRAM channels, bandwidth, transaction size and clock must be positive")
        for name in ("stream_efficiency", "gather_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise DynapruneError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.latency_cycles < 0:
            raise DynapruneError("DRAM latency must be >= 0")

    @property
    def peak_gbps(self) -> float:
        return self.channels * self.channel_gbps

    @property
    def bytes_per_cycle(self) -> float:
        """Peak bytes per accelerator cycle over all channels (512 at 1 GHz)."""
        return self.peak_gbps / self.clock_ghz


@lru_cache(maxsize=256)
def _block_overlaps(row_bytes: int, tx: int) -> tuple[int, tuple[int, ...]]:
    """(rows per period, rows overlapping each tx-block of one period) for rows packed back to back."""
    period = row_bytes * tx // math.gcd(row_bytes, tx)  # lcm: the layout repeats after this many bytes
    rows = period // row_bytes
    counts = []
    for b in range(period // tx):
        lo, hi = b * tx, (b + 1) * tx
        first, last = lo // row_bytes, (hi - 1) // row_bytes
        counts.append(last - first + 1)
    return rows, tuple(counts)


def expected_transactions(row_bytes: np.ndarray, n_rows: np.ndarray, n_total: np.ndarray, tx: int) -> np.ndarray:
    """Expected tx-byte transactions to fetch ``n_rows`` of ``n_total`` packed rows of ``row_bytes``.

    Kept rows are a uniformly random subset; a block overlapped by m rows is fetched unless all m
    are pruned: sum over blocks of 1 - (1 - f)^m, f = n_rows / n_total. A full fetch is exact
    (ceil(total bytes / tx)).
    """
    row_bytes = np.asarray(row_bytes, dtype=np.int64)
    n_rows = np.asarray(n_rows, dtype=np.float64)
    n_total = np.asarray(n_total, dtype=np.float64)
    row_bytes, n_rows, n_total = np.broadcast_arrays(row_bytes, n_rows, n_total)
    out = np.zeros(row_bytes.shape, dtype=np.float64)
    f = np.divide(n_rows, n_total, out=np.zeros_like(n_rows), where=n_total > 0)
    full = n_rows >= n_total
    out[full] = np.ceil(n_total[full] * row_bytes[full] / tx)
    part = ~full & (n_rows > 0)
    for b in np.unique(row_bytes[part]):
        sel = part & (row_bytes == b)
        if b <= 0:
            continue
        rows, counts = _block_overlaps(int(b), tx)
        fs = f[sel][:, None]
        per_period = (1 - (1 - fs) ** np.asarray(counts)[None, :]).sum(axis=1)
        out[sel] = per_period * n_total[sel] / rows
    return out


def expected_bursts(n_rows: np.ndarray, n_total: np.ndarray) -> np.ndarray:
    """Expected kept rows whose predecessor was not kept (each starts a new burst); 1 for a full fetch."""
    n_rows = np.asarray(n_rows, dtype=np.float64)
    n_total = np.asarray(n_total, dtype=np.float64)
    f = np.divide(n_rows, n_total, out=np.zeros_like(n_rows), where=n_total > 0)
    return np.where(n_rows <= 0, 0.0, np.maximum(1.0, n_rows * (1 - f)))


@dataclass(frozen=True)
class Transfer:
    """Cost of fetching (or writing) a set of rows: bytes on the bus and cycles of the memory system."""

    bytes: np.ndarray  # transactions * transaction_bytes
    cycles: np.ndarray


def transfer(row_bytes: np.ndarray, n_rows: np.ndarray, n_total: np.ndarray, cfg: DramConfig) -> Transfer:
    """Bytes and memory-system cycles to move ``n_rows`` of ``n_total`` rows of ``row_bytes`` each."""
    tx = expected_transactions(row_bytes, n_rows, n_total, cfg.transaction_bytes)
    n_rows = np.asarray(n_rows, dtype=np.float64)
    bursts = expected_bursts(n_rows, n_total)
    # transactions of burst-starting rows run at the gathered rate, the rest stream
    frac_gather = np.divide(bursts, n_rows, out=np.zeros_like(bursts), where=n_rows > 0)
    frac_gather = np.where(np.asarray(n_rows) >= np.asarray(n_total), 0.0, frac_gather)
    stream_tx = tx * (1 - frac_gather)
    gather_tx = tx * frac_gather
    byte_time = cfg.transaction_bytes / cfg.bytes_per_cycle / cfg.stream_efficiency
    cycles = (stream_tx + gather_tx / cfg.gather_efficiency) * byte_time
    return Transfer(tx * cfg.transaction_bytes, cycles)


def row_bytes(dim: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Bytes of one stored row of ``dim`` elements at ``bits`` each (rows are byte aligned)."""
    return np.ceil(np.asarray(dim) * np.asarray(bits) / 8).astype(np.int64)

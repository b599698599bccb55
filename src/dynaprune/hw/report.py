"""What a simulation reports: cycles, seconds, DRAM bytes, GFLOP/s, utilisation, energy (JSON-ready)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from dynaprune.hw.energy import EnergyCounts, EnergyTable, energy_breakdown


@dataclass(frozen=True)
class SimResult:
    """One simulated trace. ``flops`` counts executed multiplies and adds (recomputation included)."""

    arch: str
    rows: int
    cycles: int
    seconds: float
    dram_bytes: float
    flops: float
    gflops: float
    intensity: float  # flops per DRAM byte (the roofline's x axis)
    peak_gflops: float
    peak_gbps: float
    achieved_gbps: float
    utilisation: dict[str, float]
    energy_j: dict[str, float]
    counts: dict[str, float]
    config: dict[str, Any]
    trace: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, *, arch: str, trace: Any, cycles: float, clock_ghz: float, dram_bytes: float, flops: float,
              peak_gflops: float, peak_gbps: float, busy: dict[str, float], multipliers: int,
              counts: EnergyCounts, config: Any, energy: EnergyTable = EnergyTable(),
              extra: dict[str, Any] | None = None) -> SimResult:
        cycles_i = max(1, int(-(-cycles // 1)))
        seconds = cycles_i / (clock_ghz * 1e9)
        util = {"multipliers": flops / (2.0 * multipliers * cycles_i),
                "dram_bandwidth": dram_bytes / (peak_gbps / clock_ghz * cycles_i)}
        util.update({f"{k}_busy": v / cycles_i for k, v in busy.items()})
        return cls(
            arch=arch, rows=len(trace), cycles=cycles_i, seconds=seconds, dram_bytes=dram_bytes, flops=flops,
            gflops=flops / seconds / 1e9, intensity=flops / dram_bytes if dram_bytes else float("inf"),
            peak_gflops=peak_gflops, peak_gbps=peak_gbps, achieved_gbps=dram_bytes / seconds / 1e9,
            utilisation=util, energy_j=energy_breakdown(counts, energy), counts=asdict(counts),
            config=asdict(config) if is_dataclass(config) else dict(config),
            trace={"source": getattr(trace, "source", None), "config": getattr(trace, "config", None)},
            extra=extra or {},
        )

    @property
    def gop_per_joule(self) -> float:
        return self.flops / 1e9 / self.energy_j["total"] if self.energy_j["total"] else float("inf")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["gop_per_joule"] = self.gop_per_joule
        return out

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as printed by the CLI."""
        e = self.energy_j
        return {
            "rows": self.rows, "cycles": self.cycles, "seconds @ clock": self.seconds,
            "DRAM MB": self.dram_bytes / 1e6, "GFLOP/s": self.gflops, "ops/byte": self.intensity,
            "DRAM GB/s": self.achieved_gbps,
            **{f"util {k}": v for k, v in self.utilisation.items()},
            "energy mJ": e["total"] * 1e3,
            **{f"energy {k} %": 100 * v / e["total"] for k, v in e.items() if k != "total" and e["total"]},
            "GOP/J": self.gop_per_joule,
        }

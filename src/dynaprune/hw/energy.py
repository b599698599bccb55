"""Energy estimate: per-operation constants (one table, with sources) times the counted operations.

Dynamic energy only: no leakage, clock tree or control logic, so it is a lower bound next to the
paper's measured 8.30 W (SpAtten, 40 nm). The paper's observation that DRAM access is about 70 % of
SpAtten's power (Section III-D) is the sanity check the breakdown should reproduce for GPT-2.

Operations counted by the simulators (``EnergyCounts``): DRAM bytes moved (read + write), on-chip SRAM
bytes read or written, fixed-point multiplies and adds (12-bit datapath), softmax floating-point
operations (scale, exp, accumulate, divide; exp counted as ``EXP_FLOPS`` operations) and top-k
comparisons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXP_FLOPS = 4  # an exponential unit ~ a few multiply-adds (range reduction + short polynomial)


@dataclass(frozen=True)
class EnergyTable:
    """Picojoules per operation. Sources in ``SOURCES``; override any field with --param energy.X=..."""

    dram_pj_per_byte: float = 31.2
    sram_pj_per_byte: float = 2.5
    mul_pj: float = 0.45
    add_pj: float = 0.045
    softmax_flop_pj: float = 2.3
    compare_pj: float = 0.045


SOURCES: dict[str, str] = {
    "dram_pj_per_byte": "HBM2 ~3.9 pJ/bit incl. I/O (O'Connor et al., 'Fine-Grained DRAM', MICRO 2017) x 8",
    "sram_pj_per_byte": "32 KB SRAM bank, 64-bit read ~20 pJ at 45 nm (Horowitz, ISSCC 2014) / 8 bytes; "
                        "the 196 KB buffers are banked",
    "mul_pj": "8-bit int multiply 0.2 pJ at 45 nm (Horowitz 2014), scaled by (12/8)^2 for the 12-bit datapath",
    "add_pj": "8-bit int add 0.03 pJ at 45 nm (Horowitz 2014), scaled by 12/8",
    "softmax_flop_pj": "mean of fp32 add 0.9 pJ and fp32 multiply 3.7 pJ at 45 nm (Horowitz 2014)",
    "compare_pj": "a 12-bit comparator ~ a 12-bit adder (Horowitz 2014 scaled)",
}


@dataclass
class EnergyCounts:
    """Operation counts a simulation accumulates."""

    dram_bytes: float = 0.0
    sram_bytes: float = 0.0
    muls: float = 0.0
    adds: float = 0.0
    softmax_flops: float = 0.0
    compares: float = 0.0

    def __add__(self, other: EnergyCounts) -> EnergyCounts:
        return EnergyCounts(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})


def energy_breakdown(counts: EnergyCounts, table: EnergyTable = EnergyTable()) -> dict[str, float]:
    """Joules per category and in total."""
    parts = {
        "dram": counts.dram_bytes * table.dram_pj_per_byte,
        "sram": counts.sram_bytes * table.sram_pj_per_byte,
        "multiply": counts.muls * table.mul_pj,
        "add": counts.adds * table.add_pj,
        "softmax": counts.softmax_flops * table.softmax_flop_pj,
        "topk": counts.compares * table.compare_pj,
    }
    out = {k: v * 1e-12 for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def constants_table(table: EnergyTable = EnergyTable()) -> list[dict[str, object]]:
    """The constants with their sources, for reports."""
    return [{"name": k, "pJ": v, "source": SOURCES[k]} for k, v in asdict(table).items()]

"""Reproduce SpAtten's Fig. 19 (left, right), Fig. 20, the DRAM reductions and Fig. 18 from the published traces.

Traces (read from ../shared/data/spatten-workloads, never copied):
  GPT-2 small, WikiText-2: ``...-per8-step1+dedic`` (dedicated datapath, nothing pruned, not
  quantized) and ``...-per8`` (token + local value pruning, 6-bit progressive quantization);
  GPT-2 medium: ``...-wikitext2-per0-hp-step5+...`` (token + local value + head pruning, 12/8-bit
  static quantization) and ``...-ptb-per0`` (nothing pruned, PTB: same shapes).
Fig. 20's steps are built from the same workload (``dynaprune.hw.variants``): (1) the dedicated
datapath on the unpruned workload; (2) + cascade pruning (the pruned trace, no quantization) with a
parallelism-1 top-k engine; (3) + the 16-comparator engine; (4) + progressive quantization (the
trace as published). A "-1" (not quantized) bit width is fetched at ``unquantized_bits``: 12 (the
datapath width, our default) and 32 (fp32, the reading under which the paper's 5.1x quantization
saving is 32 / 6.3 bits) are both reported.

Writes benchmarks/results/hw/hw_spatten_repro.json and hw_fig19.png, hw_fig20.png, hw_roofline.png.

    python -m benchmarks.hw_spatten_repro
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from benchmarks.common import RESULTS, save
from dynaprune.hw.energy import constants_table
from dynaprune.hw.roofline import roofline_png
from dynaprune.hw.spatten import SpAttenConfig, row_work, simulate_spatten
from dynaprune.hw.trace import Trace, read_trace
from dynaprune.hw.variants import unpruned, unquantized, without_value_pruning
from dynaprune.paths import shared_data_dir

PAPER = {
    "fig19_saturates_at": 16, "fig19_speedup_p16_over_p1": 3.0,
    "fig20_step_ratios": {"+cascade pruning (top-k P=1)": 1.1, "+parallel top-k": 3.0,
                          "+progressive quantization": 2.8},
    "dram_reduction": {"token_pruning": 3.8, "head_pruning": 1.1, "progressive_quantization": 5.1, "overall": 10.0},
    "roofline_gpt2_tflops": 0.43, "bandwidth_roof_gbps": 512, "compute_roof_tflops": 2.0,
    "dram_energy_share": 0.70,
}
PARALLELISM = [1, 2, 4, 8, 16, 32, 64]
SRAM_KB = [96, 196, 392, 784]


def load() -> dict[str, Trace]:
    w = shared_data_dir() / "spatten-workloads"
    return {
        "gpt2-small": read_trace(w / "summary-gpt2-small-wikitext2-per8.csv"),
        "gpt2-small-dense": read_trace(w / "summary-gpt2-small-wikitext2-per8-step1+dedic.csv"),
        "gpt2-medium": read_trace(
            w / "summary-gpt2-medium-wikitext2-per0-hp-step5+dedic+glob_p+local_p+hp+topk+quant.csv"),
        "gpt2-medium-ptb-dense": read_trace(w / "summary-gpt2-medium-ptb-per0.csv"),
    }


def cycles(trace: Trace, cfg: SpAttenConfig, **kw) -> int:
    return simulate_spatten(trace, dataclasses.replace(cfg, **kw)).cycles


def fig19(traces: dict[str, Trace], cfg: SpAttenConfig) -> dict:
    out = {}
    for name in ("gpt2-small", "gpt2-medium"):
        c = {p: cycles(traces[name], cfg, topk_parallelism=p) for p in PARALLELISM}
        sram = {kb: cycles(traces[name], cfg, key_sram_bytes=kb * 1024, value_sram_bytes=kb * 1024)
                for kb in SRAM_KB}
        out[name] = {
            "cycles": c, "speedup_vs_p1": {p: c[1] / c[p] for p in PARALLELISM},
            "share_of_p64_gain_reached_at_p16": (c[1] / c[16] - 1) / (c[1] / c[64] - 1),
            "sram_kb_cycles": sram, "sram_speedup_vs_196kb": {kb: sram[196] / sram[kb] for kb in SRAM_KB},
        }
    return out


def fig20(traces: dict[str, Trace], cfg: SpAttenConfig, bits: int) -> dict:
    out = {}
    pairs = {"gpt2-small": traces["gpt2-small-dense"], "gpt2-medium": unpruned(traces["gpt2-medium"])}
    for name, dense in pairs.items():
        full = traces[name]
        c = dataclasses.replace(cfg, unquantized_bits=bits)
        steps = {
            "dedicated datapath": cycles(unquantized(dense, bits), c),
            "+cascade pruning (top-k P=1)": cycles(unquantized(full, bits), c, topk_parallelism=1),
            "+parallel top-k": cycles(unquantized(full, bits), c),
            "+progressive quantization": cycles(full, c),
        }
        names = list(steps)
        ratios = {names[i]: steps[names[i - 1]] / steps[names[i]] for i in range(1, len(names))}
        out[name] = {"cycles": steps, "step_ratios": ratios,
                     "total_vs_dedicated": steps[names[0]] / steps[names[-1]]}
    geo = {k: math.exp(np.mean([math.log(out[n]["step_ratios"][k]) for n in out]))
           for k in out["gpt2-small"]["step_ratios"]}
    return {"unquantized_bits": bits, "traces": out, "geomean_step_ratios": geo}


def payload_bytes(trace: Trace, unq: int) -> float:
    """Q, K (+ LSBs), V bytes without transaction rounding: the 'theoretical' DRAM access."""
    def bits(col: str) -> np.ndarray:
        return np.where(trace[col] == -1, unq, trace[col])

    d = trace["embedding_length_D"]
    lsb = np.where(trace["if_requant"], trace["auto_requant_incre"], 0)
    return float((d * bits("quant_query_bit") + trace["key_fetch_num"] * d * (bits("quant_key_bit") + lsb)
                  + trace["value_fetch_num"] * d * bits("quant_value_bit")).sum() / 8)


def dram(traces: dict[str, Trace], cfg: SpAttenConfig) -> dict:
    out = {}
    for name in ("gpt2-small", "gpt2-medium"):
        full = traces[name]
        variants = {
            "dense_12b": unpruned(unquantized(full, 12)),
            "tokens_heads_12b": unquantized(without_value_pruning(full), 12),
            "pruned_12b": unquantized(full, 12),
            "pruned_32b": unquantized(full, 32),
            "as_published": full,
        }
        bus = {k: float(row_work(v, cfg).dram_bytes.sum()) for k, v in variants.items()}
        pay = {k: payload_bytes(v, 12) for k, v in variants.items()}
        heads_kept = len(full) / len(unpruned(full))

        def ratios(b: dict, heads_kept: float = heads_kept) -> dict:
            return {
                "token+head pruning (K and V of kept tokens, 12b)": b["dense_12b"] / b["tokens_heads_12b"],
                "of which head pruning": 1 / heads_kept,
                "local value pruning (extra)": b["tokens_heads_12b"] / b["pruned_12b"],
                "progressive quantization vs 12b": b["pruned_12b"] / b["as_published"],
                "progressive quantization vs fp32": b["pruned_32b"] / b["as_published"],
                "overall vs unpruned 12b": b["dense_12b"] / b["as_published"],
            }

        out[name] = {"bus_bytes": bus, "payload_bytes": pay, "reduction_bus": ratios(bus),
                     "reduction_payload": ratios(pay)}
    return out


def roofline(traces: dict[str, Trace], cfg: SpAttenConfig) -> dict:
    pts = {
        "GPT-2 small unpruned (12b)": simulate_spatten(traces["gpt2-small-dense"], cfg),
        "GPT-2 small SpAtten": simulate_spatten(traces["gpt2-small"], cfg),
        "GPT-2 medium unpruned (12b)": simulate_spatten(traces["gpt2-medium-ptb-dense"], cfg),
        "GPT-2 medium SpAtten": simulate_spatten(traces["gpt2-medium"], cfg),
    }
    roofline_png(list(pts.items()), RESULTS / "hw" / "hw_roofline.png",
                 title="SpAtten roofline (Fig. 18): GPT-2 traces, Table I parameters")
    return {k: {"gflops": r.gflops, "intensity_ops_per_byte": r.intensity, "achieved_gbps": r.achieved_gbps,
                "cycles": r.cycles, "seconds": r.seconds, "utilisation": r.utilisation,
                "energy_j": r.energy_j, "dram_energy_share": r.energy_j["dram"] / r.energy_j["total"],
                "gop_per_joule": r.gop_per_joule}
            for k, r in pts.items()}


def plots(f19: dict, f19_eighth: dict, f20: dict, f20_32: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in f19.items():
        ax[0].plot(PARALLELISM, [r["speedup_vs_p1"][p] for p in PARALLELISM], "o-", label=f"{name}, Table I")
    for name, r in f19_eighth.items():
        ax[0].plot(PARALLELISM, [r["speedup_vs_p1"][p] for p in PARALLELISM], "s--", label=f"{name}, 1/8 scale")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("top-k comparators per array")
    ax[0].set_ylabel("speed-up vs parallelism 1")
    ax[0].set_title("Fig. 19 left: top-k parallelism (paper: ~3x, flat after 16)", fontsize=9)
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    for name, r in f19.items():
        ax[1].plot(SRAM_KB, [r["sram_speedup_vs_196kb"][kb] for kb in SRAM_KB], "o-", label=name)
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("Key / Value SRAM (KB each)")
    ax[1].set_ylabel("speed-up vs 196 KB")
    ax[1].set_title("Fig. 19 right: buffer size (paper: flat above 196 KB)", fontsize=9)
    ax[1].legend(fontsize=7)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "hw" / "hw_fig19.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    steps = list(f20["traces"]["gpt2-small"]["cycles"])
    width = 0.2
    series = [("paper (8 GPT-2 benchmarks)", [1, 1.1, 3.3, 9.24])]
    for label, res in (("12b reading", f20), ("fp32 reading", f20_32)):
        for name, r in res["traces"].items():
            base = r["cycles"][steps[0]]
            series.append((f"{name}, {label}", [base / r["cycles"][s] for s in steps]))
    x = np.arange(len(steps))
    for i, (label, ys) in enumerate(series):
        ax.bar(x + (i - len(series) / 2) * width / 1.2, ys, width / 1.2, label=label)
    ax.set_xticks(x, steps, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs dedicated datapath")
    ax.set_title("Fig. 20: speed-up breakdown (cumulative)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RESULTS / "hw" / "hw_fig20.png", dpi=130)
    plt.close(fig)


def main() -> None:
    cfg = SpAttenConfig()
    t0 = time.perf_counter()
    traces = load()
    big = shared_data_dir() / "spatten-workloads" / "summary-gpt2-medium-ptb-per0.csv"
    t1 = time.perf_counter()
    read_trace(big)
    t2 = time.perf_counter()
    simulate_spatten(traces["gpt2-medium-ptb-dense"], cfg)
    t3 = time.perf_counter()
    eighth = dataclasses.replace(cfg, qk_multipliers=64, pv_multipliers=64, hbm_channels=2)
    f19, f19_eighth = fig19(traces, cfg), fig19(traces, eighth)
    f20, f20_32 = fig20(traces, cfg, 12), fig20(traces, cfg, 32)
    f20_eighth = fig20(traces, eighth, 12)
    sens = {
        "no layer barrier": cycles(traces["gpt2-small"], cfg, layer_barrier=False),
        "dram latency 0": cycles(traces["gpt2-small"], cfg, dram_latency=0),
        "ideal DRAM efficiency": cycles(traces["gpt2-small"], cfg, dram_stream_efficiency=1.0,
                                        dram_gather_efficiency=1.0),
        "default": cycles(traces["gpt2-small"], cfg),
    }
    payload = {
        "paper": PAPER,
        "config": dataclasses.asdict(cfg),
        "energy_constants": constants_table(),
        "timing": {"read_12288_rows_s": t2 - t1, "simulate_12288_rows_s": t3 - t2,
                   "load_all_s": t1 - t0},
        "fig19": f19, "fig19_one_eighth_scale": f19_eighth,
        "fig20": f20, "fig20_fp32_reading": f20_32, "fig20_one_eighth_scale": f20_eighth,
        "dram_reduction": dram(traces, cfg),
        "roofline": roofline(traces, cfg),
        "sensitivity_gpt2_small_cycles": sens,
    }
    plots(f19, f19_eighth, f20, f20_32)
    path = save("hw_spatten_repro", payload, subdir="hw")
    print(f"wrote {path}")
    print(f"12288-row trace: read {t2 - t1:.2f} s, simulate {t3 - t2:.2f} s")
    for name, r in f19.items():
        print(f"Fig.19 {name}: " + " ".join(f"P{p}:{r['speedup_vs_p1'][p]:.2f}" for p in PARALLELISM)
              + " | SRAM " + " ".join(f"{kb}KB:{r['sram_speedup_vs_196kb'][kb]:.2f}" for kb in SRAM_KB))
    for name, r in f19_eighth.items():
        print(f"Fig.19 1/8 {name}: " + " ".join(f"P{p}:{r['speedup_vs_p1'][p]:.2f}" for p in PARALLELISM))
    for label, res in (("12b", f20), ("fp32", f20_32), ("1/8 scale 12b", f20_eighth)):
        for name, r in res["traces"].items():
            print(f"Fig.20 {label} {name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in r["step_ratios"].items())
                  + f" | total x{r['total_vs_dedicated']:.2f}")
    for name, r in payload["dram_reduction"].items():
        print(f"DRAM {name} bus: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["reduction_bus"].items()))
        print(f"DRAM {name} payload: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["reduction_payload"].items()))
    for k, r in payload["roofline"].items():
        print(f"roofline {k}: {r['gflops']:.0f} GFLOP/s at {r['intensity_ops_per_byte']:.2f} op/B, "
              f"{r['achieved_gbps']:.0f} GB/s, DRAM energy {100 * r['dram_energy_share']:.0f} %")
    print("sensitivity:", sens)


if __name__ == "__main__":
    main()

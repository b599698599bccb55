"""HDP co-processor: speed-up over the same co-processor running dense, vs block sparsity and head pruning.

Workloads are BERT-base shaped prefill traces in the SpAtten schema (12 layers x 12 heads, 128
queries over 128 keys, D = 64, 4-bit integer + 4-bit fraction parts): a kept fraction of 2x2 blocks
per query row (``key_fetch_num / L``) and early-pruned heads left out of the trace (``dynaprune.hw.hdp``
documents the mapping). The published GPT-2 generation traces are also run (one query per head: an
output-stationary array built for prefill idles most of its rows there). Writes
benchmarks/results/hw/hw_hdp.{json,png}.

    python -m benchmarks.hw_hdp
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import RESULTS, save
from dynaprune.hw.hdp import HdpConfig, simulate_hdp
from dynaprune.hw.trace import Trace, TraceRow, read_trace
from dynaprune.paths import shared_data_dir

SPARSITY = [0.0, 0.25, 0.5, 0.75, 0.9]
HEAD_PRUNED = [0.0, 0.1, 0.25]


def bert_trace(sparsity: float, head_pruned: float, seed: int = 0, layers: int = 12, heads: int = 12,
               length: int = 128) -> Trace:
    rng = np.random.default_rng(seed)
    kept = max(1, round(length * (1 - sparsity)))
    rows = []
    for layer in range(layers):
        pruned = set(rng.choice(heads, size=round(heads * head_pruned), replace=False).tolist())
        if layer == 0:
            pruned = set()  # keep every head once so the trace shows the model's head count
        for head in range(heads):
            if head in pruned:
                continue
            rows += [TraceRow(0, layer, head, 64, length, kept, quant_key_bit=4, auto_requant_incre=4)] * length
    return Trace.from_rows(rows, config=f"synthetic-bert-base-s{sparsity}-h{head_pruned}")


def main() -> None:
    cfg = HdpConfig()
    grid = []
    for hp in HEAD_PRUNED:
        for s in SPARSITY:
            r = simulate_hdp(bert_trace(s, hp), cfg)
            grid.append({"block_sparsity": s, "head_pruned": hp, "cycles": r.cycles,
                         "dense_cycles": r.extra["dense_cycles"], "speedup_vs_dense": r.extra["speedup_vs_dense"],
                         "dram_bytes": r.dram_bytes, "dense_dram_bytes": r.extra["dense_dram_bytes"],
                         "energy_j": r.energy_j, "gflops": r.gflops, "pe_utilisation": r.utilisation["multipliers"]})
            print(f"HDP BERT-base: block sparsity {s:.2f}, heads pruned {hp:.2f}: "
                  f"x{r.extra['speedup_vs_dense']:.2f} vs dense, DRAM {r.dram_bytes / r.extra['dense_dram_bytes']:.2f}"
                  f" of dense, {r.energy_j['total'] * 1e6:.1f} uJ")
    w = shared_data_dir() / "spatten-workloads"
    gpt2 = {}
    for name in ("summary-gpt2-small-wikitext2-per8.csv", "summary-gpt2-small-wikitext2-per8-step1+dedic.csv"):
        r = simulate_hdp(read_trace(w / name), cfg)
        gpt2[name] = {"cycles": r.cycles, "speedup_vs_dense": r.extra["speedup_vs_dense"],
                      "pe_utilisation": r.utilisation["multipliers"]}
        print(f"HDP on {name}: x{r.extra['speedup_vs_dense']:.2f} vs dense, PE utilisation "
              f"{r.utilisation['multipliers']:.3f}")
    path = save("hw_hdp", {"config": cfg.__dict__, "bert_base_grid": grid, "gpt2_generation": gpt2}, subdir="hw")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for hp in HEAD_PRUNED:
        pts = [g for g in grid if g["head_pruned"] == hp]
        ax.plot([100 * g["block_sparsity"] for g in pts], [g["speedup_vs_dense"] for g in pts], "o-",
                label=f"{100 * hp:.0f} % heads pruned early")
    ax.set_xlabel("2x2 blocks pruned (%)")
    ax.set_ylabel("speed-up vs the same co-processor, dense")
    ax.set_title("HDP co-processor model, BERT-base shapes (L = 128)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "hw" / "hw_hdp.png", dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

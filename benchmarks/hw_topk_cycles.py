"""SpAtten top-k engine cycles vs comparator parallelism P = 1..64 (Algorithm 3 reference, Section IV-B).

For each (n, k) the reference engine runs on random distinct inputs with 200 seeds; the pivot path
does not depend on P, so every P's cycle count comes from the same runs (the cycle model is in
``dynaprune.prune.topk``). Writes benchmarks/results/hw/hw_topk_cycles.{json,png}.

    python -m benchmarks.hw_topk_cycles
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import RESULTS, save
from dynaprune.prune.topk import TopkEngineConfig, expected_quickselect_elements, quick_select

CASES = [(128, 32), (256, 64), (278, 55), (512, 128), (1024, 256), (1024, 512), (1024, 921)]
PARALLELISM = list(range(1, 65))
SEEDS = 200


def cycles_for(n: int, k: int) -> dict:
    rng = np.random.default_rng(n * 7919 + k)
    lengths, rounds = [], []
    for _ in range(SEEDS):
        qs = quick_select(rng.permutation(n).tolist(), k, TopkEngineConfig(parallelism=1), seed=rng)
        lengths.append(qs.round_lengths)
        rounds.append(len(qs.round_lengths))
    per_p = {}
    for p in PARALLELISM:
        cfg = TopkEngineConfig(parallelism=p)
        qs_c = np.array([sum(cfg.round_cycles(m) for m in ls) for ls in lengths])
        per_p[p] = {"quickselect_mean": float(qs_c.mean()), "quickselect_std": float(qs_c.std()),
                    "filter": cfg.filter_cycles(n), "total_mean": float(qs_c.mean()) + cfg.filter_cycles(n)}
    streamed = np.array([sum(ls) for ls in lengths])
    return {"n": n, "k": k, "rounds_mean": float(np.mean(rounds)), "streamed_mean": float(streamed.mean()),
            "knuth_expected_comparisons": expected_quickselect_elements(n, k), "cycles": per_p}


def main() -> None:
    results = [cycles_for(n, k) for n, k in CASES]
    cfg = TopkEngineConfig()
    payload = {
        "cycle_model": {"round": "ceil(len / P) + round_latency", "filter": "ceil(n / P) + filter_latency",
                        "round_latency": cfg.round_latency, "filter_latency": cfg.filter_latency},
        "seeds": SEEDS, "cases": results,
    }
    path = save("hw_topk_cycles", payload, subdir="hw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ys = [r["cycles"][p]["quickselect_mean"] for p in PARALLELISM]
        ax.loglog(PARALLELISM, ys, label=f"n={r['n']}, k={r['k']}")
    ax.set_xlabel("comparators per array (P)")
    ax.set_ylabel("quick-select cycles (mean of 200)")
    ax.set_title("SpAtten top-k engine (Algorithm 3): cycles vs parallelism", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "hw" / "hw_topk_cycles.png", dpi=130)
    print(f"wrote {path}")
    for r in results:
        c = r["cycles"]
        print(f"n={r['n']:5d} k={r['k']:4d} streamed/n={r['streamed_mean'] / r['n']:.2f} rounds={r['rounds_mean']:.1f}"
              f"  P=1 {c[1]['total_mean']:.0f}  P=16 {c[16]['total_mean']:.0f}  P=64 {c[64]['total_mean']:.0f} cycles")


if __name__ == "__main__":
    main()

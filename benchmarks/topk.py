"""The run-time top-k fast path (``prune/topk.py``: ``topk_indices``, ``topk_mask``) vs torch.topk.

One row of n scores (n = 64 ... 65,536; random normal, no ties) with k = n / 4, and a batch of 8 such
rows. Our calls return Algorithm 3's selection (the k largest, earliest among ties) in input order;
torch.topk returns them sorted by value. Ratio = our time / torch.topk's (target <= 1.5). Medians over
repeats of ``inner`` calls each, all variants interleaved.

On the CPU our calls take the numpy path (``NUMPY_MAX_N`` in prune/topk/__init__.py); ``topk_indices_torch_path``
times the same call forced onto the torch path (the one other devices use), which is how the size limit
of the numpy path was chosen: ``numpy_path_faster_at`` lists the cases where it wins.

    python -m benchmarks.topk [--quick] [--repeats N]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import interleaved, parser, save, setup_threads
from dynaprune.prune import topk as topk_module
from dynaprune.prune.topk import topk_indices, topk_mask

SIZES = [64, 256, 1024, 4096, 16384, 65536]
QUICK_SIZES = [64, 1024]


def time_case(rows: int, n: int, repeats: int) -> dict:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    k = max(1, n // 4)
    inner = max(1, 200_000 // (rows * n))  # enough calls per timing to see microseconds

    def loop(fn):
        def run():
            for _ in range(inner):
                fn()
        return run

    def torch_path():
        saved, topk_module.NUMPY_MAX_N = topk_module.NUMPY_MAX_N, 0
        try:
            loop(lambda: topk_indices(x, k))()
        finally:
            topk_module.NUMPY_MAX_N = saved

    t = interleaved({
        "torch_topk": loop(lambda: torch.topk(x, k, dim=-1)),
        "topk_indices": loop(lambda: topk_indices(x, k)),
        "topk_mask": loop(lambda: topk_mask(x, k)),
        "topk_indices_torch_path": torch_path,
    }, repeats)
    us = {name: v["median_s"] / inner * 1e6 for name, v in t.items()}
    return {"rows": rows, "n": n, "k": k, "calls_per_timing": inner, "microseconds": us,
            "ratio_indices_vs_topk": us["topk_indices"] / us["torch_topk"],
            "ratio_mask_vs_topk": us["topk_mask"] / us["torch_topk"],
            "ratio_indices_torch_path_vs_topk": us["topk_indices_torch_path"] / us["torch_topk"]}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.set_defaults(repeats=15)  # a few seconds in all; medians of 15 steady the microsecond cases
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    t0 = time.perf_counter()
    cases = []
    for rows in (1, 8):
        for n in sizes:
            case = time_case(rows, n, repeats)
            cases.append(case)
            print(f"{rows} x {n:6d} k={case['k']:5d}: torch.topk {case['microseconds']['torch_topk']:9.1f} us, "
                  f"indices x{case['ratio_indices_vs_topk']:.2f}, mask x{case['ratio_mask_vs_topk']:.2f}, "
                  f"indices on the torch path x{case['ratio_indices_torch_path_vs_topk']:.2f}")
    worst = max(c["ratio_indices_vs_topk"] for c in cases)
    numpy_wins = [f"{c['rows']}x{c['n']}" for c in cases
                  if c["microseconds"]["topk_indices"] < c["microseconds"]["topk_indices_torch_path"]]
    payload = {"quick": args.quick, "threads": threads, "target": "ratio_indices_vs_topk <= 1.5",
               "numpy_max_n": topk_module.NUMPY_MAX_N, "worst_ratio_indices_vs_topk": worst,
               "met_at": [f"{c['rows']}x{c['n']}" for c in cases if c["ratio_indices_vs_topk"] <= 1.5],
               "numpy_path_faster_at": numpy_wins, "cases": cases, "seconds": time.perf_counter() - t0}
    print("wrote", save("topk", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

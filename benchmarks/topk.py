"""The run-time top-k fast path (``prune/topk.py``: ``topk_indices``, ``topk_mask``) vs torch.topk.

One row of n scores (n = 64 ... 65,536; random normal, no ties) with k = n / 4, and a batch of 8 such
rows. Our calls return Algorithm 3's selection (the k largest, earliest among ties) in input order;
torch.topk returns them sorted by value. Ratio = our time / torch.topk's (target <= 1.5). Medians over
repeats of ``inner`` calls each, the two sides interleaved.

    python -m benchmarks.topk [--quick] [--repeats N]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import interleaved, parser, save, setup_threads
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

    t = interleaved({
        "torch_topk": loop(lambda: torch.topk(x, k, dim=-1)),
        "topk_indices": loop(lambda: topk_indices(x, k)),
        "topk_mask": loop(lambda: topk_mask(x, k)),
    }, repeats)
    us = {name: v["median_s"] / inner * 1e6 for name, v in t.items()}
    return {"rows": rows, "n": n, "k": k, "calls_per_timing": inner, "microseconds": us,
            "ratio_indices_vs_topk": us["topk_indices"] / us["torch_topk"],
            "ratio_mask_vs_topk": us["topk_mask"] / us["torch_topk"]}


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
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
                  f"indices x{case['ratio_indices_vs_topk']:.2f}, mask x{case['ratio_mask_vs_topk']:.2f}")
    worst = max(c["ratio_indices_vs_topk"] for c in cases)
    payload = {"quick": args.quick, "threads": threads, "target": "ratio_indices_vs_topk <= 1.5",
               "worst_ratio_indices_vs_topk": worst, "cases": cases, "seconds": time.perf_counter() - t0}
    print("wrote", save("topk", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

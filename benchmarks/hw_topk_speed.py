"""Speed of the run-time top-k fast path (``topk_mask`` / ``topk_indices``) against torch.topk.

Shapes are the run-time uses: cascade token importance (batch, L), local value pruning over attention
probabilities (heads x queries, keys), head pruning (batch, heads). Each timing is the minimum over
many repeats (the machine is shared), one thread. torch.topk returns values sorted by default; the
unsorted call is the faster floor. Our calls return Algorithm 3's set (earliest among ties) in input
order, so ``torch.topk(...).indices.sort()`` is also timed: it is the same output when there are no
ties. Writes benchmarks/results/hw/hw_topk_speed.json.

    python -m benchmarks.hw_topk_speed
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import save
from dynaprune.prune.topk import topk_indices, topk_mask

CASES = [
    ("token importance, 1 x 1024, k=512", (1, 1024), 512),
    ("token importance, batch 8 x 1024, k=300", (8, 1024), 300),
    ("local V, 12 heads x 1024 keys, k=205", (12, 1024), 205),
    ("local V, 16 heads x 1024 keys, k=30", (16, 1024), 30),
    ("local V prefill, 12 x 128 x 128, k=32", (12, 128, 128), 32),
    ("local V long, 16 x 4096, k=1024", (16, 4096), 1024),
    ("head pruning, 1 x 12, k=10", (1, 12), 10),
]


def best_us(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name, shape, k in CASES:
        x = torch.randn(shape)
        ties = (x * 2).round()  # a handful of distinct values: ties at the threshold in every row
        per_row = torch.randint(1, k + 1, shape[:-1])
        reps = 50 if x.numel() > 50_000 else 300
        t = {
            "torch_topk": best_us(lambda: torch.topk(x, k), reps),  # noqa: B023
            "torch_topk_unsorted": best_us(lambda: torch.topk(x, k, sorted=False), reps),  # noqa: B023
            # the same output as topk_indices when there are no ties: positions in input order
            "torch_topk_then_sort": best_us(lambda: torch.topk(x, k, sorted=False).indices.sort().values,  # noqa: B023
                                            reps),
            "topk_indices": best_us(lambda: topk_indices(x, k), reps),  # noqa: B023
            "topk_mask": best_us(lambda: topk_mask(x, k), reps),  # noqa: B023
            "topk_indices_per_row_k": best_us(lambda: topk_indices(x, per_row), reps),  # noqa: B023
            "topk_mask_per_row_k": best_us(lambda: topk_mask(x, per_row), reps),  # noqa: B023
            "torch_topk_ties": best_us(lambda: torch.topk(ties, k), reps),  # noqa: B023
            "topk_indices_ties": best_us(lambda: topk_indices(ties, k), reps),  # noqa: B023
        }
        ratio = {
            "indices_vs_topk": t["topk_indices"] / t["torch_topk"],
            "mask_vs_topk": t["topk_mask"] / t["torch_topk"],
            "indices_vs_unsorted": t["topk_indices"] / t["torch_topk_unsorted"],
            "indices_vs_topk_then_sort": t["topk_indices"] / t["torch_topk_then_sort"],
            "per_row_indices_vs_topk": t["topk_indices_per_row_k"] / t["torch_topk"],
            "ties_indices_vs_topk": t["topk_indices_ties"] / t["torch_topk_ties"],
        }
        rows.append({"case": name, "shape": list(shape), "k": k, "microseconds": t, "ratio": ratio})
        print(f"{name:42s} torch.topk {t['torch_topk']:8.1f} us | indices x{ratio['indices_vs_topk']:.2f} "
              f"(vs topk+sort x{ratio['indices_vs_topk_then_sort']:.2f}) "
              f"mask x{ratio['mask_vs_topk']:.2f} per-row x{ratio['per_row_indices_vs_topk']:.2f} "
              f"ties x{ratio['ties_indices_vs_topk']:.2f}")
    path = save("hw_topk_speed", {"threads": 1, "timing": "min over repeats", "cases": rows}, subdir="hw")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

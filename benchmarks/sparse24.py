"""2:4 semi-structured weight sparsity on SmolLM2-sized fp16 linear layers vs dense (CUDA only).

Every linear layer shape of SmolLM2-135M (hidden 576, 9 query / 3 KV heads of 64, FFN 1536): the fused
QKV projection 576 -> 960, the output projection 576 -> 576, the fused gate/up 576 -> 3072 and the down
projection 1536 -> 576, at 2048 / 8192 / 32768 tokens (batch x sequence), fp16, random weights of
the right shape. Each weight is pruned to 2:4 by magnitude (the 2 largest of every 4 along the input
dimension kept) and converted with ``torch.sparse.to_sparse_semi_structured``; timed against
``F.linear`` on the same pruned weight stored dense (so both compute the same function; the output
is checked against it). Speed-up = dense time / 2:4 time (the ceiling is 2x on the multiply).

On a machine without CUDA there is nothing to measure: it says so, writes a JSON with
``"skipped": true`` and exits 0.

    python -m benchmarks.sparse24 [--quick] [--device cuda] [--out PATH]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import median_seconds, parser, save, setup_threads

# (name, in_features, out_features) of SmolLM2-135M's linear layers
LAYERS = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]
TOKENS = [2048, 8192, 32768]


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest-magnitude entries of every 4 consecutive inputs set to 0."""
    out_f, in_f = weight.shape
    groups = weight.reshape(out_f, in_f // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, drop, 0).reshape(out_f, in_f)


def run(layers: list[tuple[str, int, int]], tokens: list[int], repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, in_f, out_f in layers:
        w = prune_2_4(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=g) * in_f ** -0.5)
        try:
            w_sparse = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError) as e:  # a shape or GPU the kernels do not support
            rows.append({"layer": name, "in": in_f, "out": out_f, "error": f"{type(e).__name__}: {e}"})
            continue
        for n in tokens:
            x = torch.randn(n, in_f, device="cuda", dtype=torch.float16, generator=g)
            row = {"layer": name, "in": in_f, "out": out_f, "tokens": n}
            try:
                err = float((F.linear(x, w_sparse) - F.linear(x, w)).abs().max())
                dense = median_seconds(lambda x=x, w=w: F.linear(x, w), repeats, warmup=3)
                sparse = median_seconds(lambda x=x, ws=w_sparse: F.linear(x, ws), repeats, warmup=3)
            except (RuntimeError, ValueError) as e:
                rows.append(row | {"error": f"{type(e).__name__}: {e}"})
                continue
            row |= {"dense": dense, "sparse_2_4": sparse, "speedup": dense["median_s"] / sparse["median_s"],
                    "max_abs_error_vs_dense_pruned": err,
                    "dense_tflops": 2 * n * in_f * out_f / dense["median_s"] / 1e12}
            rows.append(row)
            print(f"{name:8s} {in_f:5d}->{out_f:5d} x {n:6d} tokens: dense {dense['median_s'] * 1e6:8.1f} us, "
                  f"2:4 {sparse['median_s'] * 1e6:8.1f} us, x{row['speedup']:.2f} (max error {err:.1e})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cuda (cpu: skipped, nothing to time)")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    t0 = time.perf_counter()
    if args.device != "cuda" or not torch.cuda.is_available():
        reason = ("2:4 semi-structured sparsity needs a CUDA GPU (sparse tensor cores); "
                  f"none here (torch {torch.__version__}, --device {args.device})")
        print(f"skipped: {reason}")
        payload = {"quick": args.quick, "threads": threads, "skipped": True, "reason": reason, "results": [],
                   "seconds": time.perf_counter() - t0}
    else:
        layers, tokens, repeats = (LAYERS[:1], TOKENS[:1], 3) if args.quick else (LAYERS, TOKENS, args.repeats * 4)
        rows = run(layers, tokens, repeats)
        payload = {"quick": args.quick, "threads": threads, "skipped": False, "device": "cuda", "dtype": "float16",
                   "kind": "2:4 semi-structured weights (to_sparse_semi_structured) vs the same pruned weights dense",
                   "results": rows, "seconds": time.perf_counter() - t0}
    print("wrote", save("sparse24", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

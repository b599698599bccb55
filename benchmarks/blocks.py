"""HDP-style block-sparse attention through PyTorch FlexAttention (block masks, torch.compile, CPU)
vs dense SDPA.

Shapes: batch 1, 12 heads, head dim 64, L = 1024 (block sizes 32 / 64 / 128) and L = 2048 (block
128), non-causal (an encoder's attention). Blocks kept the HDP way: each (query block, key block)
scored by the mean |q k^T| over the block, the top (1 - sparsity) key blocks of every query-block row
kept per head, the diagonal block always kept; sparsities 50 / 75 / 90%. The block mask is built with
``create_block_mask`` from that per-block keep table; ``flex_attention`` compiled once per block size
and length (``--no-compile``: eager, a slow reference path) then skips the pruned blocks entirely: a
block-sparse kernel, not a mask over dense work. Each output is checked against a dense softmax with
the pruned blocks at -inf. Ratio = SDPA time / block-sparse time (target >= 2 at 75%, block 64 or 128);
also timed end to end with the BlockMask built straight from the keep table (``BlockMask.from_kv_blocks``;
``create_block_mask``'s traced mask_mod takes 0.2-1 s per mask on this CPU and is reported apart).

    python -m benchmarks.blocks [--quick] [--no-compile]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import check_memory, interleaved, parser, save, setup_threads

CASES = [(1024, 32), (1024, 64), (1024, 128), (2048, 128)]
SPARSITIES = [0.5, 0.75, 0.9]


def hdp_block_keep(q: torch.Tensor, k: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """(B, H, nq, nk) bool: per head and query-block row, the key blocks with the largest mean |q k^T|
    (ceil((1 - sparsity) nk) of them), the diagonal block always among them."""
    B, H, L, _ = q.shape
    n = L // block
    scores = (q @ k.transpose(-1, -2)).abs().view(B, H, n, block, n, block).mean(dim=(3, 5))
    scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    keep_n = max(1, round((1 - sparsity) * n))
    top = scores.topk(keep_n, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def block_mask_from_table(keep: torch.Tensor, block: int):
    """The same BlockMask straight from the per-block keep table (what a runtime that already has
    HDP's block decisions would do): per query-block row, the kept key blocks' count and indices."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, qi, ki):
        return keep[b, h, qi // block, ki // block]

    # as partial blocks: a mask of full blocks only fails to compile on CPU in torch 2.13 (Inductor's
    # C++ kernel references an undeclared ``kv_indices``)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, mask_mod=mask_mod)


def run_case(length: int, block: int, sparsities: list[float], repeats: int, compile_: bool) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator().manual_seed(length + block)
    B, H, D = 1, 12, 64
    q, k, v = (torch.randn(B, H, length, D, generator=g) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False) if compile_ else flex_attention
    rows = []
    for sparsity in sparsities:
        keep = hdp_block_keep(q, k, block, sparsity)

        def mask_mod(b, h, qi, ki, keep=keep):
            return keep[b, h, qi // block, ki // block]

        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, B, H, length, length, device="cpu", BLOCK_SIZE=block)
        mask_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = flex(q, k, v, block_mask=block_mask)  # compiles on the first call of a shape
        first_s = time.perf_counter() - t0
        dense_keep = keep.repeat_interleave(block, 2).repeat_interleave(block, 3)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_keep)
        error = float((out - reference).abs().max())
        from_table = flex(q, k, v, block_mask=block_mask_from_table(keep, block))
        error = max(error, float((from_table - reference).abs().max()))
        times = interleaved({
            "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "flex_block_sparse": lambda bm=block_mask: flex(q, k, v, block_mask=bm),
            # end to end: the block mask built from the keep table, then the kernel
            "flex_incl_mask_build": lambda keep=keep: flex(q, k, v, block_mask=block_mask_from_table(keep, block)),
        }, repeats)
        ratio = times["sdpa_dense"]["median_s"] / times["flex_block_sparse"]["median_s"]
        ratio_incl = times["sdpa_dense"]["median_s"] / times["flex_incl_mask_build"]["median_s"]
        rows.append({"length": length, "block": block, "sparsity": sparsity,
                     "block_sparsity_realized": 1 - float(keep.float().mean()),
                     "times": times, "speedup_vs_sdpa": ratio, "speedup_incl_mask_build": ratio_incl,
                     "max_abs_error_vs_masked_dense": error,
                     "block_mask_build_s": mask_s, "first_call_s": first_s})
        print(f"L={length} block {block:3d} sparsity {sparsity:.2f}: x{ratio:.2f} vs dense SDPA, "
              f"x{ratio_incl:.2f} with the mask built from the block table "
              f"(max error {error:.1e}, first call {first_s:.1f} s)")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    threads = setup_threads(args.threads)
    if args.quick:
        cases, sparsities, repeats, compile_ = [(128, 32)], [0.75], 1, False
    else:
        cases, sparsities, repeats, compile_ = CASES, SPARSITIES, args.repeats, not args.no_compile
    longest = max(length for length, _ in cases)
    check_memory(4 * 12 * longest * longest * 4 + (1 << 28), f"blocks benchmark (L = {longest})")
    t0 = time.perf_counter()
    rows = [row for length, block in cases for row in run_case(length, block, sparsities, repeats, compile_)]
    payload = {"quick": args.quick, "threads": threads, "compiled": compile_,
               "kind": "block-sparse kernel (FlexAttention block mask), fp32 CPU",
               "flex_attention_on_cpu": "works in torch " + torch.__version__ + " (compiled through Inductor's C++ "
                                        "backend)" if compile_ else "eager reference path",
               "target": "speedup_vs_sdpa >= 2 at sparsity 0.75, block 64 or 128, L >= 1024",
               "results": rows, "seconds": time.perf_counter() - t0}
    print("wrote", save("blocks", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

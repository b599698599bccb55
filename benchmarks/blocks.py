"""HDP-style block-sparse attention through PyTorch FlexAttention (block masks, torch.compile) vs dense
SDPA, on real SmolLM2 queries and keys, with the block scoring inside the timed region.

Inputs: SmolLM2-135M's post-RoPE Q, K and V of layers 2, 15 and 28 (of 30), captured while it reads
the first 2048 tokens of WikiText-2 *valid*; the three layers are stacked as a batch of 3, K/V
repeated to the 9 query heads (GQA), head dim 64, causal (a decoder's attention). A shorter length uses
the prefix of the same capture (causal: identical to a run on that prefix). Cases: L = 1024 (block
sizes 32 / 64 / 128) and L = 2048 (block 128); block sparsities 50 / 75 / 90% of each query-block
row's visible key blocks.

Blocks kept the HDP way, per head and query-block row: the visible key blocks with the largest block
score, ceil((1 - sparsity) x visible) of them, the diagonal block always among them. Two scores:
``abs_sum`` (HDP's: sum of |q k^T| over the block, which needs the whole Q K^T product) and ``sum``
(the signed sum, exactly (sum of the block's q) . (sum of its k): block-pooled Q and K, L^2 d / b^2
work). Timed, round-robin: dense SDPA (``is_causal``); the block-sparse kernel alone on a prebuilt mask
(``kernel_only``, what the old benchmark reported); and end to end for each score: scoring, the keep
table, the BlockMask built from it (``BlockMask.from_kv_blocks``) and the kernel. Speed-up = SDPA time
/ end-to-end time (``speedup_vs_sdpa``, the headline); ``speedup_kernel_only`` beside it. Every
output is checked against a dense softmax with the pruned blocks (and the causal triangle) at -inf.
``flex_attention`` is compiled once per shape (``--no-compile``: eager, a slow reference path).

    python -m benchmarks.blocks [--quick] [--no-compile] [--device cpu|cuda] [--cases L:B,...]
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    check_memory,
    interleaved,
    parser,
    pick_device,
    save,
    setup_threads,
    synchronize,
    wikitext_ids,
)

CASES = [(1024, 32), (1024, 64), (1024, 128), (2048, 128)]
SPARSITIES = [0.5, 0.75, 0.9]
LAYERS = (2, 15, 28)
SCORES = ("abs_sum", "sum")


@contextlib.contextmanager
def recording_attention(layers: tuple[int, ...], store: dict[int, tuple[torch.Tensor, ...]]):
    """Record the (q, k, v) that SmolLM2's attention receives at ``layers`` (post-RoPE, K/V per KV head)."""
    import dynaprune.models.llama as llama

    original = llama.attention

    def spy(q, k, v, *, layer, **kwargs):
        if layer in layers:
            store[layer] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return original(q, k, v, layer=layer, **kwargs)

    llama.attention = spy
    try:
        yield store
    finally:
        llama.attention = original


def capture_qkv(length: int, layers: tuple[int, ...] = LAYERS,
                device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(len(layers), heads, length, head_dim) Q, K, V of SmolLM2 on the first ``length`` WikiText-2 valid
    tokens, one batch item per layer, K/V repeated to the query heads."""
    from dynaprune import load

    model = load("smollm2-135m").to(device)
    if max(layers) >= model.config.layers:
        layers = tuple(i * (model.config.layers - 1) // max(1, len(layers) - 1) for i in range(len(layers)))
    ids = torch.tensor([wikitext_ids(model.tokenizer, length, split="valid")], device=device)
    store: dict[int, tuple[torch.Tensor, ...]] = {}
    with torch.inference_mode(), recording_attention(layers, store):
        model(ids, last_only=True)
    group = model.config.heads // model.config.kv_heads
    q = torch.cat([store[i][0] for i in layers])
    k, v = (torch.cat([store[i][j] for i in layers]).repeat_interleave(group, dim=1) for j in (1, 2))
    return q.contiguous(), k.contiguous(), v.contiguous()


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int, score: str) -> torch.Tensor:
    """(B, H, n, n) block scores: ``abs_sum`` = sum of |q k^T| over the block (the whole product);
    ``sum`` = the signed sum, computed from block-pooled Q and K (exact: a sum of dot products)."""
    B, H, L, D = q.shape
    n = L // block
    if score == "abs_sum":
        return (q @ k.transpose(-1, -2)).abs().view(B, H, n, block, n, block).sum(dim=(3, 5))
    if score == "sum":
        qs, ks = q.view(B, H, n, block, D).sum(3), k.view(B, H, n, block, D).sum(3)
        return qs @ ks.transpose(-1, -2)
    raise ValueError(f"unknown block score {score!r}")


def hdp_block_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(B, H, n, n) bool: per head and query-block row i, the ceil((1 - sparsity) (i + 1)) visible
    key blocks (j <= i) with the largest score, the diagonal block always among them."""
    n = scores.shape[-1]
    rows = torch.arange(n, device=scores.device)
    visible = rows[None, :] <= rows[:, None]
    ranked = scores.masked_fill(~visible, float("-inf"))
    ranked.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, rows.expand_as(order))
    keep_n = torch.ceil((1 - sparsity) * (rows + 1) - 1e-9).clamp(min=1)
    return (rank < keep_n[:, None]) & visible


def block_mask_from_table(keep: torch.Tensor, block: int):
    """The BlockMask straight from the per-block keep table (what a runtime holding HDP's block
    decisions does): per query-block row, the kept key blocks' count and indices; inside a block the
    causal triangle still applies."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, qi, ki):
        return keep[b, h, qi // block, ki // block] & (qi >= ki)

    # as partial blocks: a mask of full blocks only fails to compile on CPU in torch 2.13 (Inductor's
    # C++ kernel references an undeclared ``kv_indices``)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, mask_mod=mask_mod)


def masked_reference(q, k, v, keep: torch.Tensor, block: int) -> torch.Tensor:
    L = q.shape[2]
    allowed = keep.repeat_interleave(block, 2).repeat_interleave(block, 3)
    allowed &= torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def run_case(q, k, v, block: int, sparsities: list[float], repeats: int, compile_: bool) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    device = q.device
    flex = torch.compile(flex_attention, dynamic=False) if compile_ else flex_attention
    length = q.shape[2]
    rows = []
    for sparsity in sparsities:
        keeps = {s: hdp_block_keep(block_scores(q, k, block, s), sparsity) for s in SCORES}
        masks = {s: block_mask_from_table(keep, block) for s, keep in keeps.items()}
        synchronize(device)
        t0 = time.perf_counter()
        outs = {s: flex(q, k, v, block_mask=masks[s]) for s in SCORES}  # compiles on the first call of a shape
        synchronize(device)
        first_s = time.perf_counter() - t0
        errors = {s: float((outs[s] - masked_reference(q, k, v, keeps[s], block)).abs().max()) for s in SCORES}

        def end_to_end(score: str, sparsity: float = sparsity):
            keep = hdp_block_keep(block_scores(q, k, block, score), sparsity)
            return flex(q, k, v, block_mask=block_mask_from_table(keep, block))

        fns = {"sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "kernel_only": lambda bm=masks["abs_sum"]: flex(q, k, v, block_mask=bm)}
        fns |= {f"end_to_end_{s}": (lambda s=s: end_to_end(s)) for s in SCORES}
        times = interleaved(fns, repeats)
        dense = times["sdpa_dense"]["median_s"]
        speedups = {s: dense / times[f"end_to_end_{s}"]["median_s"] for s in SCORES}
        visible = torch.ones_like(keeps["abs_sum"][0, 0]).tril()
        row = {"length": length, "block": block, "sparsity": sparsity, "causal": True,
               "block_sparsity_realized": {s: 1 - float(keep.sum() / (visible.sum() * keep.shape[0] * keep.shape[1]))
                                           for s, keep in keeps.items()},
               "blocks_kept": {s: int(keep.sum()) for s, keep in keeps.items()},
               "blocks_visible": int(visible.sum()) * keeps["abs_sum"].shape[0] * keeps["abs_sum"].shape[1],
               "times": times, "speedup_vs_sdpa": speedups["abs_sum"], "speedup_vs_sdpa_sum_score": speedups["sum"],
               "speedup_kernel_only": dense / times["kernel_only"]["median_s"],
               "max_abs_error_vs_masked_dense": max(errors.values()), "first_call_s": first_s}
        rows.append(row)
        print(f"L={length} block {block:3d} sparsity {sparsity:.2f}: x{row['speedup_vs_sdpa']:.2f} vs dense SDPA "
              f"end to end (abs_sum score), x{speedups['sum']:.2f} (pooled sum score), "
              f"x{row['speedup_kernel_only']:.2f} kernel only (max error {row['max_abs_error_vs_masked_dense']:.1e}, "
              f"first call {first_s:.1f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--cases", default=None, help="LENGTH:BLOCK,... (default 1024:32,1024:64,1024:128,2048:128)")
    p.add_argument("--save-qkv", metavar="PATH", default=None,
                   help="capture Q/K/V for the longest case, save them (fp16, K/V per KV head) and exit")
    p.add_argument("--qkv", metavar="PATH", default=None,
                   help="read the Q/K/V that --save-qkv wrote instead of running SmolLM2 (a machine without the model)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    threads = setup_threads(args.threads)
    if args.quick:
        cases, sparsities, repeats, compile_ = [(128, 32)], [0.75], 1, False
    else:
        cases, sparsities, repeats, compile_ = CASES, SPARSITIES, args.repeats, not args.no_compile
    if args.cases:
        cases = [tuple(int(x) for x in case.split(":")) for case in args.cases.split(",")]
    for length, block in cases:
        if length % block:
            p.error(f"length {length} is not a multiple of block {block}")
    longest = max(length for length, _ in cases)
    if device.type == "cpu":  # the abs_sum score's (3, 9, L, L) product and the reference's mask
        check_memory(3 * 3 * 9 * longest * longest * 4 + (1 << 29), f"blocks benchmark (L = {longest})")
    t0 = time.perf_counter()
    if args.save_qkv:  # fp16 and K/V unrepeated: small enough to travel to a GPU machine without the model
        q_all, k_all, v_all = capture_qkv(longest)
        group = q_all.shape[1] // 3  # SmolLM2: 9 query heads share 3 KV heads
        torch.save({"q": q_all.half(), "k": k_all[:, ::group].half(), "v": v_all[:, ::group].half(),
                    "group": group}, args.save_qkv)
        return {}
    if args.qkv:
        saved = torch.load(args.qkv)
        if saved["q"].shape[2] < longest:
            p.error(f"{args.qkv} holds {saved['q'].shape[2]} tokens, the cases need {longest}")
        q_all = saved["q"].float().to(device)
        k_all, v_all = (saved[n].float().repeat_interleave(saved["group"], dim=1).to(device) for n in ("k", "v"))
    else:
        q_all, k_all, v_all = capture_qkv(longest, device=device)
    capture_s = time.perf_counter() - t0
    rows = []
    for length, block in cases:
        q, k, v = (t[:, :, :length].contiguous() for t in (q_all, k_all, v_all))
        rows += run_case(q, k, v, block, sparsities, repeats, compile_)
    payload = {"quick": args.quick, "threads": threads, "compiled": compile_, "device": device.type,
               "inputs": f"SmolLM2-135M layers {list(LAYERS)} Q/K/V on WikiText-2 valid (batch = layers, "
                         "K/V repeated to 9 heads, causal)" + (" read from a saved capture (fp16-rounded)"
                                                               if args.qkv else ""), "capture_s": capture_s,
               "kind": f"block-sparse kernel (FlexAttention block mask), fp32 {device.type.upper()}; "
                       "speedup_vs_sdpa includes the block scoring, keep table and mask build",
               "target": "speedup_vs_sdpa >= 2 at sparsity 0.75, block 64 or 128, L >= 1024",
               "results": rows, "seconds": time.perf_counter() - t0}
    print("wrote", save("blocks", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

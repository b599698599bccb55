"""SmolLM2-135M greedy decode under a KV budget vs dense: tokens per second, KV cache bytes held, memory.

Batch 1 and 8, prompts of 1k and 4k WikiText-2 tokens (each row its own text), ``kv`` budgets 0.5 /
0.25 / 0.125 of the prompt (SpAtten's cumulative importance, 4 sinks, a recent window; evicted in
chunks of budget/16, so the cache holds at most the budget). Every variant prefills its own cache
(untimed), then all variants decode step by step round-robin (dense, kv=0.5, ..., dense, ...), each
step timed: tokens/s = batch / median step time. Under a budget the attention reads the compacted cache
(the evicted K/V are gone) and adds the column sums of the step's probabilities to the importance.

KV bytes held: what the cache holds after the last step (K and V of the tokens kept, fp32), beside the
dense cache's; allocated: the preallocated buffers. Peak memory: the process' resident-set peak
(VmHWM, reset before each variant's prefill where the kernel allows it, so it covers that variant's
prefill and its first steps) — indicative only, as the variants share one process.

Target (batch 8, 4k, kv=0.25): >= 1.5x tokens/s and KV bytes <= 0.27x dense.

    python -m benchmarks.decode [--quick] [--new-tokens N]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import check_memory, parser, save, setup_threads, wikitext_ids
from dynaprune import load
from dynaprune.runtime.pruning import make_context

BUDGETS = [0.5, 0.25, 0.125]


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def kv_bytes(model, batch: int, tokens: int) -> int:
    c = model.config
    return 2 * c.layers * batch * c.kv_heads * tokens * c.head_dim * 4


def run_case(model, batch: int, context: int, new_tokens: int, budgets: list[float]) -> dict:
    tok = model.tokenizer
    ids = torch.tensor([wikitext_ids(tok, context, offset_chars=row * context * 6) for row in range(batch)])
    variants = {"dense": None} | {f"kv={b}": f"kv={b}" for b in budgets}
    state = {}
    with torch.inference_mode():
        for name, recipe in variants.items():
            reset_ok = reset_peak_rss()
            ctx = make_context(recipe, model) if recipe else None
            cache = model.new_cache(batch, context + new_tokens + 1)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, ctx=ctx, last_only=True)
            prefill_s = time.perf_counter() - t0
            token = logits[:, -1:].argmax(-1)
            state[name] = {"ctx": ctx, "cache": cache, "token": token, "steps": [], "prefill_s": prefill_s,
                           "peak_rss": peak_rss_bytes() if reset_ok else None}
        for _ in range(new_tokens):
            for s in state.values():
                t0 = time.perf_counter()
                s["token"] = model(s["token"], cache=s["cache"], ctx=s["ctx"])[:, -1:].argmax(-1)
                s["steps"].append(time.perf_counter() - t0)
    dense_step = statistics.median(state["dense"]["steps"])
    dense_held = state["dense"]["cache"].bytes_held()
    out = {"batch": batch, "context": context, "new_tokens": new_tokens, "variants": {}}
    for name, s in state.items():
        step = statistics.median(s["steps"])
        cache = s["cache"]
        out["variants"][name] = {
            "tokens_per_s": batch / step, "median_step_s": step, "min_step_s": min(s["steps"]),
            "max_step_s": max(s["steps"]), "prefill_s": s["prefill_s"],
            "speedup": dense_step / step,
            "kv_bytes_held": cache.bytes_held(), "kv_bytes_held_vs_dense": cache.bytes_held() / dense_held,
            "kv_tokens_held_per_layer": max(cache.lengths), "kv_bytes_allocated": cache.bytes_allocated(),
            "peak_rss_bytes": s["peak_rss"],
        }
        v = out["variants"][name]
        print(f"batch {batch} ctx {context} {name:9s}: {v['tokens_per_s']:7.2f} tok/s (x{v['speedup']:.2f}), "
              f"KV held {v['kv_bytes_held'] / 2**20:7.1f} MiB (x{v['kv_bytes_held_vs_dense']:.3f})")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per variant")
    p.add_argument("--cases", default=None, help="BATCHxCONTEXT,... (default 1x1024,1x4096,8x1024,8x4096)")
    p.add_argument("--budgets", default=None, help="kv budgets, comma-separated (default 0.5,0.25,0.125)")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    model = load("smollm2-135m")
    if args.quick:
        cases, new_tokens, budgets = [(1, 64)], 4, [0.25]
    else:
        cases, new_tokens, budgets = [(1, 1024), (1, 4096), (8, 1024), (8, 4096)], args.new_tokens, BUDGETS
    if args.cases:
        cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    for batch, context in cases:
        # every variant's cache preallocated at the full length, plus the prefill's activations
        need = weights + (1 + len(budgets)) * kv_bytes(model, batch, context + new_tokens + 1)
        need += 12 * batch * context * model.config.intermediate * 4
        check_memory(need, f"decode benchmark (batch {batch}, {context}-token context)")
    t0 = time.perf_counter()
    rows = [run_case(model, b, c, new_tokens, budgets) for b, c in cases]
    payload = {"quick": args.quick, "threads": threads, "model": "smollm2-135m",
               "kind": "compacted KV cache (evicted K/V gathered out), fp32 CPU",
               "target": "batch 8, 4k, kv=0.25: speedup >= 1.5, kv_bytes_held_vs_dense <= 0.27",
               "results": rows, "seconds": time.perf_counter() - t0}
    print("wrote", save("decode", payload, path=args.out))
    return payload


if __name__ == "__main__":
    main()

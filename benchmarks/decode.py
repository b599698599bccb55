"""SmolLM2-135M greedy decode under a KV budget vs dense: tokens per second, KV cache bytes held, memory.

Batch 1 and 8, prompts of 1k and 4k WikiText-2 tokens (each row its own text), ``kv`` budgets 0.5 /
0.25 / 0.125 of the prompt (SpAtten's cumulative importance, 4 sinks, a recent window; evicted in
chunks of budget/16, so the cache holds at most the budget). Every variant prefills its own cache
(untimed; the prefill's own eviction to budget - budget/16 is not in the window), then all variants
decode step by step round-robin (dense, kv=0.5, ..., dense, ...), each step timed. The timed window
is sized so that compaction happens inside it: a budget of B tokens compacts once every B/16 + 1
steps, and the window spans ``--compaction-periods`` (default 2) such periods of the largest budget,
so every budgeted variant compacts at least that often while timed (smaller budgets more often); the
compactions seen inside the window are counted per variant. tokens/s = batch x steps / the window's
total time (the mean step, compaction steps included: what a user sees over a long decode); the
median step's figure is reported beside it (``tokens_per_s_median``), as it hides the periodic
compaction. Under a budget the attention reads the compacted cache (the evicted K/V are gone) and adds
the column sums of the step's probabilities to the importance.

KV bytes held: what the cache holds after the last step (K and V of the tokens kept, fp32), beside the
dense cache's; allocated: the preallocated buffers. Peak memory: the process' resident-set peak
(VmHWM, reset before each variant's prefill where the kernel allows it, so it covers that variant's
prefill and its first steps) — indicative only, as the variants share one process.

``--device cuda`` runs the same on a GPU (every step synchronized before its clock is read).

Target (batch 8, 4k, kv=0.25): >= 1.5x tokens/s and KV bytes <= 0.27x dense.

    python -m benchmarks.decode [--quick] [--new-tokens N] [--compaction-periods P] [--device cpu|cuda]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import check_memory, parser, pick_device, save, setup_threads, synchronize, wikitext_ids
from dynaprune import load
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.techniques.kv_budget import CHUNKED_EVICTION_MIN_BUDGET
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.reconstruction import Reconstruction

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


def compaction_period(model, budget: float, context: int) -> int:
    """Decode steps between two compactions of a ``kv=budget`` cache after a ``context``-token prompt:
    the cache drops to budget - slack and compacts when it next exceeds the budget (slack + 1 steps)."""
    ctx = make_context(budget if isinstance(budget, str) else f"kv={budget}", model)  # a float or a recipe
    tokens = ctx.recipe.kv_budget_tokens(context)
    slack = int(tokens * ctx.evict_slack) if tokens >= CHUNKED_EVICTION_MIN_BUDGET else 0
    return slack + 1


def window_steps(model, budgets: list[float], context: int, periods: int) -> int:
    """Timed steps: ``periods`` compaction periods of the largest budget (every budget compacts at least
    ``periods`` times inside the window)."""
    return periods * max((compaction_period(model, b, context) for b in budgets), default=1)


def run_case(model, batch: int, context: int, new_tokens: int, budgets: list[float],
             device: torch.device = torch.device("cpu")) -> dict:
    if getattr(model, "random_weights", False):  # no tokenizer: random ids (the work does not depend on them)
        ids = torch.randint(0, model.config.vocab, (batch, context), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
    else:
        tok = model.tokenizer
        ids = torch.tensor([wikitext_ids(tok, context, offset_chars=row * context * 6) for row in range(batch)],
                           device=device)
    variants = {"dense": None} | {(b if isinstance(b, str) else f"kv={b}"): (b if isinstance(b, str) else f"kv={b}")
                                  for b in budgets}  # --recipes are variants as written (e.g. kv_bytes=0.25)
    state = {}
    with torch.inference_mode():
        for name, recipe in variants.items():
            reset_ok = reset_peak_rss()
            ctx = make_context(recipe, model) if recipe else None
            cache = model.new_cache(batch, context + new_tokens + 1)
            synchronize(device)
            t0 = time.perf_counter()
            if hasattr(ctx, "reconstruction"):  # a KV scorer that re-reads the prompt (score=kvzip)
                ctx.reconstruction = Reconstruction(model, ids)
            logits = model(ids, cache=cache, ctx=ctx, last_only=True)
            synchronize(device)
            prefill_s = time.perf_counter() - t0
            token = logits[:, -1:].argmax(-1)
            state[name] = {"ctx": ctx, "cache": cache, "token": token, "steps": [], "compacted": [],
                           "prefill_s": prefill_s, "peak_rss": peak_rss_bytes() if reset_ok else None}
        for _ in range(new_tokens):
            for s in state.values():
                before = list(s["cache"].lengths)
                synchronize(device)
                t0 = time.perf_counter()
                s["token"] = model(s["token"], cache=s["cache"], ctx=s["ctx"])[:, -1:].argmax(-1)
                synchronize(device)
                s["steps"].append(time.perf_counter() - t0)
                # a step appends one token to every layer; a layer that ends shorter than that was compacted
                s["compacted"].append(any(a < b + 1 for a, b in zip(s["cache"].lengths, before, strict=True)))
    dense_mean = statistics.fmean(state["dense"]["steps"])
    dense_median = statistics.median(state["dense"]["steps"])
    dense_held = state["dense"]["cache"].bytes_held()
    out = {"batch": batch, "context": context, "new_tokens": new_tokens, "variants": {}}
    for name, s in state.items():
        steps, cache = s["steps"], s["cache"]
        mean, median = statistics.fmean(steps), statistics.median(steps)
        compaction_steps = [t for t, c in zip(steps, s["compacted"], strict=True) if c]
        plain_steps = [t for t, c in zip(steps, s["compacted"], strict=True) if not c]
        out["variants"][name] = {
            "tokens_per_s": batch / mean, "tokens_per_s_median": batch / median,
            "mean_step_s": mean, "median_step_s": median, "min_step_s": min(steps), "max_step_s": max(steps),
            "window_s": sum(steps), "timed_steps": len(steps), "prefill_s": s["prefill_s"],
            "speedup": dense_mean / mean, "speedup_median": dense_median / median,
            "compactions_in_window": len(compaction_steps),
            "compaction_step_mean_s": statistics.fmean(compaction_steps) if compaction_steps else None,
            "plain_step_mean_s": statistics.fmean(plain_steps) if plain_steps else None,
            "kv_budget_tokens": s["ctx"].kv_budget if s["ctx"] is not None else None,
            "kv_bytes_held": cache.bytes_held(), "kv_bytes_held_vs_dense": cache.bytes_held() / dense_held,
            "kv_tokens_held_per_layer": max(cache.lengths), "kv_bytes_allocated": cache.bytes_allocated(),
            "peak_rss_bytes": s["peak_rss"],
        }
        v = out["variants"][name]
        print(f"batch {batch} ctx {context} {name:9s}: {v['tokens_per_s']:7.2f} tok/s mean (x{v['speedup']:.2f}), "
              f"{v['tokens_per_s_median']:7.2f} median (x{v['speedup_median']:.2f}), "
              f"{v['compactions_in_window']} compactions in {len(steps)} steps, "
              f"KV held {v['kv_bytes_held'] / 2**20:7.1f} MiB (x{v['kv_bytes_held_vs_dense']:.3f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode steps timed per variant (default: --compaction-periods periods of the largest budget)")
    p.add_argument("--compaction-periods", type=int, default=2,
                   help="compaction periods of the largest budget in the timed window (default 2)")
    p.add_argument("--cases", default=None, help="BATCHxCONTEXT,... (default 1x1024,1x4096,8x1024,8x4096)")
    p.add_argument("--budgets", default=None, help="kv budgets, comma-separated (default 0.5,0.25,0.125)")
    p.add_argument("--recipes", nargs="*", help="more variants as recipes (e.g. kv_bytes=0.25), beside the budgets")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--random-weights", metavar="CONFIG_JSON", default=None,
                   help="SmolLM2's shapes from this HF config (written by --save-config) with random weights, for a "
                        "machine without the model file: the work per step does not depend on the weights")
    p.add_argument("--save-config", metavar="PATH", default=None, help="write SmolLM2's HF config JSON and exit")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.new_tokens is not None and args.new_tokens < 1:
        p.error("--new-tokens must be >= 1")
    if args.compaction_periods < 1:
        p.error("--compaction-periods must be >= 1")
    threads = setup_threads(args.threads)
    if args.save_config:
        Path(args.save_config).write_text(json.dumps(load("smollm2-135m").config.to_hf()))
        return {}
    if args.random_weights:
        model = Llama(LlamaConfig.from_hf(json.loads(Path(args.random_weights).read_text()))).to(device)
        model.random_weights = True
    else:
        model = load("smollm2-135m").to(device)
    if args.quick:  # 256-token prompt, kv=0.25: a 64-token budget, compacting every 5 steps
        cases, budgets = [(1, 256)], [0.25]
    else:
        cases, budgets = [(1, 1024), (1, 4096), (8, 1024), (8, 4096)], BUDGETS
    if args.cases:
        cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
    budgets = [*budgets, *(args.recipes or [])]
    steps = {c: args.new_tokens or window_steps(model, budgets, c[1], args.compaction_periods) for c in cases}
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    for batch, context in cases:
        # every variant's cache preallocated at the full length, plus the prefill's activations
        need = weights + (1 + len(budgets)) * kv_bytes(model, batch, context + steps[batch, context] + 1)
        need += 12 * batch * context * model.config.intermediate * 4
        if device.type == "cpu":
            check_memory(need, f"decode benchmark (batch {batch}, {context}-token context)")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for b, c in cases:  # saved after every case: a long grid on a busy machine keeps what it finished
        rows.append(run_case(model, b, c, steps[b, c], budgets, device))
        payload = {"quick": args.quick, "threads": threads, "device": device.type,
                   "model": "smollm2-135m" + (" shapes, random weights and ids" if args.random_weights else ""),
                   "kind": f"compacted KV cache (evicted K/V gathered out), fp32 {device.type.upper()}",
                   "timing": "tokens_per_s = batch / mean step over the timed window (compactions inside it); "
                             "tokens_per_s_median beside it",
                   "compaction_periods": None if args.new_tokens else args.compaction_periods,
                   "target": "batch 8, 4k, kv=0.25: speedup >= 1.5, kv_bytes_held_vs_dense <= 0.27",
                   "complete": len(rows) == len(cases), "results": rows, "seconds": time.perf_counter() - t0}
        path = save("decode", payload, path=args.out)
    print("wrote", path)
    return payload


if __name__ == "__main__":
    main()

"""SmolLM2-135M prefill of a 2048-token (or ``--length``) prompt: time to first token vs dense, with
the perplexity cost beside it, for cascade token pruning, the prefill selection (``prefill_keep`` /
``prefill=F``, one layer's observation window), GemFilter (``runtime/gemfilter.py``) and the selection
with LazyLLM revival (``prefill_revive``, ``runtime/revival.py``: its deferred work timed and counted
apart, as ``prefill_and_revival_time`` and ``revival_flops_share``).

Time to first token = one prefill forward into a fresh KV cache, logits of the last token only; dense
and every variant interleaved in one process (round-robin), median, min and max of ``--repeats``.
FLOPs kept from the runs' work counters (GemFilter: both passes; the window's (w x L) scores added).
KV bytes: what the pruned prefill leaves in the cache (fp16 axis) over a dense cache of the prompt.

Perplexity cost: WikiText-2 VALID chunks of ``length`` + 128 tokens, the prompt prefilled (where
pruning acts), the 128 teacher-forced on that cache (``eval.lm``'s ``continue`` protocol); cost = pruned
/ dense perplexity - 1. TEST chunks (same protocol) are reported next to it, never used to choose.

    python -m benchmarks.prefill [--quick] [--repeats N] [--ppl-examples N] [--test-examples N]
                                 [--length 4096] [--variants NAME,...]
    python -m benchmarks.prefill --search [--ship]   # the VALID grid behind prefill=F (no timing)

``--search`` measures the grid of ``prefill_layer`` x ``prefill_keep`` on VALID and writes
``prefill-search.json``; ``--ship`` then writes the lowest-cost point at or under each FLOPs target to
the package's ``prefill_choices.json`` (what ``prefill=F`` runs).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from benchmarks.common import (
    check_memory,
    interleaved,
    parser,
    save,
    setup_threads,
    token_recipe_for,
    wikitext_ids,
)
from dynaprune import load
from dynaprune.eval.lm import evaluate_lm
from dynaprune.eval.result import write_json_atomic
from dynaprune.paths import shared_data_dir
from dynaprune.prune.techniques.prefill_window import CHOICES_FILE, prefill_choices
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.gemfilter import GemFilter, GemFilterModel, SelectionPass, gemfilter_prefill, gemfilter_select
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.revival import RevivalModel, pending_revival, revive
from dynaprune.runtime.revival_on_demand import OnDemand, OnDemandModel

SEARCH_LAYERS = [3, 6]
SEARCH_KEEP = [0.5, 0.65, 0.8]
SEARCH_WINDOWS = [32, 128]
SEARCH_POOLS = [7]
SHIP_TARGETS = [0.5, 0.6, 0.7, 0.8, 0.9]
GEMFILTER = [GemFilter(3, 0.5), GemFilter(6, 0.65)]
ONDEMAND_KNOBS = {"r": ("per_step", int), "t": ("threshold", float), "b": ("budget", float), "p": ("pool", int),
                  "o": ("order", str)}


def parse_ondemand(spec: str) -> dict:
    """``RECIPE@r=16,t=0,b=1,p=1``: the recipe's selection with every pruned token in the aux cache
    (``prefill_revive`` = 1 - keep, added) and LazyLLM's on-demand revival during decoding
    (``runtime/revival_on_demand.py``: per_step r, threshold t, budget b, pool p, order o = score |
    position) -> {"recipe", "ondemand"};
    a plain recipe -> {"recipe"}."""
    recipe, _, knobs = spec.partition("@")
    if not knobs:
        return {"recipe": recipe}
    kw = {}
    for item in knobs.split(","):
        key, _, value = item.partition("=")
        if key not in ONDEMAND_KNOBS:
            raise SystemExit(f"error: unknown on-demand knob {key!r} in {spec!r} (r, t, b, p, o)")
        name, kind = ONDEMAND_KNOBS[key]
        kw[name] = kind(value)
    if "prefill_revive" not in recipe:
        parts = dict(p.split("=", 1) for p in recipe.split(","))
        if "prefill_keep" not in parts:
            raise SystemExit(f"error: on-demand revival needs prefill_keep in {spec!r}")
        recipe = f"{recipe},prefill_revive={1 - float(parts['prefill_keep']):.6g}"
    return {"recipe": recipe, "ondemand": OnDemand(**kw)}


def variants(model, length: int, names: list[str] | None) -> dict[str, dict]:
    """name -> {"recipe": str | None, "gemfilter": GemFilter | None}: dense, the old cascade point, every
    shipped prefill=F point and the GemFilter points (``names`` picks some)."""
    shape = cost_shape(model)
    out: dict[str, dict] = {"dense": {"recipe": None}}
    old = token_recipe_for(shape, length, 0.85, extra=",token_adapt=0")
    out[str(old)] = {"recipe": str(old)}
    for c in prefill_choices():
        out[f"prefill={c['flops_kept']:g}"] = {"recipe": f"prefill={c['flops_kept']:g}"}
    for g in GEMFILTER:
        out[f"gemfilter:{g.layer}/{g.keep:g}"] = {"gemfilter": g}
    if names:
        missing = [n for n in names if n not in out and not n.startswith("prefill_keep=")]
        if missing:
            raise SystemExit(f"error: unknown variants {missing}; known: {', '.join(out)}")
        out = {"dense": out["dense"]} | {n: out.get(n, parse_ondemand(n)) for n in names}
    return out


def perplexity(model, split: str, length: int, continuation: int, examples: int, v: dict,
               stats: dict | None = None) -> float:
    """Perplexity of the continuation; an on-demand variant decodes it token by token and puts its mean
    tokens revived and revival FLOPs share (of a dense prefill) into ``stats``."""
    text = shared_data_dir() / "wikitext2" / f"{split}.txt"
    recipe, g = v.get("recipe"), v.get("gemfilter")
    factory = (lambda: make_context(recipe, model)) if recipe is not None else None
    runner = GemFilterModel(model, g) if g is not None else model
    if recipe is not None and "prefill_revive" in recipe:  # LazyLLM's aux cache, revived after token 1
        runner = RevivalModel(model)
    if v.get("ondemand") is not None:  # LazyLLM's revival on demand: one decode step at a time
        runner = OnDemandModel(model, v["ondemand"])
    result = evaluate_lm(runner, text, protocol="continue", context=length, continuation=continuation,
                         max_examples=examples, max_tokens=examples * (length + continuation), ctx_factory=factory,
                         stepwise=v.get("ondemand") is not None)
    if v.get("ondemand") is not None and stats is not None:
        shape, dense = cost_shape(model), RunContext()
        model(torch.zeros(1, length, dtype=torch.long), cache=model.new_cache(1, length), ctx=dense, last_only=True)
        shares = [work_cost(shape, w, dense=dense.work)["flops_kept"] if n else 0.0 for _, n, w in runner.revivals]
        stats.update(tokens_pruned=runner.revivals[0][0],
                     tokens_revived=sum(n for _, n, _ in runner.revivals) / len(runner.revivals),
                     revival_flops_share=sum(shares) / len(shares))
    return result.metric["value"]


def prefill_cost(model, ids: torch.Tensor, v: dict) -> dict:
    """FLOPs kept (work counters against a dense run of the prompt; the window's (w x L) scores added)
    and the KV bytes the prefill leaves (fp16) over a dense cache of the prompt."""
    shape = cost_shape(model)
    length = ids.shape[1]
    dense, dense_cache = RunContext(), model.new_cache(1, length)
    model(ids, cache=dense_cache, ctx=dense, last_only=True)
    cache, extra = model.new_cache(1, length), {}
    if v.get("gemfilter") is not None:
        g = v["gemfilter"]
        first, second = SelectionPass(g), RunContext()
        index = gemfilter_select(model, ids, g, first)
        model(torch.gather(ids, 1, index), positions=index, cache=cache, ctx=second, last_only=True)
        kept = sum(work_cost(shape, c.work, dense=dense.work)["flops_kept"] for c in (first, second))
        window_pairs = shape.heads * g.window * length
        extra = {"settings": dataclasses.asdict(g), "tokens_kept": int(index.shape[1])}
    else:
        ctx = make_context(v.get("recipe"), model)
        model(ids, cache=cache, ctx=ctx, last_only=True)
        kept = work_cost(shape, ctx.work, dense=dense.work)["flops_kept"]
        # on demand, what comes back depends on the decode steps (``perplexity`` reports it)
        revived = revive(model, cache, ctx) if pending_revival(ctx) is not None and not v.get("ondemand") else None
        if revived is not None:  # deferred work after the first token, not in the time to first token
            extra["revival_flops_share"] = work_cost(shape, revived.work, dense=dense.work)["flops_kept"]
        summary = ctx.summary().get("prefill", {}) if hasattr(ctx, "summary") else {}
        window_pairs = summary.get("window_pairs", 0)
        if summary:
            settings = {k: summary[k] for k in ("layer", "keep", "window", "sinks", "pool", "revive") if k in summary}
            if len(summary["schedule"]) > 1:
                settings["schedule"] = [list(p) for p in summary["schedule"]]
            extra |= {"settings": settings, "tokens_kept": summary["tokens_kept"]}
            if summary.get("tokens_revived"):
                extra["tokens_revived"] = summary["tokens_revived"]
    dense_flops = work_cost(shape, dense.work)["flops_useful"]
    window_flops = 2 * window_pairs * shape.head_dim  # the window's QK^T (its softmax sums are minor)
    out = {"flops_kept": kept + window_flops / dense_flops, "window_flops_share": window_flops / dense_flops,
           "kv_bytes_vs_dense": cache.bytes_held(fp_bytes=2) / dense_cache.bytes_held(fp_bytes=2), **extra}
    if "revival_flops_share" in out:  # prefill + revival: the work before a second token
        out["flops_with_revival"] = out["flops_kept"] + out["revival_flops_share"]
    return out


def search(model, args, length: int, continuation: int) -> dict:
    """The VALID grid behind prefill=F; with ``--ship`` its choices go to the package."""
    ids = torch.tensor([wikitext_ids(model.tokenizer, length, split="valid")])
    examples = args.ppl_examples
    dense = perplexity(model, "valid", length, continuation, examples, {})
    grid = []
    points = [f"prefill_keep={keep:g},prefill_layer={layer},prefill_window={w},prefill_pool={pool}"
              for layer in args.layers for keep in args.keep for w in args.windows for pool in args.pools]
    points += [f"prefill_keep={keep:g},prefill_layer={layer},prefill_window={w},prefill_pool={pool},"
               f"prefill_revive={r:g}" for layer in args.layers for keep in args.keep for w in args.windows
               for pool in args.pools for r in args.revive if keep + r <= 1 + 1e-9]
    if args.revive_only:
        points = [p for p in points if "prefill_revive" in p]
    points += [f"prefill_schedule={s},prefill_window={w}" for s in args.schedules for w in args.windows]
    for recipe in points:
        v = {"recipe": recipe}
        cost = prefill_cost(model, ids, v)
        ppl = perplexity(model, "valid", length, continuation, examples, v)
        grid.append({"recipe": v["recipe"], **cost, "perplexity": ppl, "perplexity_cost": ppl / dense - 1})
        revival = f" (+{cost['revival_flops_share']:.3f} revival)" if "revival_flops_share" in cost else ""
        print(f"{v['recipe']:36s} flops kept {cost['flops_kept']:.3f}{revival}: perplexity {ppl:.3f} "
              f"({100 * (ppl / dense - 1):+.2f}%)", flush=True)
    choices = []
    for target in SHIP_TARGETS:
        fitting = [r for r in grid if r["flops_kept"] <= target + 0.005  # a revival is not what prefill=F runs
                   and "revival_flops_share" not in r]
        if fitting:
            best = min(fitting, key=lambda r: r["perplexity_cost"])
            c = {"flops_kept": round(target, 3), "measured_flops_kept": round(best["flops_kept"], 4),
                 "valid_perplexity_cost": round(best["perplexity_cost"], 5), **best["settings"]}
            if not choices or choices[-1]["measured_flops_kept"] != c["measured_flops_kept"]:
                choices.append(c)  # a larger target with the same best point adds nothing
    payload = {"mode": "search", "prompt_tokens": length, "data": "wikitext2/valid.txt",
               "perplexity_protocol": {"context": length, "continuation": continuation, "examples": examples},
               "dense_perplexity": dense, "grid": grid, "choices": choices,
               "command": "python -m benchmarks.prefill " + " ".join(args.argv)}
    print("wrote", save("prefill-search", payload, path=args.out))
    if args.ship:
        write_json_atomic(CHOICES_FILE, {
            "what": "prefill=F -> the point with the lowest WikiText-2 VALID perplexity cost among those "
                    "keeping <= F of the dense prefill FLOPs (SmolLM2-135M, 2048-token prompts)",
            "source": "benchmarks/results/prefill-search.json", "choices": choices})
        print("shipped", CHOICES_FILE)
    return payload


def hw_replay(model, args, length: int) -> dict:
    """SpAtten's model (``hw/``) on the workload traces of a dense and a pruned prefill of the same prompt
    (iteration 0 only: the summarization stage)."""
    from dynaprune.hw.params import build_configs
    from dynaprune.hw.spatten import simulate_spatten
    from dynaprune.hw.trace import read_trace, write_trace
    from dynaprune.prune.recipe import Recipe
    from dynaprune.runtime.pruning import PruningContext
    from dynaprune.runtime.trace import trace_rows

    shape = cost_shape(model)
    ids = torch.tensor([wikitext_ids(model.tokenizer, length)])
    cfg, energy = build_configs("spatten", {})
    out = {}
    for name, recipe in (("dense", ""), ("pruned", args.hw_recipe)):
        ctx = PruningContext(Recipe.parse(recipe), shape, trace=True, protect_first=0, protect_last=1)
        model(ids, cache=model.new_cache(1, length), ctx=ctx, last_only=True)
        path = Path(args.hw_trace_dir) / f"prefill-trace-{name}.csv"
        write_trace(path, trace_rows(ctx), config=f"dynaprune {recipe or 'dense'}".replace(",", ";"))
        result = simulate_spatten(read_trace(path), cfg, energy)
        out[name] = {"recipe": recipe or "dense", "trace": str(path), **result.to_json()}
        print(f"SpAtten on the {name} prefill: {result.cycles} cycles, {result.dram_bytes / 1e6:.1f} MB DRAM")
    d, p = out["dense"], out["pruned"]
    payload = {"mode": "hw", "prompt_tokens": length, "arch": "spatten", "simulated": out,
               "speedup_vs_dense": d["cycles"] / p["cycles"], "dram_bytes_vs_dense": p["dram_bytes"] / d["dram_bytes"],
               "command": "python -m benchmarks.prefill " + " ".join(args.argv)}
    print(f"SpAtten: x{payload['speedup_vs_dense']:.2f} cycles, DRAM {payload['dram_bytes_vs_dense']:.3f} of dense")
    print("wrote", save("prefill-hw", payload, path=args.out))
    return payload


def picture(rows: list[dict], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("token", "s"), ("prefill", "o"), ("gemfilter", "^"), ("revival", "D"), ("ondemand", "*")):
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.plot([100 * r["valid_perplexity_cost"] for r in pts], [r["speedup"] for r in pts], marker,
                    label=kind)
            for r in pts:
                ax.annotate(r["name"], (100 * r["valid_perplexity_cost"], r["speedup"]), fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axvline(2.0, color="grey", lw=0.5, ls=":")
    ax.set_xscale("symlog", linthresh=2)
    ax.set_xlabel("perplexity cost on WikiText-2 valid (%)")
    ax.set_ylabel("time-to-first-token speed-up vs dense")
    ax.set_title(f"SmolLM2-135M prefill, {length}-token prompt (CPU, shared machine)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--ppl-examples", type=int, default=3, help="VALID chunks of length + 128 for the perplexity")
    p.add_argument("--test-examples", type=int, default=3, help="TEST chunks (reported, never used to choose)")
    p.add_argument("--variants", default="", help="';'-separated variant names (default: all)")
    p.add_argument("--search", action="store_true", help="the VALID grid behind prefill=F (no timing)")
    p.add_argument("--ship", action="store_true", help="with --search: write the package's prefill_choices.json")
    p.add_argument("--hw", action="store_true", help="replay a traced prefill on SpAtten's model (hw/)")
    p.add_argument("--hw-recipe", default="prefill=0.7", help="--hw: the pruned recipe traced")
    p.add_argument("--hw-trace-dir", default="/tmp", help="--hw: where the (large) trace CSVs go")
    p.add_argument("--layers", default=",".join(map(str, SEARCH_LAYERS)), help="--search: prefill_layer values")
    p.add_argument("--keep", default=",".join(map(str, SEARCH_KEEP)), help="--search: prefill_keep values")
    p.add_argument("--windows", default=",".join(map(str, SEARCH_WINDOWS)), help="--search: prefill_window values")
    p.add_argument("--pools", default=",".join(map(str, SEARCH_POOLS)), help="--search: prefill_pool values")
    p.add_argument("--schedules", default="", help="--search: ';'-separated prefill_schedule values too")
    p.add_argument("--revive", default="", help="--search: prefill_revive values too (LazyLLM revival)")
    p.add_argument("--revive-only", action="store_true", help="--search: only the points with a revival")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    args.layers = [int(x) for x in args.layers.split(",")]
    args.keep = [float(x) for x in args.keep.split(",")]
    args.windows = [int(x) for x in args.windows.split(",")]
    args.pools = [int(x) for x in args.pools.split(",")]
    args.schedules = [x for x in args.schedules.split(";") if x]
    args.revive = [float(x) for x in args.revive.split(",") if x]
    threads = setup_threads(args.threads)
    length, continuation = (256, 16) if args.quick else (args.length, 128)  # 256: the shipped 128-query windows fit
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.ppl_examples = args.test_examples = 1
    model = load("smollm2-135m")
    c = model.config
    need = 2 * sum(t.numel() * 4 for t in model.parameters()) + 16 * length * max(c.intermediate, c.hidden) * 4
    check_memory(need + (1 << 28), f"prefill benchmark ({length} tokens)")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.search:
            return search(model, args, length, continuation)
        if args.hw:
            return hw_replay(model, args, length)
        found = variants(model, length, [n for n in args.variants.split(";") if n] or None)
        if args.quick:  # tiny prompts: the shipped points' windows and the GemFilter layers still fit
            found = {n: v for n, v in found.items() if not n.startswith("gemfilter")}
        ids = torch.tensor([wikitext_ids(model.tokenizer, length)])

        def prefill(v: dict, with_revival: bool = False):
            cache = model.new_cache(1, length)
            if v.get("gemfilter") is not None:
                return gemfilter_prefill(model, ids, cache, v["gemfilter"])
            ctx = make_context(v["recipe"], model) if v.get("recipe") else None
            out = model(ids, cache=cache, ctx=ctx, last_only=True)
            if with_revival:  # the deferred work: what a second token waits for
                revive(model, cache, ctx)
            return out

        timed = {n: (lambda v=v: prefill(v)) for n, v in found.items()}
        revived = [n for n, v in found.items() if "prefill_revive" in (v.get("recipe") or "") and not v.get("ondemand")]
        ondemand = [n for n, v in found.items() if v.get("ondemand") is not None]
        timed |= {f"{n} +revival": (lambda v=found[n]: prefill(v, True)) for n in revived}
        times = interleaved(timed, repeats)
        stats = {split: {n: {} for n in found} for split in ("valid", "test")}
        ppl = {split: {n: perplexity(model, split, length, continuation, ex, v, stats[split][n])
                       for n, v in found.items()}
               for split, ex in (("valid", args.ppl_examples), ("test", args.test_examples))}
        rows = []
        dense_s = times["dense"]["median_s"]
        for name, v in found.items():
            if name == "dense":
                continue
            cost = prefill_cost(model, ids, v)
            t = times[name]
            kind = "gemfilter" if v.get("gemfilter") else ("token" if name.startswith("token") else "prefill")
            kind = "revival" if name in revived else ("ondemand" if name in ondemand else kind)
            row = {"name": name, "kind": kind, "recipe": v.get("recipe"), **cost, "time_to_first_token": t,
                   "speedup": dense_s / t["median_s"], "speedup_range": [dense_s / t["max_s"], dense_s / t["min_s"]],
                   **({"prefill_and_revival_time": times[f"{name} +revival"],
                       "prefill_and_revival_speedup": dense_s / times[f"{name} +revival"]["median_s"]}
                      if name in revived else {}),
                   **({"ondemand": dataclasses.asdict(v["ondemand"]),
                       "valid_revival": stats["valid"][name], "test_revival": stats["test"][name]}
                      if name in ondemand else {}),
                   "valid_perplexity": ppl["valid"][name],
                   "valid_perplexity_cost": ppl["valid"][name] / ppl["valid"]["dense"] - 1,
                   "test_perplexity": ppl["test"][name],
                   "test_perplexity_cost": ppl["test"][name] / ppl["test"]["dense"] - 1}
            rows.append(row)
            print(f"{name:28s} flops kept {row['flops_kept']:.3f} KV {row['kv_bytes_vs_dense']:.3f}: TTFT "
                  f"x{row['speedup']:.2f} ({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}), valid "
                  f"{100 * row['valid_perplexity_cost']:+.2f}%, test {100 * row['test_perplexity_cost']:+.2f}%",
                  flush=True)
    print(f"dense TTFT {dense_s:.3f} s, perplexity valid {ppl['valid']['dense']:.3f} test {ppl['test']['dense']:.3f}")
    name = "prefill" if length == 2048 or args.quick else f"prefill-{length}"
    payload = {"quick": args.quick, "threads": threads, "model": "smollm2-135m", "prompt_tokens": length,
               "command": "python -m benchmarks.prefill " + " ".join(args.argv),
               "kind": "prefill into a fresh KV cache, logits of the last token, fp32 CPU",
               "perplexity_protocol": {"valid": "wikitext2/valid.txt", "test": "wikitext2/test.txt",
                                       "protocol": "continue", "context": length, "continuation": continuation,
                                       "valid_examples": args.ppl_examples, "test_examples": args.test_examples},
               "targets": "speedup >= 1.5 at valid cost <= 0.02; >= 2 at <= 0.05",
               "shipped_choices": [dict(c) for c in prefill_choices()],
               "dense": {"time_to_first_token": times["dense"], "valid_perplexity": ppl["valid"]["dense"],
                         "test_perplexity": ppl["test"]["dense"]},
               "rows": rows, "seconds": time.perf_counter() - t0}
    path = save(name, payload, path=args.out)
    if not args.quick:
        picture(rows, length, path.with_suffix(".png"))
    print("wrote", path)
    return payload


if __name__ == "__main__":
    main()

"""Per-chunk perplexity of pruned prefills on WikiText-2 (``continue``: ``length`` tokens prefilled, the
next 128 scored), for the one-shot revival (``prefill_revive``, ``runtime/revival.py``) and LazyLLM's
on-demand revival during decoding (``runtime/revival_on_demand.py``; Fu et al. 2024, Sec. 3.3-3.4).

Variants (``--variants``, ';'-separated):
- ``dense``: the prompt prefilled dense, the continuation teacher-forced in one pass (``eval.lm``);
- ``dense-stepwise``: the same, one token at a time (a check: equal to fp noise);
- a recipe (``prefill=0.7``, ``prefill_keep=0.5,...,prefill_revive=0.4``): pruned prefill, the one-shot
  revival if any, the continuation teacher-forced (what ``benchmarks/prefill.py`` measures);
- ``RECIPE@r=16,t=0,b=1,p=1,o=score``: the recipe's selection with every pruned token in the aux cache
  (``prefill_revive`` = 1 - keep, added), then 128 decode steps one token at a time, each reviving what
  its layer-s attention asks for (``OnDemand``: per_step r, threshold t, budget b, pool p; o=position:
  the earliest r each step, no score). Variants
  sharing a recipe share one prefill per chunk (the cache is copied for each).

Per chunk: perplexity and the cost over dense (the noise between chunks is the point of the per-chunk
view); overall: perplexity over all scored tokens. FLOPs: the pruned prefill's (time to first token,
``benchmarks.prefill.prefill_cost`` on chunk 0's prompt) and the revived work (mean over chunks), both
as shares of the dense prefill's; tokens revived per chunk. No timing (a contended machine).

    python -m benchmarks.prefill_ondemand --split valid --examples 8 --variants 'dense;prefill=0.7'
    python -m benchmarks.prefill_ondemand --merge VALID.json... TEST.json...  # side by side: prefill-ondemand.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import parser, save, setup_threads
from benchmarks.prefill import parse_ondemand, prefill_cost
from dynaprune import load
from dynaprune.eval.lm import read_tokens
from dynaprune.paths import shared_data_dir
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.revival import pending_revival, revive
from dynaprune.runtime.revival_on_demand import OnDemandState, OnDemandStep


def parse_variant(spec: str) -> dict:
    """``{"name", "recipe", "ondemand": OnDemand | None, "stepwise": bool}`` of one ``--variants`` item."""
    if spec in ("dense", "dense-stepwise"):
        return {"name": spec, "recipe": None, "ondemand": None, "stepwise": spec == "dense-stepwise"}
    v = parse_ondemand(spec)
    return {"name": spec, "recipe": v["recipe"], "ondemand": v.get("ondemand"), "stepwise": "ondemand" in v}


def pieces(model, split: str, length: int, continuation: int, examples: int) -> list[torch.Tensor]:
    """The chunks ``eval.lm``'s ``continue`` protocol scores (consecutive, from the split's start)."""
    size = length + continuation
    ids = torch.tensor(read_tokens(model, shared_data_dir() / "wikitext2" / f"{split}.txt", examples * size))
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][:examples]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), targets, reduction="sum"))


def teacher_forced(model, cache, last, cont) -> float:
    rest = model(cont[None, :-1], cache=cache)[0]
    return _nll(torch.cat([last, rest]), cont)


def stepwise(model, cache, last, cont, ctx_for_step=None) -> float:
    out = [last]
    for i in range(len(cont) - 1):
        ctx = ctx_for_step() if ctx_for_step is not None else None
        out.append(model(cont[None, i:i + 1], cache=cache, ctx=ctx)[0])
    return _nll(torch.cat(out), cont)


def run_chunk(model, piece: torch.Tensor, length: int, group: list[dict], shape, dense_work) -> dict:
    """name -> {"nll", ...} for the variants of ``group`` (one recipe: one prefill)."""
    prompt, cont = piece[None, :length], piece[length:]
    recipe = group[0]["recipe"]
    ctx = make_context(recipe, model) if recipe else None
    cache = model.new_cache(1, len(piece))
    last = model(prompt, cache=cache, ctx=ctx, last_only=True)[0]
    out = {}
    aux = None
    if any(v["ondemand"] is not None for v in group):
        aux = pending_revival(ctx).take_revival()
    for v in group:
        if v["ondemand"] is not None:
            c = copy.deepcopy(cache)
            state = OnDemandState(model, c, aux, v["ondemand"])
            work = RunContext().work
            nll = stepwise(model, c, last, cont, lambda s=state, w=work: OnDemandStep(s, w))
            share = work_cost(shape, state.revival_work, dense=dense_work)["flops_kept"] if state.revived else 0.0
            out[v["name"]] = {"nll": nll, "tokens_revived": state.revived, "pruned": int(aux.positions.shape[1]),
                              "revival_flops_share": share,
                              "revived_by_step_first8": [len(h) for h in state.history[:8]]}
        else:
            c = copy.deepcopy(cache) if len(group) > 1 else cache
            extra = {}
            stage = pending_revival(ctx) if ctx is not None else None
            if stage is not None:
                run = revive(model, c, ctx)
                if run is not None:
                    extra["tokens_revived"] = stage.tokens_revived
                    extra["revival_flops_share"] = work_cost(shape, run.work, dense=dense_work)["flops_kept"]
            nll = (stepwise if v["stepwise"] else teacher_forced)(model, c, last, cont)
            out[v["name"]] = {"nll": nll, **extra}
    return out


def merge(paths: list[str], out) -> dict:
    """The variants measured on both splits, VALID and TEST side by side (the TTFT FLOPs, revived work)."""
    runs: dict[str, dict] = {}
    for path in paths:  # several runs of a split: their variants together (the first run's dense: same chunks)
        data = json.loads(Path(path).read_text())
        if data["split"] in runs:
            runs[data["split"]]["variants"] = data["variants"] | runs[data["split"]]["variants"]
            runs[data["split"]]["command"] += " && " + data["command"]
        else:
            runs[data["split"]] = data
    valid, test = runs["valid"], runs["test"]
    rows = []
    for name, t in test["variants"].items():
        v = valid["variants"].get(name)
        if v is None or name == "dense":
            continue
        row = {"name": name, "recipe": t["recipe"], "ondemand": t.get("ondemand"),
               "ttft_flops_kept": t.get("ttft_flops_kept"), "kv_bytes_after_prefill": t.get("kv_bytes_after_prefill")}
        for split, r in (("valid", v), ("test", t)):
            row |= {f"{split}_perplexity": r["perplexity"], f"{split}_perplexity_cost": r["perplexity_cost"],
                    f"{split}_chunks": r["chunks"], f"{split}_chunk_cost_pct": r["chunk_cost_pct"],
                    f"{split}_revival_flops_share": r.get("revival_flops_share", 0.0),
                    f"{split}_tokens_revived_mean": r.get("tokens_revived_mean", 0)}
        rows.append(row)
        print(f"{name:64s} TTFT FLOPs {row['ttft_flops_kept']:.3f} revived {row['valid_revival_flops_share']:.3f}: "
              f"VALID {100 * row['valid_perplexity_cost']:+.2f}% TEST {100 * row['test_perplexity_cost']:+.2f}%")
    payload = {"model": "smollm2-135m", "prompt_tokens": valid["prompt_tokens"],
               "protocol": {"valid": valid["protocol"], "test": test["protocol"]},
               "dense": {"valid_perplexity": valid["variants"]["dense"]["perplexity"],
                         "test_perplexity": test["variants"]["dense"]["perplexity"]},
               "sources": [str(p) for p in paths], "commands": [valid["command"], test["command"]],
               "targets": "TTFT >= 1.5x at <= 2% on VALID and TEST; >= 2x at <= 5% (TTFT: benchmarks/prefill.py)",
               "rows": rows,
               "valid_only": {n: {k: r.get(k) for k in ("perplexity_cost", "ttft_flops_kept", "revival_flops_share",
                                                          "tokens_revived_mean", "ondemand")}
                              for n, r in valid["variants"].items() if n not in test["variants"]}}
    print("wrote", save("prefill-ondemand", payload, path=out))
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--merge", nargs="+", metavar="JSON", help="VALID and TEST outputs side by side")
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("--examples", type=int, default=8, help="chunks of length + 128")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--variants", default="dense", help="';'-separated (see the module docstring)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    threads = setup_threads(args.threads)
    specs = [parse_variant(s) for s in args.variants.split(";") if s]
    if specs[0]["name"] != "dense":
        specs.insert(0, parse_variant("dense"))
    groups: dict[tuple, list[dict]] = {}
    for v in specs:
        key = ("ondemand", v["recipe"]) if v["ondemand"] is not None else ("one", v["name"])
        groups.setdefault(key, []).append(v)
    model = load("smollm2-135m")
    shape = cost_shape(model)
    chunks = pieces(model, args.split, args.length, args.continuation, args.examples)
    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {v["name"]: [] for v in specs}
    ttft: dict[str, dict] = {}
    name = args.out.stem if args.out else f"prefill-ondemand-{args.split}"
    with torch.inference_mode():
        dense = RunContext()
        model(chunks[0][None, :args.length], cache=model.new_cache(1, args.length), ctx=dense, last_only=True)
        for v in specs:
            if v["recipe"] and v["recipe"] not in ttft:
                cost = prefill_cost(model, chunks[0][None, :args.length], {"recipe": v["recipe"]})
                ttft[v["recipe"]] = {k: cost[k] for k in ("flops_kept", "kv_bytes_vs_dense", "tokens_kept")
                                     if k in cost}
        for i, piece in enumerate(chunks):
            for group in groups.values():
                for n, r in run_chunk(model, piece, args.length, group, shape, dense.work).items():
                    rows[n].append(r)
            d = rows["dense"][-1]["nll"]
            print(f"chunk {i}: dense {math.exp(d / args.continuation):.3f}; " + ", ".join(
                f"{n} {100 * (math.exp((rs[-1]['nll'] - d) / args.continuation) - 1):+.2f}%"
                for n, rs in rows.items() if n != "dense"), flush=True)
            save(name, summary(args, argv, threads, specs, rows, ttft, time.perf_counter() - t0), path=args.out)
    payload = summary(args, argv, threads, specs, rows, ttft, time.perf_counter() - t0)
    for n, r in payload["variants"].items():
        print(f"{n:60s} ppl {r['perplexity']:.3f} cost {100 * r['perplexity_cost']:+.2f}% "
              f"(chunks mean {r['chunk_cost_mean_pct']:+.2f}% sd {r['chunk_cost_sd_pct']:.2f}) "
              f"ttft flops {r.get('ttft_flops_kept', 1.0):.3f} revived flops {r.get('revival_flops_share', 0):.3f}")
    print("wrote", save(name, payload, path=args.out))
    return payload


def summary(args, argv, threads, specs, rows, ttft, seconds) -> dict:
    n_cont = args.continuation
    dense = [r["nll"] for r in rows["dense"]]
    out = {}
    for v in specs:
        rs = rows[v["name"]]
        if not rs:
            continue
        nll = [r["nll"] for r in rs]
        chunk_cost = [100 * (math.exp((a - b) / n_cont) - 1) for a, b in zip(nll, dense, strict=False)]
        ppl = math.exp(sum(nll) / (n_cont * len(nll)))
        dense_ppl = math.exp(sum(dense[:len(nll)]) / (n_cont * len(nll)))
        row = {"recipe": v["recipe"], "chunks": len(rs), "perplexity": ppl, "perplexity_cost": ppl / dense_ppl - 1,
               "chunk_perplexity": [math.exp(x / n_cont) for x in nll], "chunk_cost_pct": chunk_cost,
               "chunk_cost_mean_pct": statistics.mean(chunk_cost),
               "chunk_cost_sd_pct": statistics.stdev(chunk_cost) if len(chunk_cost) > 1 else 0.0,
               "stepwise": v["stepwise"]}
        if v["ondemand"] is not None:
            row["ondemand"] = dataclasses.asdict(v["ondemand"])
        if v["recipe"] in ttft:
            row["ttft_flops_kept"] = ttft[v["recipe"]]["flops_kept"]
            row["kv_bytes_after_prefill"] = ttft[v["recipe"]].get("kv_bytes_vs_dense")
        if "revival_flops_share" in rs[0]:
            row["revival_flops_share"] = statistics.mean(r["revival_flops_share"] for r in rs)
            row["tokens_revived_mean"] = statistics.mean(r.get("tokens_revived", 0) for r in rs)
        if "pruned" in rs[0]:
            row["tokens_pruned"] = rs[0]["pruned"]
            row["revived_by_step_first8"] = rs[0]["revived_by_step_first8"]
        out[v["name"]] = row
    return {"model": "smollm2-135m", "split": args.split, "threads": threads, "prompt_tokens": args.length,
            "protocol": {"name": "continue", "context": args.length, "continuation": n_cont,
                         "data": f"wikitext2/{args.split}.txt", "examples": args.examples},
            "command": "python -m benchmarks.prefill_ondemand " + " ".join(argv), "seconds": seconds,
            "note": "no timing: FLOPs shares of the dense prefill; per-chunk costs show the noise",
            "variants": out}


if __name__ == "__main__":
    main()

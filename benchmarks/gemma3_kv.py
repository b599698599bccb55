"""KV results of the KV issue on Gemma 3 270M (issue 20): eviction, the packed quantized cache and
``kv_bytes=F`` on WikiText-2, ``lm --protocol continue`` (context 1536 + continuation 512, each chunk after
<bos> as ``eval.lm`` reads it), the first N chunks; JSON to ``benchmarks/results/gemma3-kv.json``.

    python -m benchmarks.gemma3_kv --split test --chunks 8 --threads 1

Each chunk's prompt (<bos> + 1536 tokens) is prefilled ONCE per scorer under ``kv_tokens=<prompt>,score=S,
kv_alloc=head`` (nothing evicted by the budget; the sliding layers still drop what left their 512-token
window, the scorer state following); every recipe evicts / packs a copy of that cache with the real stages
and teacher-forces the continuation on it (``calibrate/kv_bytes.evaluate``, the SmolLM2 rows' path).

What a budget means here (printed per row as ``held``): ``kv=F`` keeps F x the prompt's tokens in EVERY
layer; a sliding layer's dense cache already holds only 511 of them, so a budget above 511 leaves the
sliding layers as they are, and ``kv_bytes_vs_fp16`` (over the dense, windowed cache) is above F.
``kv_bytes=F`` expands to Gemma's own VALID choice (``benchmarks/gemma3_kv_search.py``), sized to that
windowed cache. The continuation's sliding windows go by original position, per KV head (``models/gemma3.py``;
rows recorded before that fix carry ``perplexity_slot_mask``, the model's former slot-based mask).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, setup_threads
from dynaprune.calibrate import kv_bytes
from dynaprune.io import write_json_atomic
from dynaprune.prune.techniques.kv_bytes import resolve_kv_bytes, shape_key
from dynaprune.runtime.pruning import make_context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
OUT = Path(__file__).resolve().parent / "results" / "gemma3-kv.json"
RECIPES = ("", *(f"kv={b},score={s},kv_alloc=head" for b in (0.5, 0.25, 0.125) for s in ("h2o", "observed")),
           "kv_bits=4", "kv_bits=2", "kv_bytes=0.25", "kv_bytes=0.125")


SHAPE = shape_key(18, 4, 1, 256)  # Gemma 3 270M's key in kv_bytes_choices.json


def expanded(recipe: str) -> str:
    """The composition a ``kv_bytes=F`` recipe runs: Gemma's own shipped choice (derived on Gemma VALID by
    ``benchmarks/gemma3_kv_search.py``), else the file's default (SmolLM2's)."""
    if recipe.startswith("kv_bytes="):
        return resolve_kv_bytes(float(recipe.split("=", 1)[1]), SHAPE)["recipe"]
    return recipe


def scorer_of(recipe: str) -> str:
    return next((item.split("=", 1)[1] for item in recipe.split(",") if item.startswith("score=")), "h2o")


def held_tokens(model, prefilled: list, recipe: str) -> dict[str, int]:
    """Tokens each kind of layer holds after the prompt's eviction (first chunk; max over its layers)."""
    cache, state, _, _ = prefilled[0]
    ctx, c = make_context(recipe, model), copy.deepcopy(cache)
    kv = next((s for s in getattr(ctx, "stages", ()) if s.name == "kv"), None)
    if kv is not None:
        kv.scores = copy.deepcopy(state)
    ctx.begin_forward(c)
    ctx.end_forward(c)
    cfg = model.config
    kinds = {"sliding": [i for i in range(cfg.layers) if cfg.is_sliding(i)],
             "global": [i for i in range(cfg.layers) if not cfg.is_sliding(i)]}
    return {k: max(int(c.lengths[i]) for i in layers) for k, layers in kinds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), help="'' is dense")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--per-chunk", action="store_true", help="low memory: one chunk's prefill at a time, every "
                   "recipe on it, then the next (the same numbers; JSON after each chunk)")
    p.add_argument("--merge", action="store_true", help="keep the rows already in --out (these replace theirs)")
    args = p.parse_args()
    threads = setup_threads(args.threads)
    from dynaprune.eval.lm import read_tokens
    from dynaprune.models import load

    model = load("gemma3-270m")
    text = DATA / f"{args.split}.txt"
    ids = torch.tensor(read_tokens(model, text, None))
    out = {"what": "Gemma 3 270M: perplexity vs K/V bytes (kv_bytes_vs_fp16 over the dense, windowed fp16 cache)",
           "model": "gemma3-270m", "protocol": "continue", "context": args.context, "continuation": args.continuation,
           "bos": "each chunk read after <bos> (prompt = <bos> + context tokens)", "split": args.split,
           "chunks": args.chunks, "machine": machine(), "threads": threads,
           "command": "python -m benchmarks.gemma3_kv " + " ".join(a if a else "''" for a in sys.argv[1:]),
           "kv_bytes_choices": f"shipped kv_bytes_choices.json, Gemma's own entry ({SHAPE}) when present",
           "rows": {}}
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        commands = old.get("commands", []) + [{"command": out["command"], "rows": args.recipes,
                                               "split": args.split, "chunks": args.chunks}]
        out = {**old, "rows": old.get("rows", {}), "commands": commands, "merged": out}
    if args.per_chunk:
        return per_chunk(model, ids, args, out)
    prefilled: dict[str, list] = {}
    t_all = time.perf_counter()
    for recipe in args.recipes:
        run = expanded(recipe)
        score = scorer_of(run)
        if score not in prefilled:
            t0 = time.perf_counter()
            prefilled[score] = kv_bytes.prefill_chunks(model, ids, args.context, args.continuation, args.chunks, score)
            print(f"prefill score={score}: {len(prefilled[score])} chunks, {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        row = kv_bytes.evaluate(model, prefilled[score], run)
        row.update(path="shared prefill per score (calibrate/kv_bytes.evaluate: windows by position)",
                   held=held_tokens(model, prefilled[score], run), seconds=round(time.perf_counter() - t0, 1))
        if run != recipe:
            row["expanded"] = run
        out["rows"][recipe or "dense"] = row
        out.update(seconds=round(time.perf_counter() - t_all, 1), load=load_average())
        write_json_atomic(args.out, out)
        print(f"{recipe or 'dense'}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f} held {row['held']} "
              f"({row['seconds']}s)", flush=True)


def per_chunk(model, ids: torch.Tensor, args, out: dict) -> None:
    """Every recipe on one chunk's prefill, chunk after chunk: perplexity from the summed NLL (each chunk's
    ``evaluate`` perplexity over its ``continuation`` tokens), bytes as the mean of equal-sized chunks."""

    size = args.context + args.continuation
    runs = {r: expanded(r) for r in args.recipes}
    sums = {r: {"nll": 0.0, "tokens": 0, "bytes": 0.0} for r in runs}
    t_all = time.perf_counter()
    for n, start in enumerate(range(0, min(len(ids) - size + 1, args.chunks * size), size), 1):
        piece = ids[start:start + size]
        for score in sorted({scorer_of(run) for run in runs.values()}):
            pre = kv_bytes.prefill_chunks(model, piece, args.context, args.continuation, 1, score)
            for recipe, run in runs.items():
                if scorer_of(run) != score:
                    continue
                row = kv_bytes.evaluate(model, pre, run)
                acc = sums[recipe]
                acc["nll"] += math.log(row["perplexity"]) * args.continuation
                acc["tokens"] += args.continuation
                acc["bytes"] += row["kv_bytes_vs_fp16"]
                if n == 1:
                    acc["held"] = held_tokens(model, pre, run)
            del pre
        for recipe, run in runs.items():
            acc = sums[recipe]
            out["rows"][recipe or "dense"] = {
                "perplexity": math.exp(acc["nll"] / acc["tokens"]), "kv_bytes_vs_fp16": acc["bytes"] / n,
                "held": acc["held"], "chunks": n, **({"expanded": run} if run != recipe else {}),
                "path": "per chunk: calibrate/kv_bytes.evaluate (windows by position) on each chunk's shared "
                        "prefill per score"}
        out.update(chunks_done=n, seconds=round(time.perf_counter() - t_all, 1), load=load_average())
        write_json_atomic(args.out, out)
        done = ", ".join(f"{r or 'dense'} {math.exp(a['nll'] / a['tokens']):.4f}" for r, a in sums.items())
        print(f"chunk {n}: {done}", flush=True)


if __name__ == "__main__":
    main()

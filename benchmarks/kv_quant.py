"""Perplexity vs K/V bytes of the quantized, packed KV cache (issue 14 items 3-4): ``kv_bits`` x ``kv_group``
x ``kv_residual`` on WikiText-2 (``lm --protocol continue``, context 1536 + continuation 512, first N chunks).

One process, the model loaded once. Every config starts from the same prompt: each chunk's context is
prefilled ONCE with the dense model (a recipe of kv_bits / kv_group / kv_residual alone does not change
the prompt's own forward, which attends in full precision before anything is packed), then per config
a copy of that cache gets the context's end-of-forward hooks (packing) and the continuation is
teacher-forced on it, exactly as ``dynaprune eval ... --protocol continue`` does; ``--check`` reruns
configs through ``run_task`` (the CLI's path) and records both perplexities. Recipes that evict
(``kv=``) change the prompt's forward (scores) and always go through ``run_task``.

    python -m benchmarks.kv_quant --split valid                      # the grid
    python -m benchmarks.kv_quant --split test --recipes kv_bits=4,kv_group=64 ...   # chosen configs
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import load_average, machine, setup_threads
from dynaprune.io import write_json_atomic
from dynaprune.runtime.attention import WorkCounter
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
OUT = Path(__file__).resolve().parent / "results" / "kv-quant.json"


def grid() -> list[str]:
    out = []
    for residual, bits, group in itertools.product((0, 64, 128), (2, 3, 4, 5, 6, 8), (32, 64, 128)):
        value_group = "" if group <= 64 else ",kv_value_group=64"  # head_dim 64: values per token in <= 64
        out.append(f"kv_bits={bits},kv_group={group}{value_group}" + (f",kv_residual={residual}" if residual else ""))
    return out


def prefill_chunks(model, path: Path, context: int, continuation: int, chunks: int) -> list[tuple]:
    """(cache after the dense prompt, logits predicting the first continuation token, continuation) per chunk."""
    from dynaprune.eval.lm import read_tokens

    ids = torch.tensor(read_tokens(model, path, None))
    size = context + continuation
    out = []
    with torch.inference_mode():
        for i in range(0, min(len(ids) - size + 1, chunks * size), size):
            piece = ids[i:i + size]
            cache = model.new_cache(1, size)
            last = model(piece[None, :context], cache=cache, last_only=True)[0]
            out.append((cache, last, piece[context:]))
    return out


def shared_prefill(model, prefilled: list[tuple], recipe: str) -> dict:
    """One config over every chunk, from copies of the prefilled caches."""
    nll, work, tokens = 0.0, WorkCounter(), 0
    with torch.inference_mode():
        for cache, last, cont in prefilled:
            ctx, c = make_context(recipe, model), copy.deepcopy(cache)
            ctx.begin_forward(c)
            ctx.end_forward(c)  # the prompt's end of forward: packing
            rest = model(cont[None, :-1], cache=c, ctx=ctx)[0]
            nll += float(F.cross_entropy(torch.cat([last, rest]).float(), cont, reduction="sum"))
            tokens += len(cont)
            work.merge(ctx.work)
    cost = work_cost(cost_shape(model), work)
    return {"perplexity": math.exp(nll / tokens), "kv_bytes_vs_fp16": cost["kv_bytes_vs_fp16"],
            "kv_bytes_held_vs_fp16": cost["kv_bytes_held_vs_fp16"], "path": "shared dense prefill"}


def via_run_task(model, path: Path, recipe: str, context: int, continuation: int, chunks: int) -> dict:
    from dynaprune.cli import run_task

    result = run_task("smollm2-135m", "lm", data=str(path), protocol="continue", context=context,
                      continuation=continuation, max_examples=chunks, recipe=recipe, model=model)
    cost = result.cost or {}
    return {"perplexity": result.metric["value"], "kv_bytes_vs_fp16": cost.get("kv_bytes_vs_fp16", 1.0),
            "kv_bytes_held_vs_fp16": cost.get("kv_bytes_held_vs_fp16", 1.0),
            "kv_bytes_kept": cost.get("kv_bytes_kept", 1.0), "path": "run_task (dynaprune eval)"}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("--recipes", nargs="*", help="default: the grid (bits x group x residual)")
    p.add_argument("--run-task", nargs="*", default=[], help="recipes evaluated through run_task (e.g. dense, kv=)")
    p.add_argument("--check", nargs="*", default=[], help="grid recipes also rerun through run_task")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    threads = setup_threads(a.threads)
    from dynaprune import load

    model = load("smollm2-135m")
    path = DATA / f"{a.split}.txt"
    recipes = a.recipes if a.recipes is not None else grid()
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    rows: dict[str, dict] = {}
    prefilled = prefill_chunks(model, path, a.context, a.continuation, a.chunks) if recipes else []
    progress(f"prefilled {len(prefilled)} chunks")
    previous, commands = {}, []
    if a.out.is_file():  # runs of other invocations (the other split, more configs) are kept
        import json

        old = json.loads(a.out.read_text())
        previous, commands = old.get("runs", {}), old.get("commands", [])
    command = "python -m benchmarks.kv_quant " + " ".join(sys.argv[1:])

    def save() -> None:  # after every config: a stopped sweep keeps what it measured
        payload = {
            "what": "perplexity vs K/V bytes (cost.kv_bytes_vs_fp16) of the packed quantized KV cache",
            "model": "smollm2-135m", "protocol": "continue", "context": a.context, "continuation": a.continuation,
            "chunks": a.chunks, "machine": machine(), "threads": threads,
            "commands": [*commands, {"command": command, "seconds": round(time.perf_counter() - t0, 1),
                                     "load": load_average()}],
            "runs": {**previous, a.split: {**previous.get(a.split, {}), **rows}},
        }
        write_json_atomic(a.out, payload)

    for r in recipes:
        rows[r] = shared_prefill(model, prefilled, r)
        progress(f"{r}: {rows[r]['perplexity']:.4f} at {rows[r]['kv_bytes_vs_fp16']:.4f}")
        save()
    del prefilled
    for r in a.check:
        rows[r]["run_task_perplexity"] = via_run_task(model, path, r, a.context, a.continuation, a.chunks)["perplexity"]
        progress(f"check {r}")
        save()
    for r in a.run_task:
        rows[r or "dense"] = via_run_task(model, path, "" if r == "dense" else r, a.context, a.continuation, a.chunks)
        progress(f"run_task {r}")
        save()
    for r, row in sorted(rows.items(), key=lambda kv: kv[1]["kv_bytes_vs_fp16"]):
        print(f"{r:55s} ppl {row['perplexity']:8.3f}  bytes {row['kv_bytes_vs_fp16']:.4f}"
              + (f"  run_task {row['run_task_perplexity']:.4f}" if "run_task_perplexity" in row else ""))


if __name__ == "__main__":
    main()

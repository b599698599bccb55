"""KV eviction alone (fp16): scorers x allocations x budgets on WikiText-2 (issue 14 items 1-2),
``lm --protocol continue`` (context 1536 + continuation 512, the first N chunks).

One process, the model loaded once. Each chunk's context is prefilled ONCE per scorer under
``kv_tokens=<context>,score=S,kv_alloc=head`` (nothing evicted: the prompt forward only gathers the
scorer's per-KV-head state); per config a copy of that cache and state gets the config's end-of-prompt
eviction (the real ``KVBudgetStage``: layer / head / Ada-KV, depth schedule, sinks, recent) and the
continuation is teacher-forced on it with dense attention (after the prompt nothing else is evicted
inside the one continuation forward). ``kv_alloc=layer`` here sums the per-head state over the heads,
a different float order than the real per-layer path: the chosen configs are rerun through ``run_task``
(the CLI's path, ``--check``) and on the test split only through ``run_task``.

    python -m benchmarks.kv_evict_grid --split valid                          # the grid
    python -m benchmarks.kv_evict_grid --split test --run-task kv=0.25,score=observed,kv_alloc=head ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, setup_threads
from benchmarks.kv_quant import via_run_task
from dynaprune.calibrate import kv_bytes
from dynaprune.io import write_json_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
OUT = Path(__file__).resolve().parent / "results" / "kv-evict.json"
SCORERS = ("h2o", "observed", "snapkv")
ALLOCS = ("layer", "head", "ada")
BUDGETS = (0.5, 0.25, 0.125, 0.0625)


def grid() -> list[str]:
    return [f"kv={b},score={s}" + (f",kv_alloc={a}" if a != "layer" else "")
            for b in BUDGETS for s in SCORERS for a in ALLOCS]


def scorer_of(recipe: str) -> str:
    return next(item.split("=", 1)[1] for item in recipe.split(",") if item.startswith("score="))


def prefill_chunks(model, path: Path, context: int, continuation: int, chunks: int, scorer: str,
                   store: Path | None = None) -> list[tuple]:
    """(cache after the prompt, the scorer's state, logits predicting the first continuation token,
    continuation) per chunk, the prompt run under ``score=scorer`` per KV head without eviction."""
    from dynaprune.eval.lm import read_tokens

    ids = torch.tensor(read_tokens(model, path, None))
    file = None if store is None else store / f"{path.stem}-{scorer}-{chunks}x{context}+{continuation}.pt"
    return kv_bytes.prefill_chunks(model, ids, context, continuation, chunks, scorer, file)


def shared_prefill(model, prefilled: list[tuple], recipe: str) -> dict:
    """One config over every chunk, from copies of the prefilled caches and scorer states (the same
    evaluation as ``dynaprune tune``'s search: ``calibrate/kv_bytes.evaluate``)."""
    row = kv_bytes.evaluate(model, prefilled, recipe)
    return {"perplexity": row["perplexity"], "kv_bytes_kept_vs_fp16": row["kv_bytes_vs_fp16"],
            "path": "shared prefill"}


PEERS = Path(__file__).resolve().parent / "results" / "peers" / "kvpress.json"
# kvpress 0.5.5 rows of issue 14's table (the same 8 TEST chunks) that peers/kvpress.json does not hold
ISSUE_TABLE = {"KVzip 0.25": 15.363, "KVzip 0.125": 16.572, "ObservedAttention 0.5": 14.914,
               "ObservedAttention 0.25": 15.597, "ObservedAttention 0.125": 16.538}


def peer_rows() -> dict:
    """kvpress's eviction-alone TEST rows beside ours: peers/kvpress.json, and issue 14's table."""
    import json

    rows = json.loads(PEERS.read_text())["rows"] if PEERS.is_file() else []
    measured = [{k: r.get(k) for k in ("press", "tokens_kept_share", "perplexity", "note")}
                for r in rows if r.get("peer") == "kvpress" and r.get("split") == "test"]
    return {"source": "benchmarks/results/peers/kvpress.json (peer=kvpress, test) and issue 14's table",
            "measured": measured, "issue_table": ISSUE_TABLE}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("--recipes", nargs="*", help="default: the grid (budgets x scorers x allocations)")
    p.add_argument("--run-task", nargs="*", default=[], help="recipes evaluated through run_task (dense: '')")
    p.add_argument("--check", nargs="*", default=[], help="grid recipes also rerun through run_task")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--prefill-store", type=Path, help="keep each prefill in this folder and reuse it")
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
    previous, commands = {}, []
    if a.out.is_file():  # runs of other invocations (the other split, more configs) are kept
        import json

        old = json.loads(a.out.read_text())
        previous, commands = old.get("runs", {}), old.get("commands", [])
    command = "python -m benchmarks.kv_evict_grid " + " ".join(sys.argv[1:])

    def save() -> None:  # after every config: a stopped sweep keeps what it measured
        payload = {
            "what": "perplexity of KV eviction alone (fp16) vs the share of the context's K/V kept",
            "model": "smollm2-135m", "protocol": "continue", "context": a.context, "continuation": a.continuation,
            "chunks": a.chunks, "machine": machine(), "threads": threads,
            "commands": [*commands, {"command": command, "seconds": round(time.perf_counter() - t0, 1),
                                     "load": load_average()}],
            "runs": {**previous, a.split: {**previous.get(a.split, {}), **rows}},
        }
        if a.split == "test":
            payload["kvpress"] = peer_rows()
        write_json_atomic(a.out, payload)

    for scorer in dict.fromkeys(scorer_of(r) for r in recipes):
        prefilled = prefill_chunks(model, path, a.context, a.continuation, a.chunks, scorer, a.prefill_store)
        progress(f"prefilled {len(prefilled)} chunks for score={scorer}")
        for r in (r for r in recipes if scorer_of(r) == scorer):
            rows[r] = shared_prefill(model, prefilled, r)
            progress(f"{r}: {rows[r]['perplexity']:.4f} kept {rows[r]['kv_bytes_kept_vs_fp16']:.4f}")
            save()
        del prefilled
    for r in a.check:
        rows[r]["run_task_perplexity"] = via_run_task(model, path, r, a.context, a.continuation, a.chunks)["perplexity"]
        progress(f"check {r}: {rows[r]['run_task_perplexity']:.4f}")
        save()
    for r in a.run_task:
        rows[r or "dense"] = via_run_task(model, path, r, a.context, a.continuation, a.chunks)
        progress(f"run_task {r}: {rows[r or 'dense']['perplexity']:.4f}")
        save()
    for r, row in rows.items():
        print(f"{r:60s} ppl {row['perplexity']:8.4f}" + (f"  run_task {row['run_task_perplexity']:.4f}"
                                                         if "run_task_perplexity" in row else ""))


if __name__ == "__main__":
    main()

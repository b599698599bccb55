"""``kv_bytes=F`` under the decode protocols (issue 14, "also report"): ``stream`` (WikiText-2 test streams
decoded one token at a time, the budget held throughout) and MT-Bench agreement (``generate``: greedy
first-turn answers against the dense answers), at the shipped ``kv_bytes`` choices.

    python -m benchmarks.kv_bytes_protocols stream --streams 4 --stream-tokens 4096   # kv_bytes=0.25, 0.125
    python -m benchmarks.kv_bytes_protocols mtbench --prompts 80 --max-new-tokens 128

Each run goes through ``run_task`` (what ``dynaprune eval`` runs). The packed cache keeps a dequantized
read copy (``runtime/kvquant.KEEP_READ_COPY``): the same values are read and the same bytes counted as
without it, but a CPU step does not dequantize the whole prefix again. The dense stream perplexity is
the ``window`` protocol over the same tokens (one forward; README: dense ``stream`` equals it). Results
(atomic, after every run, merged with earlier runs by recipe) record the command, split, the number of
streams / prompts really run and the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import load_average, machine, setup_threads
from dynaprune.io import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
OUT = {"stream": RESULTS / "kv-bytes-stream.json", "mtbench": RESULTS / "kv-bytes-mtbench.json"}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"


def _row(result, recipe: str, seconds: float) -> dict:
    cost = result.cost or {}
    row = {
        "recipe": recipe,
        "metric": result.metric,
        "n": result.n,
        "seconds": round(seconds, 1),
        "load": load_average(),
    }
    for key in ("kv_bytes_vs_fp16", "kv_bytes_held_vs_fp16", "kv_bytes_kept", "kv_budget_tokens"):
        if key in cost:
            row[key] = cost[key]
    recent = (cost.get("pruning") or {}).get("kv_recent")
    if recent is not None:  # recent_max (kv_bytes): the protected windows short prompts' budgets left
        row["kv_recent_window"] = recent
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("protocol", choices=("stream", "mtbench"))
    p.add_argument("--recipes", nargs="+", default=["kv_bytes=0.25", "kv_bytes=0.125"])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-dense", action="store_true", help="stream: skip the dense (window) reference")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--note", default="", help="recorded with the command (e.g. why a subset was run)")
    a = p.parse_args(argv)
    threads = setup_threads(a.threads)
    from dynaprune import load
    from dynaprune.cli_eval import run_task
    from dynaprune.runtime import kvquant

    kvquant.KEEP_READ_COPY = True
    out_path = a.out or OUT[a.protocol]
    model = load("smollm2-135m")
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    runs, commands = dict(old.get("runs", {})), list(old.get("commands", []))
    command = "python -m benchmarks.kv_bytes_protocols " + " ".join(argv if argv is not None else sys.argv[1:])
    t_all = time.perf_counter()
    if a.protocol == "stream":
        setting = {"split": "test", "data": str(DATA), "streams": a.streams, "stream_tokens": a.stream_tokens}
        todo = ([] if a.no_dense else ["dense"]) + a.recipes
    else:
        setting = {"data": "MT-Bench first turns", "prompts": a.prompts, "max_new_tokens": a.max_new_tokens}
        todo = a.recipes

    def save() -> None:  # re-read first: a run of other recipes side by side may have written its rows
        now = json.loads(out_path.read_text()) if out_path.is_file() else {}
        mine = {k: v for k, v in runs.items() if k not in old.get("runs", {}) or old["runs"][k] is not v}
        merged_runs = {**now.get("runs", {}), **mine}
        others = [c for c in now.get("commands", []) if c not in commands and c.get("command") != command]
        write_json_atomic(
            out_path,
            {
                "what": f"kv_bytes=F under the {a.protocol} protocol (issue 14)",
                "model": "smollm2-135m",
                "machine": machine(),
                "threads": threads,
                "read_copy": "runtime/kvquant.KEEP_READ_COPY (same values)",
                "commands": [
                    *commands,
                    *others,
                    {
                        "command": command,
                        "seconds": round(time.perf_counter() - t_all, 1),
                        "load": load_average(),
                        **setting,
                        **({"note": a.note} if a.note else {}),
                    },
                ],
                "runs": merged_runs,
            },
        )

    from dynaprune.errors import DynapruneError

    for recipe in todo:
        t0 = time.perf_counter()
        key = f"{recipe} | " + ",".join(f"{k}={v}" for k, v in setting.items() if k not in ("data", "split"))
        try:
            result = _run_one(a, recipe, run_task, model)
        except DynapruneError as e:  # e.g. a budget a short prompt cannot hold: recorded, the next recipe runs
            runs[key] = {"recipe": recipe, "error": str(e), "load": load_average(), **setting}
            print(f"{key}: refused: {e}", flush=True)
            save()
            continue
        runs[key] = {**_row(result, recipe, time.perf_counter() - t0), **setting}
        print(f"{key}: {json.dumps(runs[key]['metric'])[:200]} bytes {runs[key].get('kv_bytes_vs_fp16')}", flush=True)
        save()


def _run_one(a, recipe: str, run_task, model):
    """One recipe under the protocol of ``a`` (the dense stream: the window protocol over the same tokens)."""
    if a.protocol == "stream" and recipe == "dense":  # dense stream == window over the same tokens
        return run_task(
            "smollm2-135m",
            "lm",
            data=DATA,
            protocol="window",
            window=a.stream_tokens,
            max_examples=a.streams,
            model=model,
        )
    elif a.protocol == "stream":
        return run_task(
            "smollm2-135m",
            "lm",
            data=DATA,
            protocol="stream",
            stream_tokens=a.stream_tokens,
            max_examples=a.streams,
            recipe=recipe,
            model=model,
            **({"batch_size": a.batch_size} if a.batch_size else {}),
        )
    else:
        return run_task(
            "smollm2-135m",
            "generate",
            max_new_tokens=a.max_new_tokens,
            max_examples=a.prompts,
            recipe=recipe,
            model=model,
            **({"batch_size": a.batch_size} if a.batch_size else {}),
        )


if __name__ == "__main__":
    main()

"""``kv_bytes=F`` under the ``stream`` protocol on Gemma 3 270M (issue 20: every KV result on both decoders):
WikiText-2 test streams decoded one token at a time, the budget held throughout, through ``run_task`` (what
``dynaprune eval gemma3-270m lm --protocol stream`` runs; ``kv_bytes=F`` expands to Gemma's own choice).
The dense reference is the ``window`` protocol over the same tokens (one forward), as for SmolLM2
(``benchmarks/kv_bytes_protocols.py``). JSON, atomic, after every run:
``benchmarks/results/gemma3-stream.json``.

    python -m benchmarks.gemma3_stream --streams 1 --stream-tokens 2048 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import load_average, machine, setup_threads
from benchmarks.kv_bytes_protocols import DATA, _row
from dynaprune.io import write_json_atomic

OUT = Path(__file__).resolve().parent / "results" / "gemma3-stream.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipes", nargs="+", default=["dense", "kv_bytes=0.25", "kv_bytes=0.125"])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    threads = setup_threads(a.threads)
    from dynaprune import load
    from dynaprune.cli_eval import run_task

    model = load("gemma3-270m")
    setting = {"split": "test", "streams": a.streams, "stream_tokens": a.stream_tokens}
    out = {"what": "kv_bytes=F under the stream protocol on Gemma 3 270M (issue 20); dense = window protocol "
                   "over the same tokens", "model": "gemma3-270m", "machine": machine(), "threads": threads,
           "command": "python -m benchmarks.gemma3_stream " + " ".join(argv if argv is not None else sys.argv[1:]),
           **setting, "runs": {}}
    for recipe in a.recipes:
        t0 = time.perf_counter()
        if recipe == "dense":
            result = run_task("gemma3-270m", "lm", data=DATA, protocol="window", window=a.stream_tokens,
                              max_examples=a.streams, model=model)
        else:
            result = run_task("gemma3-270m", "lm", data=DATA, protocol="stream", stream_tokens=a.stream_tokens,
                              max_examples=a.streams, recipe=recipe, model=model)
        out["runs"][recipe] = {**_row(result, recipe, time.perf_counter() - t0), "expanded": result.recipe}
        out["load"] = load_average()
        write_json_atomic(a.out, out)
        print(f"{recipe}: {out['runs'][recipe]['metric']} bytes {out['runs'][recipe].get('kv_bytes_vs_fp16')}",
              flush=True)


if __name__ == "__main__":
    main()

"""Dense WikiText-2 test perplexity of Gemma 3 270M (issue 20) under the ``window`` and ``continue``
protocols, the model loaded once; JSON to ``benchmarks/results/gemma3-dense.json``.

    python -m benchmarks.gemma3_dense [--window-tokens 65536] [--examples 8] [--out PATH]

Each protocol is what ``dynaprune eval gemma3-270m lm ...`` runs (``eval.lm.evaluate_lm``): every window
or chunk starts with <bos> (Gemma needs it), so a 1024-token window scores 1024 targets.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, setup_threads
from dynaprune.eval.data import data_root
from dynaprune.eval.lm import evaluate_lm
from dynaprune.io import write_json_atomic
from dynaprune.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--window-tokens", type=int, default=65536, help="--max-tokens of the window protocol")
    ap.add_argument("--examples", type=int, default=8, help="--max-examples of the continue protocol")
    ap.add_argument("--out", default="benchmarks/results/gemma3-dense.json")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup_threads(args.threads)
    text = data_root() / "wikitext2" / "test.txt"
    t0 = time.perf_counter()
    model = load("gemma3-270m")
    loaded = time.perf_counter() - t0
    runs = {}
    for name, options in (
        ("window", dict(protocol="window", window=1024, max_tokens=args.window_tokens)),
        ("continue", dict(protocol="continue", context=1536, continuation=512, max_examples=args.examples)),
    ):
        res = evaluate_lm(model, text, **options,
                          progress=lambda done, total, name=name: print(f"{name} {done}/{total}", flush=True))
        runs[name] = {"options": options, "metric": res.metric, "n": res.n, "extra": res.extra,
                      "seconds": res.seconds,
                      "command": f"dynaprune eval gemma3-270m lm --data {text} " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in options.items())}
        print(name, res.metric["value"], f"{res.seconds:.0f}s", flush=True)
        save(args.out, runs, loaded)  # after each protocol: a stopped run keeps what it measured


def save(path: str, runs: dict, loaded: float) -> None:
    text = data_root() / "wikitext2" / "test.txt"
    out = {"benchmark": "gemma3-dense", "model": "gemma3-270m", "data": str(text), "machine": machine(),
           "load_average": load_average(), "load_seconds": loaded, "torch_threads": torch.get_num_threads(),
           "runs": runs, "command": "python -m benchmarks.gemma3_dense " + " ".join(sys.argv[1:]),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out)
    print(path, flush=True)


if __name__ == "__main__":
    main()

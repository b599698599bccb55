"""The prefill curve on Gemma 3 270M (issue 20): ``prefill=F`` (the shipped points, chosen on SmolLM2-135M
VALID) against dense, perplexity only (no timing), on WikiText-2 VALID and TEST; JSON to
``benchmarks/results/gemma3-prefill.json``.

    python -m benchmarks.gemma3_prefill --threads 1 [--length 2048] [--examples 3] [--recipes prefill=0.6 ...]

The protocol is ``benchmarks/prefill.py``'s perplexity cost: chunks of ``length`` + 128 tokens, the prompt
prefilled under the recipe (where pruning acts), the 128 teacher-forced on that cache (``eval.lm``'s
``continue``; Gemma reads each chunk after <bos>). FLOPs kept from the work counters against a dense run
of the same prompt (``prefill.prefill_cost``: every layer counted with its own window).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, setup_threads, wikitext_ids
from benchmarks.prefill import perplexity, prefill_cost
from dynaprune.io import write_json_atomic
from dynaprune.prune.techniques.prefill_window import prefill_choices

OUT = Path(__file__).resolve().parent / "results" / "gemma3-prefill.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipes", nargs="*", default=["prefill=0.6", "prefill=0.8"])
    p.add_argument("--length", type=int, default=2048, help="prompt tokens (after <bos>)")
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--examples", type=int, default=3, help="chunks per split")
    p.add_argument("--splits", default="valid,test")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--slot-window", action="store_true",
                   help="A/B only: sliding layers see the latest window survivors (the pre-fix mask), not positions")
    args = p.parse_args()
    threads = setup_threads(args.threads)
    from dynaprune.models import gemma3, load

    if args.slot_window:
        gemma3.sliding_window = lambda window, q_pos, k_pos: window

    model = load("gemma3-270m")
    out = {"what": "Gemma 3 270M prefill pruning: perplexity cost vs FLOPs kept (no timing)", "model": "gemma3-270m",
           "prompt_tokens": args.length, "machine": machine(), "threads": threads,
           "perplexity_protocol": {"protocol": "continue", "context": args.length, "continuation": args.continuation,
                                   "examples_per_split": args.examples, "bos": "each chunk read after <bos>"},
           "sliding_mask": "slots: latest window survivors (pre-fix A/B)" if args.slot_window
           else "original positions: p - window < pos <= p",
           "shipped_choices": [dict(c) for c in prefill_choices()],
           "choices_note": "prefill=F points were chosen on SmolLM2-135M VALID (prefill_choices.json), not on Gemma",
           "command": "python -m benchmarks.gemma3_prefill " + " ".join(sys.argv[1:]), "rows": {}}
    t_all = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([[model.tokenizer.bos_token_id, *wikitext_ids(model.tokenizer, args.length - 1)]])
        for name in ["dense", *args.recipes]:
            v = {} if name == "dense" else {"recipe": name}
            t0 = time.perf_counter()
            row = {split: perplexity(model, split, args.length, args.continuation, args.examples, v)
                   for split in args.splits.split(",")}
            if name != "dense":
                row.update(prefill_cost(model, ids, v))
                for split in args.splits.split(","):
                    row[f"{split}_cost"] = row[split] / out["rows"]["dense"][split] - 1
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out["rows"][name] = row
            out.update(seconds=round(time.perf_counter() - t_all, 1), load=load_average())
            write_json_atomic(args.out, out)
            print(name, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)


if __name__ == "__main__":
    main()

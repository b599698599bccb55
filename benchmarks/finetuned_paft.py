"""A longer pruning-aware fine-tune of given recipes on a fine-tuned classifier (benchmarks/finetuned.py
runs a short one): ``--rows`` TRAIN rows, one epoch with the recipe on, from the classifier; SST-2 dev
accuracy with the recipe (and dense) after, against the classifier's dense dev accuracy. One JSON,
rewritten after each recipe.

    python -m benchmarks.finetuned_paft --checkpoint DIR --recipes "token=0.526;block_sparsity=0.75" \
        --rows 4096 --lr 5e-5 --out benchmarks/results/encoder-finetuned/finetuned-full-paft.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import save, setup_threads
from benchmarks.finetuned import evaluate, paft
from dynaprune.eval.data import resolve_data_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--dev", default="sst2/dev.tsv")
    p.add_argument("--recipes", required=True, help="';'-separated recipes")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    threads = setup_threads(args.threads)
    import dynaprune

    model = dynaprune.load(str(args.checkpoint))
    training = json.loads((args.checkpoint / "config.json").read_text())["dynaprune"]["training"]
    dev = resolve_data_path(args.dev)
    dense = evaluate(model, dev, "")
    payload = {"command": "python -m benchmarks.finetuned_paft " + " ".join(sys.argv[1:]),
               "checkpoint": str(args.checkpoint), "threads": threads, "dev": str(dev), "dense": dense,
               "rows": args.rows, "lr": args.lr, "points": []}
    for recipe in [r.strip() for r in args.recipes.split(";") if r.strip()]:
        t0 = time.perf_counter()
        before = evaluate(model, dev, recipe)
        tuned, info = paft(model, recipe, training.get("data", "sst2/train.tsv"), args.rows, args.lr,
                           training.get("seed", 0))
        after = evaluate(tuned, dev, recipe)
        point = {"recipe": recipe, "dev": before,
                 "drop_points": round(100 * (dense["accuracy"] - before["accuracy"]), 2),
                 "paft": {**info, "dev": after, "dev_dense_after": evaluate(tuned, dev, ""),
                          "drop_points": round(100 * (dense["accuracy"] - after["accuracy"]), 2)},
                 "seconds": round(time.perf_counter() - t0, 1)}
        payload["points"].append(point)
        save("finetuned_paft", payload, path=args.out)
        print(f"{recipe}: {before['accuracy']:.4f} -> {after['accuracy']:.4f} (dense {dense['accuracy']:.4f})",
              flush=True)


if __name__ == "__main__":
    main()

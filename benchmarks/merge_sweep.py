"""STS-B with cascade token pruning: dropping vs merging (``token_policy=merge``), MiniLM mean-pooled, no
fine-tuning. One model load; the dense run and every recipe on the same pairs; Spearman x 100 and the
share of encoder FLOPs kept (``flops_kept``: useful FLOPs on real tokens, token_merge work included, over
the dense run's; ``flops_computed_kept``: what the padded batches computed, over the same dense figure).

Tune on TRAIN (``--data ../shared/data/stsb/train.tsv``, a seeded sample of ``--pairs``), report on dev:

    python -m benchmarks.merge_sweep --data ../shared/data/stsb/train.tsv --pairs 1500 \
        --out benchmarks/results/token-merge-train.json
    python -m benchmarks.merge_sweep --data ../shared/data/stsb/dev.tsv --recipes "A;B" \
        --out benchmarks/results/token-merge-stsb.json --plot benchmarks/results/token-merge-stsb.png
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynaprune import load
from dynaprune.cli_eval import run_task
from dynaprune.eval.data import load_sts
from dynaprune.io import write_json_atomic

DEFAULT_RECIPES = [
    "token=0.6", "token=0.6,token_policy=merge",
    "token_schedule=0:0.5", "token_schedule=0:0.5,token_policy=merge",
    "token_schedule=1:0.4", "token_schedule=1:0.4,token_policy=merge",
    "token_schedule=0:0.6/2:0.4", "token_schedule=0:0.6/2:0.4,token_policy=merge",
]


def policy_of(recipe: str) -> str:
    """The recipe's token_policy (drop when unset)."""
    return next((kv.split("=", 1)[1] for kv in recipe.split(",") if kv.startswith("token_policy=")), "drop")


def sample_pairs(data: Path, pairs: int | None, seed: int) -> Path:
    """A seeded sample of ``pairs`` pairs as a plain ``s1<TAB>s2<TAB>score`` file in a temporary folder
    (the whole file when ``pairs`` is None)."""
    rows = load_sts(data)
    if pairs is not None and pairs < len(rows):
        rows = random.Random(seed).sample(rows, pairs)
    out = Path(tempfile.mkdtemp()) / "pairs.tsv"
    out.write_text("".join(f"{p.s1}\t{p.s2}\t{p.score}\n" for p in rows), encoding="utf-8")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]["spearman"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, marker in (("drop", "o"), ("merge", "s"), ("tome", "^")):
        rows = [r for r in results["runs"] if r["policy"] == policy]
        ax.scatter([1 - r["flops_kept"] for r in rows], [r["spearman"] - dense for r in rows], marker=marker,
                   label=f"token_policy={policy}")
    ax.axhline(-0.5, color="grey", ls="--", lw=0.8, label="-0.5 point")
    ax.axvline(0.4, color="grey", ls=":", lw=0.8, label="40% FLOPs removed")
    ax.set_xlabel("share of encoder FLOPs removed (useful FLOPs, merge work counted)")
    ax.set_ylabel("Spearman x 100 minus dense")
    ax.set_title(f"MiniLM-L6 mean-pooled, {Path(results['data']).name} ({results['pairs']} pairs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=None, help="a seeded sample of this many pairs (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default=None, help="';'-separated recipes (default: a drop/merge grid)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(";") if r.strip()] if args.recipes else DEFAULT_RECIPES
    data = sample_pairs(args.data, args.pairs, args.seed)
    model = load("minilm-l6")
    command = "python -m benchmarks.merge_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"command": command,
                     "data": str(args.data), "pairs": len(load_sts(data)), "sample_seed": args.seed,
                     "model": "minilm-l6", "pooling": model.pooling, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "torch": torch.__version__, "threads": args.threads, "runs": [],
                     "load_at_start": os.getloadavg()}
    dense = run_task("minilm-l6", "sts", data=data, model=model)
    results["dense"] = {"spearman": 100 * dense.metric["value"], "seconds": dense.seconds}
    print(f"dense  spearman {results['dense']['spearman']:.2f}", flush=True)
    for recipe in recipes:
        r = run_task("minilm-l6", "sts", data=data, model=model, recipe=recipe)
        cost = r.cost
        row = {"recipe": recipe, "policy": policy_of(recipe),
               "spearman": 100 * r.metric["value"],
               "drop_points": results["dense"]["spearman"] - 100 * r.metric["value"],
               "flops_kept": cost["flops_kept"], "flops_removed": 1 - cost["flops_kept"],
               "flops_computed_kept": cost.get("flops_computed_kept"),
               "token_merge_share": cost["actual"]["flops"].get("token_merge", 0) / cost["dense"]["flops"]["total"],
               "tokens_per_layer": cost["actual"]["tokens_per_layer"], "seconds": r.seconds}
        results["runs"].append(row)
        print(f"{recipe:55s} spearman {row['spearman']:.2f} (drop {row['drop_points']:+.2f}) "
              f"FLOPs removed {row['flops_removed']:.3f} merge {row['token_merge_share']:.4f} {r.seconds:.0f}s",
              flush=True)
        write_json_atomic(args.out, results)  # a partial sweep still leaves its rows
    results["load_at_end"] = os.getloadavg()
    write_json_atomic(args.out, results)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()

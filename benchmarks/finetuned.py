"""SpAtten's and HDP's encoder claims where they were made: on a fine-tuned classifier (MiniLM on SST-2).

Loads the checkpoint `dynaprune finetune` wrote (default ~/.cache/dynaprune/finetuned/minilm-l6-sst2;
rebuild it with the command in its config.json, `dynaprune.training`), then on SST-2 dev:
  * dense accuracy;
  * token pruning at 1.9x fewer tokens after the last pruning layer (alive 1/1.9): the schedule picked
    among a few candidates on a held-out part of TRAIN (rows the fine-tune did not see), reported on dev;
  * HDP 75% block sparsity (block_sparsity=0.75, block_score=max);
  * a head-pruning curve (head=K);
  * the token and HDP points again after pruning-aware fine-tuning (`--paft-rows` training rows, one
    short epoch with the recipe on, starting from the fine-tuned classifier).
Writes benchmarks/results/encoder-finetuned/finetuned.json (+ .png).

    python -m benchmarks.finetuned [--checkpoint DIR] [--heldout 800] [--paft-rows 1024] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, save, setup_threads
from dynaprune.cli_eval import run_task
from dynaprune.eval.data import load_labeled_text, resolve_data_path

DEFAULT_CHECKPOINT = Path.home() / ".cache" / "dynaprune" / "finetuned" / "minilm-l6-sst2"
ALIVE = round(1 / 1.9, 3)  # SpAtten: 1.9x fewer tokens after the last pruning layer


def token_candidates(n_layers: int) -> list[str]:
    """The same survivors after the last pruning layer (``ALIVE`` from layer n-2 on), different shapes of
    the cascade: the default ``token=`` schedule and linear ramps starting at layer 1, n/2 or n-2."""
    last = max(0, n_layers - 2)
    out = [f"token={ALIVE}"]
    for start in sorted({min(1, last), n_layers // 2 if n_layers > 3 else last, last}):
        steps = list(range(start, last + 1))
        fractions = np.linspace(1, ALIVE, len(steps) + 1)[1:]
        out.append("token_schedule=" + "/".join(f"{i}:{f:.3f}" for i, f in zip(steps, fractions, strict=True)))
    return list(dict.fromkeys(out))
HDP = "block_sparsity=0.75,block_score=max"
# head=K prunes in the last layers only (cascade default); head_schedule=1:F prunes from layer 1 on
HEAD_CURVE = ["head=0.8", "head=0.6", "head=0.4", "head_schedule=1:0.75", "head_schedule=1:0.5",
              "head_schedule=1:0.25"]
HEAD_PAFT = "head_schedule=1:0.5"  # the head point fine-tuned with pruning on


def heldout_rows(training: dict, n: int, seed: int = 1) -> tuple[list[tuple[str, object]], bool]:
    """``n`` rows of the training file the fine-tune did not use (same seeded subset as read_training_data),
    and whether they were seen in training: a fine-tune on the whole file leaves no unseen row, and then
    ``n`` seeded TRAIN rows it did see stand in (still not dev; their accuracy is optimistic)."""
    rows = load_labeled_text(training["data"])
    used: set[int] = set(range(len(rows)))
    if training.get("rows") and training["rows"] < len(rows):
        used = set(np.random.default_rng(training["seed"]).choice(len(rows), training["rows"], replace=False).tolist())
    free = [i for i in range(len(rows)) if i not in used]
    seen = len(free) < n
    if seen:
        free = list(range(len(rows)))
    pick = np.random.default_rng(seed).permutation(len(free))[:n]
    return [(rows[free[i]].text, rows[free[i]].label) for i in sorted(pick)], seen


def evaluate(model, data: Path, recipe: str) -> dict:
    r = run_task(model.name, "classify", data=data, recipe=recipe, model=model)
    cost = r.cost or {}
    return {"recipe": recipe or "dense", "accuracy": r.metric["value"], "n": r.n,
            "flops_kept": cost.get("flops_kept", 1.0), "attention_flops_kept": cost.get("attention_flops_kept", 1.0),
            "seconds": r.seconds, "pruning": cost.get("pruning")}


def paft(model, recipe: str, train_path: str, rows: int, lr: float, seed: int) -> tuple[object, dict]:
    from dynaprune.finetune import FinetuneConfig, finetune, read_training_data

    tuned = copy.deepcopy(model)
    train, labels = read_training_data(train_path, max_rows=rows, seed=seed + 100)  # other rows than seed 0's
    cfg = FinetuneConfig(epochs=1, lr=lr, batch_size=32, seed=seed, pooling=tuned.head.pooling, recipe=recipe)
    t0 = time.perf_counter()
    rep = finetune(tuned, train, labels, None, cfg)
    return tuned, {"rows": rows, "lr": lr, "steps": rep.steps, "seconds": round(time.perf_counter() - t0, 1),
                   "steps_per_second": round(rep.steps_per_second, 3)}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = payload["dense"]["accuracy"]
    curve = sorted([payload["dense"], *payload["head_curve"]], key=lambda p: -p["flops_kept"])
    ax.plot([p["flops_kept"] for p in curve], [p["accuracy"] for p in curve], "o-", label="head pruning (no FT)")
    for key, marker in (("token", "s"), ("token_cascade", "D"), ("hdp", "^"), ("head_paft", "v")):
        point = payload[key]
        ax.plot(point["dev"]["flops_kept"], point["dev"]["accuracy"], marker, ms=9, label=f"{key} (no FT)")
        if point.get("paft"):
            ax.plot(point["paft"]["dev"]["flops_kept"], point["paft"]["dev"]["accuracy"], marker, ms=9,
                    mfc="none", label=f"{key} + pruning-aware FT")
    ax.axhline(dense, color="grey", lw=0.8, ls="--")
    ax.axhline(dense - 0.005, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("FLOPs kept (measured)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(f"{payload['checkpoint_name']} on SST-2 dev (dense {dense:.4f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dev", default="sst2/dev.tsv")
    p.add_argument("--heldout", type=int, default=800, help="held-out TRAIN rows to pick the token schedule on")
    p.add_argument("--paft-rows", type=int, default=1024, help="rows of the pruning-aware epoch (0: skip)")
    p.add_argument("--paft-lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 head points, 64 PAFT rows")
    p.add_argument("--out", type=Path, default=RESULTS / "encoder-finetuned" / "finetuned.json")
    args = p.parse_args()
    threads = setup_threads(args.threads)
    import dynaprune

    t_start = time.perf_counter()
    model = dynaprune.load(str(args.checkpoint))
    config = json.loads((args.checkpoint / "config.json").read_text())
    training = config.get("dynaprune", {}).get("training", {})
    dev = resolve_data_path(args.dev)
    candidates = token_candidates(model.config.num_layers)
    heads = HEAD_CURVE[::2] if args.quick else HEAD_CURVE
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "heldout.tsv"
        held_rows, held_seen = heldout_rows(training, args.heldout)
        held.write_text("".join(f"{t}\t{lab}\n" for t, lab in held_rows))
        dense_held = evaluate(model, held, "")
        tuning = [evaluate(model, held, r) for r in candidates]
    best = max(tuning, key=lambda x: (x["accuracy"], -x["flops_kept"]))
    dense = evaluate(model, dev, "")
    where = "TRAIN rows seen in fine-tuning (no unseen row left)" if held_seen else "held-out TRAIN rows"
    token = {"picked_on": f"{args.heldout} {where}", "heldout_seen_in_training": held_seen,
             "heldout_dense": dense_held, "candidates": tuning,
             "recipe": best["recipe"], "dev": evaluate(model, dev, best["recipe"])}
    cascade = candidates[0]  # the default cascade (token=K): most FLOPs removed, a separate PAFT point
    token_cascade = {"recipe": cascade, "dev": evaluate(model, dev, cascade)}
    hdp = {"recipe": HDP, "dev": evaluate(model, dev, HDP)}
    head_curve = [evaluate(model, dev, r) for r in heads]
    head_point = {"recipe": HEAD_PAFT, "dev": evaluate(model, dev, HEAD_PAFT)}
    paft_rows = 64 if args.quick else args.paft_rows
    points = [token, hdp, head_point] + ([token_cascade] if cascade != token["recipe"] else [])
    if paft_rows:
        for point in points:
            tuned, info = paft(model, point["recipe"], training.get("data", "sst2/train.tsv"), paft_rows,
                               args.paft_lr, training.get("seed", 0))
            point["paft"] = {**info, "dev": evaluate(tuned, dev, point["recipe"]),
                             "dev_dense_after": evaluate(tuned, dev, "")}
    for point in (*points, token_cascade, *([{"dev": h} for h in head_curve])):
        point["drop_points"] = round(100 * (dense["accuracy"] - point["dev"]["accuracy"]), 2)
        if point.get("paft"):
            point["paft"]["drop_points"] = round(100 * (dense["accuracy"] - point["paft"]["dev"]["accuracy"]), 2)
    payload = {
        "command": "python -m benchmarks.finetuned " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("quick",) and v is not None)
            + (" --quick" if args.quick else ""),
        "checkpoint": str(args.checkpoint), "checkpoint_name": args.checkpoint.name,
        "finetune": {k: training.get(k) for k in ("base_model", "rows", "epochs", "lr", "batch_size", "seed",
                                                   "steps", "seconds", "steps_per_second", "dev_accuracy")},
        "threads": threads, "dev": str(dev), "dense": dense, "token": token, "token_cascade": token_cascade,
        "hdp": hdp, "head_curve": head_curve, "head_paft": head_point,
        "targets": {"spatten_token_1.9x_max_drop_points": 0.5, "hdp_75_max_drop_points": 1.0,
                    "dense_min_accuracy": 0.88, "finetune_max_minutes_2_cores": 30},
        "seconds": round(time.perf_counter() - t_start, 1), "pid": os.getpid(),
    }
    out = save("finetuned", payload, path=args.out)
    plot(payload, out.with_suffix(".png"))
    print(f"dense {dense['accuracy']:.4f}  token {token['recipe']} {token['dev']['accuracy']:.4f}  "
          f"hdp {hdp['dev']['accuracy']:.4f}  -> {out}")


if __name__ == "__main__":
    main()

"""Issue 18: the recovery fine-tuning after the 30%-FFN least-squares refit (``static_ffn_refit.py``), chosen
WITHOUT SST-2 dev (pruning guide section 4: "fine-tune after pruning to recover accuracy"; KD from the dense
parent as CoFi / Sheared-LLaMA).

The refit model is built once per process exactly as ``static_ffn_refit.py`` builds it (Taylor on 256
held-out TRAIN rows, refit statistics from 1024 other TRAIN rows). Each ``--setting`` (rows, distill weight,
lr, warm-up) is then run for each ``--seeds`` seed from a copy of it. The recovery rows are a seeded subset of
SST-2 TRAIN *minus* the 256 criterion rows and the 800 selection rows (``rows=all``: every remaining row),
so the selection scores (agreement and KL with the dense parent, accuracy, on the 800 selection rows) are
on rows recovery never trained on. Selection rule, fixed before any run: the setting with the lowest
mean selection KL to the dense parent (ties within 5%: higher agreement). Dev is evaluated only with
``--dev`` (the chosen setting, 4 seeds). One JSON per setting, rewritten after every seed.

    python -m benchmarks.static_ffn_recovery --setting rows=24000,distill=0.5,lr=1e-4,warmup=0.06 \
        --seeds 100 [--dev] [--widths uniform] [--threads 1]
Writes benchmarks/results/static-ffn30-recovery-<setting>[-<widths>].json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, save, setup_threads
from benchmarks.static_accuracy import point
from benchmarks.static_ffn_refit import CHECKPOINT, parent_and_rows, select_scores

DEFAULTS = {"rows": "8000", "distill": "0.5", "lr": "1e-4", "warmup": "0.06", "temperature": "2"}


def parse_setting(text: str) -> dict:
    """``rows=24000,distill=0.5,lr=1e-4,warmup=0.06`` over DEFAULTS (rows may be ``all``)."""
    out = dict(DEFAULTS)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown setting key {key!r} (known: {', '.join(DEFAULTS)})")
        out[key] = value
    return out


def setting_name(s: dict) -> str:
    return f"r{s['rows']}-d{s['distill']}-lr{s['lr']}-w{s['warmup']}" + (
        f"-T{s['temperature']}" if s["temperature"] != DEFAULTS["temperature"] else "")


def recovery_pool(training: dict, exclude: set[str]):
    """Every TRAIN row whose text is not in ``exclude`` (the criterion and selection rows)."""
    from dynaprune.eval.data import load_labeled_text

    return [r for r in load_labeled_text(training["data"]) if r.text not in exclude]


def pick_rows(pool, rows: str, seed: int, labels):
    from dynaprune.finetune.data import TrainingData

    chosen = pool
    if rows != "all" and int(rows) < len(pool):
        chosen = [pool[i] for i in np.sort(np.random.default_rng(seed).choice(len(pool), int(rows), replace=False))]
    return TrainingData([r.text for r in chosen], labels.index(chosen, "recovery rows"), "sst2/train.tsv (pool)")


def global_ffn_removal(scores, ratio: float):
    from dynaprune.static.plan import ffn_to_remove_global

    return ffn_to_remove_global(scores, ratio)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--setting", action="append", required=True, help="rows=N|all,distill=W,lr=X,warmup=F")
    p.add_argument("--seeds", default="100")
    p.add_argument("--dev", action="store_true", help="also evaluate on SST-2 dev (the chosen setting only)")
    p.add_argument("--widths", default="uniform", choices=["uniform", "global"],
                   help="uniform: 30%% of every layer; global: one Taylor ranking across layers (30%% in all)")
    p.add_argument("--refit-rows", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the output file name")
    args = p.parse_args()
    threads = setup_threads(args.threads)
    import torch

    from dynaprune.eval.data import load_labeled_text, resolve_data_path
    from dynaprune.finetune import LabelMap
    from dynaprune.static import plan
    from dynaprune.static.criteria import FFN_CRITERIA
    from dynaprune.static.recover import RecoveryConfig, recover
    from dynaprune.static.refit import RefitConfig, prune_ffn_refit

    t0 = time.perf_counter()
    parent, training, rows = parent_and_rows(args.checkpoint, args.refit_rows)  # as static_ffn_refit.py
    seen, select, taken, refit_rows = rows["seen"], rows["select"], rows["taken"], rows["refit"]
    calib, rcal = rows["calib"], rows["refit_calib"]
    with torch.no_grad():
        dense_logits = parent.classify_logits([t for t, _ in select], None, batch_size=64)
    scores = FFN_CRITERIA["taylor"](parent, calib)
    removed = (plan.ffn_to_remove(scores, 0.3) if args.widths == "uniform" else global_ffn_removal(scores, 0.3))
    refit = copy.deepcopy(parent)
    layers = prune_ffn_refit(refit, rcal, removed, RefitConfig("output", 1e-3))
    record = {"removed_ffn_neurons": {str(k): len(v) for k, v in removed.items()},
              "params_parent": sum(q.numel() for q in parent.parameters()),
              "params": sum(q.numel() for q in refit.parameters())}
    before = select_scores(refit, select, dense_logits)
    print("refit", before, {k: len(v) for k, v in removed.items()}, file=sys.stderr, flush=True)
    labels = LabelMap(tuple(parent.head.labels), parent.head.label_type)
    pool = recovery_pool(training, taken)
    dev = resolve_data_path("sst2/dev.tsv")
    dev_lengths = [len(x) for x in parent.tokenize([r.text for r in load_labeled_text(dev)])] if args.dev else []
    dense = point(parent, parent, {"params": 0, "params_parent": 0}, dev, dev_lengths) if args.dev else None
    seeds = [int(s) for s in args.seeds.split(",")]
    for text in args.setting:
        s = parse_setting(text)
        name = setting_name(s) + ("" if args.widths == "uniform" else f"-{args.widths}") + args.tag
        out: dict = {
            "command": " ".join(["python -m benchmarks.static_ffn_recovery", *sys.argv[1:]]),
            "checkpoint": str(args.checkpoint), "threads": threads, "criterion": "taylor", "ffn": 0.3,
            "widths": args.widths, "removed_ffn_neurons": record["removed_ffn_neurons"],
            "refit": {"target": "output", "ridge": 1e-3, "rows": len(refit_rows), "layers": layers},
            "setting": s,
            "split": {"criterion": "256 held-out SST-2 TRAIN rows", "selection": "800 held-out SST-2 TRAIN rows",
                      "heldout_rows_seen_by_parent": seen,
                      "recovery": f"{s['rows']} SST-2 TRAIN rows (seeded per recovery seed) out of {len(pool)} "
                                  "= TRAIN minus the criterion and selection rows; 1 epoch",
                      "report": "SST-2 dev" if args.dev else "none (selection only)"},
            "selection_rule": "lowest mean selection KL to the dense parent (ties within 5%: higher agreement)",
            "refit_only": before, "runs": {}}
        if dense:
            out["dense"] = {"accuracy": dense["accuracy"], "n": dense["n"]}
        for seed in seeds:
            m = copy.deepcopy(refit)
            train = pick_rows(pool, s["rows"], seed, labels)
            cfg = RecoveryConfig(Path("sst2/train.tsv"), max_train=len(train.texts), lr=float(s["lr"]), seed=seed,
                                 distill=float(s["distill"]), temperature=float(s["temperature"]),
                                 warmup=float(s["warmup"]))
            run = {"recovery": recover(m, cfg, train=train, teacher=parent if cfg.distill else None)}
            run.update(select_scores(m, select, dense_logits))
            if args.dev:
                run["dev"] = point(parent, m, record, dev, dev_lengths)
                run["dev"]["drop_points"] = 100 * (dense["accuracy"] - run["dev"]["accuracy"])
            out["runs"][str(seed)] = run
            print(name, seed, {k: run[k] for k in ("select_accuracy", "select_agreement", "select_kl")},
                  run.get("dev", {}).get("accuracy"), run["recovery"]["seconds"], file=sys.stderr, flush=True)
            runs = list(out["runs"].values())
            out["mean"] = {k: float(np.mean([r[k] for r in runs])) for k in
                           ("select_accuracy", "select_agreement", "select_kl")}
            if args.dev:
                drops = [r["dev"]["drop_points"] for r in runs]
                out["mean"].update(dev_accuracy=float(np.mean([r["dev"]["accuracy"] for r in runs])),
                                   drop_points=float(np.mean(drops)), drop_points_std=float(np.std(drops, ddof=1))
                                   if len(drops) > 1 else None, drop_points_min=min(drops),
                                   drop_points_max=max(drops))
                out["limit_points"] = 0.5
                out["met_on_mean"] = out["mean"]["drop_points"] <= 0.5
            out["seconds"] = round(time.perf_counter() - t0, 1)
            save("static-ffn30-recovery", out, path=RESULTS / f"static-ffn30-recovery-{name}.json")
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Issue 18's accuracy targets for static structured pruning (pruning guide sections 4-5 and its table)
on a MiniLM classifier fine-tuned on SST-2, reported on SST-2 *dev*:
  * 40% of heads removed: <= 1 point; 30% of FFN neurons: <= 0.5 point;
  * combined (heads + FFN (+ layers)) at >= 2x fewer FLOPs than the dense parent: <= 2 points;
  * each without and with recovery fine-tuning (``static/recover.py``: a few thousand TRAIN rows, 1 epoch);
  * the combined model with the run-time recipe ``token=0.5`` on top (static + run-time), also after a
    recovery fine-tuning with ``token=0.5`` on (pruning-aware).
Criteria and the combined ratios are chosen on held-out SST-2 TRAIN rows (rows the classifier's fine-tune
did not use): ``--calib-rows`` feed the importance criteria, ``--select-rows`` score the choices; dev is
only evaluated for the chosen configurations. FLOP ratios are the parent's over the pruned model's dense
FLOPs (``runtime/cost.py``, per-layer shapes) on the dev sentences and at 128 tokens.

    python -m benchmarks.static_accuracy [--checkpoint DIR] [--recovery-rows 4000] [--threads 1] [--quick]
Writes benchmarks/results/static-accuracy.json (+ .png).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, save, setup_threads
from benchmarks.finetuned import heldout_rows  # the same held-out TRAIN rows as the encoder benchmark

DEFAULT_CHECKPOINT = Path.home() / ".cache" / "dynaprune" / "finetuned" / "minilm-l6-sst2-20k"
CRITERIA = ["taylor", "entropy", "confidence", "spatten", "magnitude"]
# (heads, ffn, layers, layer criterion) candidates for the combined target, at most ~0.5 of the parent's
# FLOPs at 128 tokens (5/6 x 0.58 ~ 4/6 x 0.74 ~ 0.5); those at <= 0.5 are scored on the held-out TRAIN rows
# and the best is taken.
COMBINED = [(0.5, 0.5, 0, "cosine"), (0.4, 0.6, 0, "cosine"), (0.3, 0.65, 0, "cosine"),
            (0.42, 0.42, 1, "cosine"), (0.42, 0.42, 1, "sensitivity"), (0.3, 0.5, 1, "sensitivity"),
            (0.27, 0.27, 2, "sensitivity"), (0.2, 0.35, 2, "sensitivity")]


def evaluate(model, data: Path, recipe: str) -> dict:
    from dynaprune.cli_eval import run_task

    r = run_task(model.name, "classify", data=data, recipe=recipe, model=model)
    cost = r.cost or {}
    return {"recipe": recipe or "dense", "accuracy": r.metric["value"], "n": r.n,
            "flops_kept": cost.get("flops_kept", 1.0), "seconds": r.seconds}


def flops(model, lengths: list[int]) -> int:
    from dynaprune.runtime.cost import cost_shape, dense_cost

    return dense_cost(cost_shape(model), lengths)["dense_flops"]["total"]


def accuracy(model, rows: list[tuple[str, object]], recipe: str = "") -> float:
    import torch

    logits = model.classify_logits([t for t, _ in rows], recipe or None, batch_size=64)
    gold = torch.tensor([model.head.labels.index(str(lab)) for _, lab in rows])
    return float((logits.argmax(1) == gold).float().mean())


def pruned(model, calib, heads: float, ffn: float, layers: int, criterion: str, layer_criterion: str = "cosine"):
    from dynaprune.static.prune import StaticConfig, prune_model

    m = copy.deepcopy(model)
    record = prune_model(m, calib, StaticConfig(heads=heads, ffn=ffn, layers=layers, criterion=criterion,
                                                layer_criterion=layer_criterion))
    return m, record


def point(parent, model, record: dict, dev: Path, dev_lengths: list[int], recipe: str = "") -> dict:
    r = evaluate(model, dev, recipe)
    static_kept = flops(model, dev_lengths) / flops(parent, dev_lengths)
    return {**r, "flops_kept_vs_pruned_dense": r["flops_kept"], "static_flops_kept": static_kept,
            "flops_kept_vs_parent": static_kept * r["flops_kept"],
            "static_flops_kept_128": flops(model, [128]) / flops(parent, [128]),
            "removed": {k: record[k] for k in ("removed_heads", "removed_ffn_neurons", "removed_layers")
                        if k in record},
            "params": record["params"], "params_parent": record["params_parent"]}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    dense = payload["dense"]["accuracy"]
    for i, (name, t) in enumerate(payload["targets"].items()):
        color = f"C{i}"
        ax.plot(t["dev"]["flops_kept_vs_parent"], t["dev"]["accuracy"], "o", color=color, label=f"{name}")
        if t.get("recovered"):
            ax.plot(t["recovered"]["dev"]["flops_kept_vs_parent"], t["recovered"]["dev"]["accuracy"], "o",
                    mfc="none", color=color, ms=9, label=f"{name} + recovery FT")
        labels = {"token": "+ token=0.5", "recovered_token": "+ FT + token=0.5",
                  "recovered_token_aware": "+ FT with token=0.5 on + token=0.5"}
        for key, marker in (("token", "s"), ("recovered_token", "D"), ("recovered_token_aware", "P")):
            if t.get(key):
                ax.plot(t[key]["flops_kept_vs_parent"], t[key]["accuracy"], marker, color=color,
                        label=f"{name} {labels[key]}")
    ax.axhline(dense, color="grey", lw=0.8, ls="--", label=f"dense {dense:.4f}")
    ax.set_xlabel("FLOPs kept vs the dense parent (SST-2 dev sentences)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(f"static pruning of {payload['checkpoint_name']}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dev", default="sst2/dev.tsv")
    p.add_argument("--train", default="sst2/train.tsv", help="recovery fine-tuning rows (TRAIN)")
    p.add_argument("--calib-rows", type=int, default=256, help="held-out TRAIN rows for the criteria")
    p.add_argument("--select-rows", type=int, default=800, help="held-out TRAIN rows scoring the choices")
    p.add_argument("--recovery-rows", type=int, default=4000)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--combined", default=None, metavar="H,F,L,LAYER_CRITERION",
                   help="fix the combined configuration (e.g. the one benchmarks/static.py timed: "
                        "0.42,0.42,1,sensitivity) instead of choosing among COMBINED")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 criteria, 64 rows, 64 recovery rows")
    p.add_argument("--out", type=Path, default=RESULTS / "static-accuracy.json")
    args = p.parse_args()
    threads = setup_threads(args.threads)
    import dynaprune
    from dynaprune.eval.data import load_labeled_text, resolve_data_path
    from dynaprune.static.calib import load_calibration
    from dynaprune.static.recover import RecoveryConfig, recover

    t_start = time.perf_counter()
    parent = dynaprune.load(str(args.checkpoint))
    training = json.loads((args.checkpoint / "config.json").read_text()).get("dynaprune", {}).get("training", {})
    n_calib, n_select = (64, 64) if args.quick else (args.calib_rows, args.select_rows)
    criteria = CRITERIA[:2] if args.quick else CRITERIA
    rec_rows = 64 if args.quick else args.recovery_rows
    free, seen = heldout_rows(training, n_calib + n_select)
    calib_rows, select = free[:n_calib], free[n_calib:]
    dev = resolve_data_path(args.dev)
    dev_lengths = [len(x) for x in parent.tokenize([r.text for r in load_labeled_text(dev)])]
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "calib.tsv"
        cal.write_text("".join(f"{t}\t{lab}\n" for t, lab in calib_rows))
        calib = load_calibration(parent, cal, max_examples=n_calib)
    payload: dict = {"command": " ".join(["python -m benchmarks.static_accuracy", *sys.argv[1:]]),
                     "checkpoint": str(args.checkpoint), "checkpoint_name": args.checkpoint.name,
                     "checkpoint_training": {k: v for k, v in training.items() if k != "history"},
                     "threads": threads, "split": {"report": "SST-2 dev", "calibration": f"{n_calib} held-out "
                     "SST-2 TRAIN rows", "selection": f"{n_select} other held-out SST-2 TRAIN rows",
                     "heldout_rows_seen_in_training": seen,
                     "recovery": f"{rec_rows} SST-2 TRAIN rows (seeded random), 1 epoch, lr {args.recovery_lr}"},
                     "dense": {**evaluate(parent, dev, ""), "select_accuracy": accuracy(parent, select)}}
    dense_sel = payload["dense"]["select_accuracy"]
    targets: dict = {}
    choice: dict = {}
    for name, (h, f) in (("heads40", (0.4, 0.0)), ("ffn30", (0.0, 0.3))):
        rows = []
        for crit in criteria if h else [c for c in criteria if c in ("taylor", "magnitude")] or criteria[:1]:
            m, _ = pruned(parent, calib, h, f, 0, crit)
            rows.append({"criterion": crit, "select_accuracy": accuracy(m, select)})
            print(name, rows[-1], file=sys.stderr, flush=True)
        best = max(rows, key=lambda r: r["select_accuracy"])
        choice[name] = (h, f, 0, best["criterion"], "cosine")
        targets[name] = {"heads": h, "ffn": f, "layers": 0, "criterion": best["criterion"], "layer_criterion": "cosine",
                         "selection": rows}
    crit = targets["heads40"]["criterion"] if targets["heads40"]["criterion"] in ("taylor", "magnitude") else "taylor"
    rows = []
    candidates = COMBINED[2:5] if args.quick else COMBINED
    if args.combined:
        h, f, n_layers, lc = args.combined.split(",")
        candidates = [(float(h), float(f), int(n_layers), lc)]
    for h, f, n_layers, lc in candidates:
        m, _ = pruned(parent, calib, h, f, n_layers, crit, lc)
        kept = flops(m, [128]) / flops(parent, [128])
        rows.append({"heads": h, "ffn": f, "layers": n_layers, "criterion": crit, "layer_criterion": lc,
                     "static_flops_kept_128": kept, "select_accuracy": accuracy(m, select) if kept <= 0.5 else None})
        print("combined", rows[-1], file=sys.stderr, flush=True)
    fits = [r for r in rows if r["select_accuracy"] is not None] or rows
    best = max(fits, key=lambda r: r["select_accuracy"] or 0)
    choice["combined"] = (best["heads"], best["ffn"], best["layers"], crit, best["layer_criterion"])
    targets["combined"] = {"heads": best["heads"], "ffn": best["ffn"], "layers": best["layers"], "criterion": crit,
                           "layer_criterion": best["layer_criterion"], "selection": rows}
    for name, (h, f, n_layers, c, lc) in choice.items():
        t = targets[name]
        m, record = pruned(parent, calib, h, f, n_layers, c, lc)
        t["dev"] = point(parent, m, record, dev, dev_lengths)
        t["dev"]["drop_points"] = 100 * (payload["dense"]["accuracy"] - t["dev"]["accuracy"])
        t["select_drop_points"] = 100 * (dense_sel - accuracy(m, select))
        if name == "combined":
            t["token"] = point(parent, m, record, dev, dev_lengths, "token=0.5")
            aware = copy.deepcopy(m)  # recovery with token=0.5 on (pruning-aware), from the same pruned model
            acfg = RecoveryConfig(Path(args.train), max_train=rec_rows, lr=args.recovery_lr, seed=100,
                                  recipe="token=0.5")
            t["recovery_token_aware"] = recover(aware, acfg)
            t["recovered_token_aware"] = point(parent, aware, record, dev, dev_lengths, "token=0.5")
            del aware
        rcfg = RecoveryConfig(Path(args.train), max_train=rec_rows, lr=args.recovery_lr, seed=100)
        t["recovery"] = recover(m, rcfg)
        t["recovered"] = {"dev": point(parent, m, record, dev, dev_lengths)}
        t["recovered"]["dev"]["drop_points"] = 100 * (payload["dense"]["accuracy"] - t["recovered"]["dev"]["accuracy"])
        if name == "combined":
            t["recovered_token"] = point(parent, m, record, dev, dev_lengths, "token=0.5")
        print(name, json.dumps({k: t[k] for k in ("dev", "recovered")})[:400], file=sys.stderr, flush=True)
    limits = {"heads40": 1.0, "ffn30": 0.5, "combined": 2.0}
    for name, t in targets.items():
        t["limit_points"] = limits[name]
        for key in ("dev", "recovered"):
            d = t[key] if key == "dev" else t[key]["dev"]
            ok = d["drop_points"] <= limits[name]
            if name == "combined":
                ok = ok and d["static_flops_kept"] <= 0.5
            t[f"met_{key}"] = ok
    payload["targets"] = targets
    payload["seconds"] = round(time.perf_counter() - t_start, 1)
    save("static-accuracy", payload, path=args.out)
    plot(payload, args.out.with_suffix(".png"))
    print(args.out)


if __name__ == "__main__":
    main()

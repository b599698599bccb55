"""Progressive quantization on SmolLM2: the LSB threshold calibrated on WikiText-2 VALID for target LSB
row rates, then perplexity and LSB row share on VALID and TEST (``continue`` protocol), dense beside it.

    python -m benchmarks.progressive_quant --examples 8 --context 1536 --continuation 512 [--ship]
    python -m benchmarks.progressive_quant --msb 4,3,2 --rates 0.05 --static 4,3,2 --splits test --ship \
        --dense test=14.563 --dense-source "kv-quant.json runs.test.dense (same 8 chunks)"   # issue 14

The thresholds are calibrated on VALID only (``--splits`` are the splits evaluated); TEST rows reuse
them as numbers. ``--static B,...`` adds
static ``quant=B`` rows (MSBs alone, no LSB) on every split. Every row records its split, the measured
share of rows that fetched LSBs and the load average.

Loads the model once; writes benchmarks/results/progressive-quant.json (atomic) after every run, with
the exact command, merged with the rows and tables already there (by split and recipe; by table key), so
runs of several settings side by side share the file. ``--ship`` merges the calibrated tables into the
package's lsb_thresholds.json. ``--calib-examples`` VALID chunks calibrate (default: ``--examples``);
``--rotate`` / ``--value-residual`` add ``quant_rotate`` / ``quant_value_residual=on`` to every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import load_average, setup_threads
from dynaprune import load
from dynaprune.calibrate.lsb import TABLE_KEY, calibrate_lsb, merge_table
from dynaprune.eval.lm import evaluate_lm
from dynaprune.io import write_json_atomic
from dynaprune.prune.techniques.progressive_quant import threshold_for_rate
from dynaprune.runtime.pruning import make_context, merge_summaries

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
PACKAGE_TABLE = Path(__file__).resolve().parents[1] / "src/dynaprune/prune/techniques/lsb_thresholds.json"


def _merged(path: str, mine: dict) -> dict:
    """``mine`` merged into the file at ``path``: its runs (by split and recipe) and tables (by key)
    replace the file's, the file's others stay; the commands accumulate."""
    old = json.loads(Path(path).read_text()) if os.path.isfile(path) else {}
    keys = {(r["split"], r["recipe"]) for r in mine["runs"]}
    runs = [r for r in old.get("runs", []) if (r["split"], r["recipe"]) not in keys] + mine["runs"]

    def same(a: dict, b: dict) -> bool:
        return all(a.get(k, d) == b.get(k, d) for k, d in TABLE_KEY)

    tables = [t for t in old.get("tables", []) if not any(same(t, m) for m in mine["tables"])] + mine["tables"]
    commands = [c for c in old.get("commands", []) if c != mine["command"]] + [mine["command"]]
    dense = {**old.get("dense", {}), **mine.get("dense", {})}
    return {**old, **mine, "runs": runs, "tables": tables, "commands": commands, "dense": dense}


def _calibrated(model, args, msb: int) -> dict:
    return calibrate_lsb(model, DATA / "valid.txt", msb, args.lsb, examples=args.calib_examples or args.examples,
                         context=args.context, continuation=args.continuation, rotate=args.rotate,
                         value_residual=args.value_residual)


def _shipped_table(msb: int, lsb: int, rotate: str, value_residual: bool) -> dict:
    tables = json.loads(PACKAGE_TABLE.read_text())["tables"]
    want = {"msb_bits": msb, "lsb_bits": lsb, "rotate": rotate, "value_residual": value_residual}
    found = [t for t in tables if all(t.get(k) == v for k, v in want.items())]
    if not found:
        sys.exit(f"error: {PACKAGE_TABLE.name} ships no table for {want}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--calib-examples", type=int, help="VALID chunks the calibration runs (default --examples)")
    parser.add_argument("--rotate", default="", help="quant_rotate=k|v|kv on every row")
    parser.add_argument("--value-residual", action="store_true", help="quant_value_residual=on on every row")
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--msb", default="4,3")
    parser.add_argument("--lsb", type=int, default=4)
    parser.add_argument("--rates", default="0.02,0.05,0.1")
    parser.add_argument("--splits", default="valid,test")
    parser.add_argument("--static", default="", help="static quant=B rows, e.g. 4,3,2")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dense", default="", help="dense perplexities already measured, e.g. valid=13.0088")
    parser.add_argument("--dense-source", default="", help="where --dense was measured (recorded)")
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--shipped", action="store_true",
                        help="reuse the table lsb_thresholds.json ships for the setting (calibrated on VALID) "
                             "instead of calibrating again")
    parser.add_argument("--out", default="benchmarks/results/progressive-quant.json")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    model = load(args.model)
    proto = dict(protocol="continue", context=args.context, continuation=args.continuation, max_examples=args.examples)
    out = {
        "command": "python -m benchmarks.progressive_quant " + " ".join(sys.argv[1:]),
        "model": args.model,
        "protocol": proto,
        "chunks": args.examples,
        "threads": threads,
        "calibration_split": "valid",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tables": [],
        "runs": [],
    }

    def run(split: str, recipe: str | None) -> dict:
        contexts: list = []

        def factory():
            contexts.append(make_context(recipe, model))
            return contexts[-1]

        t0 = time.time()
        result = evaluate_lm(model, DATA / f"{split}.txt", ctx_factory=factory if recipe else None, **proto)
        summary = merge_summaries(contexts) if recipe else {}
        row = {
            "split": split,
            "recipe": recipe or "dense",
            "chunks": args.examples,
            "perplexity": result.metric["value"],
            "lsb_row_fraction": summary.get("lsb_row_fraction"),
            "bits_fetched_vs_fp16": summary.get("bits_fetched_vs_fp16"),
            "key_bits_fetched_vs_fp16": summary.get("key_bits_fetched_vs_fp16"),
            "value_bits_fetched_vs_fp16": summary.get("value_bits_fetched_vs_fp16"),
            "lsb_threshold": summary.get("lsb_threshold"),
            "storage": "simulated" if recipe else None,
            "seconds": round(time.time() - t0, 1),
            "load": load_average(),
        }
        out["runs"].append(row)
        save()
        print(json.dumps(row), flush=True)
        return row

    def save() -> None:
        write_json_atomic(args.out, _merged(args.out, out))

    knobs = (f",quant_rotate={args.rotate}" if args.rotate else "") + (
        ",quant_value_residual=on" if args.value_residual else "")
    splits = args.splits.split(",")
    known = dict(item.split("=") for item in args.dense.split(",") if item)
    dense = {split: float(known[split]) if split in known else run(split, None)["perplexity"] for split in splits}
    out["dense"] = {
        split: {"perplexity": dense[split], "measured": "here" if split not in known else args.dense_source}
        for split in splits
    }
    for msb in (int(m) for m in args.msb.split(",")):
        if args.shipped:
            table = _shipped_table(msb, args.lsb, args.rotate, args.value_residual)
            out["tables"].append(table)
        else:
            table = _calibrated(model, args, msb)
            out["tables"].append(table)
            save()
            if args.ship:
                merge_table(PACKAGE_TABLE, table)
        for rate in (float(r) for r in args.rates.split(",")):
            threshold = threshold_for_rate(table, rate)
            for split in splits:  # the threshold as a number: the same on both splits, whatever is shipped
                row = run(split, f"quant={msb}+{args.lsb}@{threshold:.6g}{knobs}")
                row.update(target_rate=rate, vs_dense=row["perplexity"] / dense[split] - 1)
                save()
    for bits in (int(b) for b in args.static.split(",") if b):  # the MSBs alone, after the progressive rows
        for split in splits:
            row = run(split, f"quant={bits}{knobs}")
            row.update(vs_dense=row["perplexity"] / dense[split] - 1)
            save()


if __name__ == "__main__":
    main()

"""The wall time of a `dynaprune finetune` run and the load it ran under, as a results JSON.

The fine-tune prints a progress line every ~5% of its steps with the *cumulative* steps/s; from those
lines we recover the time of each report and so the rate of each interval. A sampler writing
``<unix time> <load1> <load5> <load15>`` lines while the run went (``--load-log``) gives the load of
each interval. The quiet-machine estimate is the steps over the fastest interval's rate (the one
with the lowest load), plus the dev evaluations the run did; it is an estimate, and says so.

    python -m benchmarks.finetune_record --checkpoint DIR --log train.log --load-log load.log \
        --start UNIX_TIME --out benchmarks/results/encoder-finetuned/finetune-full.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from dynaprune.io import write_json_atomic

LINE = re.compile(r"step (\d+)/(\d+)\s+epoch \d+\s+loss ([\d.]+)\s+lr \S+\s+([\d.]+) steps/s")


def intervals(log_text: str) -> list[dict]:
    """Per progress line: step, seconds since the start of training, and the interval's own rate."""
    out, prev_step, prev_t = [], 0, 0.0
    for m in LINE.finditer(log_text):
        step, rate = int(m.group(1)), float(m.group(4))
        t = step / rate if rate else 0.0
        if t > prev_t:
            out.append({"step": step, "seconds": round(t, 1), "loss": float(m.group(3)),
                        "interval_steps_per_second": round((step - prev_step) / (t - prev_t), 3)})
        prev_step, prev_t = step, t
    return out


def loads_between(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    inside = [load for t, load in samples if t0 <= t <= t1]
    return round(sum(inside) / len(inside), 2) if inside else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True, help="the fine-tune's stderr (plain progress lines)")
    ap.add_argument("--load-log", type=Path, required=True)
    ap.add_argument("--start", type=float, required=True, help="unix time the fine-tune command started")
    ap.add_argument("--command", default=None, help="the fine-tune command line, as run")
    ap.add_argument("--previous-log", type=Path, default=None,
                    help="the log of an earlier, abandoned attempt of the same command (its rates count too)")
    ap.add_argument("--note", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    config = json.loads((args.checkpoint / "config.json").read_text())
    training = config["dynaprune"]["training"]
    samples = []
    for line in args.load_log.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            samples.append((float(parts[0]), float(parts[1])))
    rows = intervals(args.log.read_text())
    # training starts after loading and tokenizing: align its clock to the end of the run (config mtime)
    end = (args.checkpoint / "config.json").stat().st_mtime
    t_train0 = end - training["seconds"]
    prev = 0.0
    for r in rows:
        r["load1_mean"] = loads_between(samples, t_train0 + prev, t_train0 + r["seconds"] + 30)
        prev = r["seconds"]
    evals = [h for h in training.get("history", [])]
    previous = intervals(args.previous_log.read_text()) if args.previous_log else []
    fastest = max(rows + previous, key=lambda r: r["interval_steps_per_second"]) if rows + previous else None
    quiet = None
    if fastest:
        quiet = round(training["steps"] / fastest["interval_steps_per_second"] + 15 * len(evals), 1)
    payload = {
        "command": args.command or training.get("command"),
        "record_command": "python -m benchmarks.finetune_record "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "checkpoint": str(args.checkpoint),
        "training": {k: v for k, v in training.items() if k != "history"},
        "dev_history": evals,
        "wall_seconds_total": round(end - args.start, 1),
        "train_seconds": training["seconds"],
        "load1_mean_during_run": loads_between(samples, args.start, end),
        "load1_max_during_run": max((lo for t, lo in samples if args.start <= t <= end), default=None),
        "intervals": rows,
        "previous_attempt_intervals": previous,
        "note": args.note,
        "quiet_estimate_seconds": quiet,
        "quiet_estimate_basis": ("steps / the fastest progress interval's rate (lowest load) + ~15 s per dev "
                                 "evaluation; an estimate, not a measurement on a quiet machine"),
        "cpus": 2, "threads": 2,
        "target": {"dev_accuracy_min": 0.88, "minutes_max_2_cores": 30},
    }
    write_json_atomic(args.out, payload)
    print(json.dumps({k: payload[k] for k in ("wall_seconds_total", "train_seconds", "load1_mean_during_run",
                                              "quiet_estimate_seconds")}))
    return payload


if __name__ == "__main__":
    main()

"""Wall-clock of a 4-point sweep (MiniLM, STS-B dev, 4 recipes) as Ray tasks on a local Ray of 1 and of 2
CPUs, and sequentially in this process; the metrics of the three must be equal.

    nice -n 5 .venv/bin/python -m benchmarks.ray_sweep --max-examples 300
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, machine, parser
from dynaprune.eval.sweep import RunSpec, read_results, run_sweep
from dynaprune.eval.sweep_ray import run_point, run_sweep_ray
from dynaprune.paths import shared_data_dir

RECIPES = ["dense", "token=0.5", "token=0.3", "head=0.8"]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--max-examples", type=int, default=300)
    args = p.parse_args(argv)
    args.out = args.out or Path(__file__).parent / "results" / "ray-sweep.json"
    import ray

    data = shared_data_dir() / "stsb" / "dev.tsv"
    grid = [RunSpec("minilm-l6", "sts", str(data), r, {"max_examples": args.max_examples}, line=i + 1)
            for i, r in enumerate(RECIPES)]
    runs, metrics = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(grid, Path(tmp) / "seq.jsonl", lambda spec: run_point(spec))
        runs["sequential, this process"] = time.perf_counter() - t0
        metrics["sequential"] = {r["recipe"]: r["metric"]["value"] for r in read_results(Path(tmp) / "seq.jsonl")}
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            t0 = time.perf_counter()
            run_sweep_ray(grid, Path(tmp) / f"ray{workers}.jsonl")
            runs[f"ray, {workers} worker(s)"] = time.perf_counter() - t0
            ray.shutdown()
            rows = read_results(Path(tmp) / f"ray{workers}.jsonl")
            metrics[f"ray{workers}"] = {r["recipe"]: r["metric"]["value"] for r in rows}
    equal = all(m == metrics["sequential"] for m in metrics.values())
    record = {"command": " ".join([sys.executable, *sys.argv]), "points": RECIPES, "task": "sts",
              "max_examples": args.max_examples, "seconds": {k: round(v, 2) for k, v in runs.items()},
              "speedup_2_vs_1": round(runs["ray, 1 worker(s)"] / runs["ray, 2 worker(s)"], 3),
              "metrics_equal": equal, "metrics": metrics, "load_average": load_average(), "machine": machine(),
              "note": "each Ray worker loads the model itself (one load per worker); the machine's 2 cores "
                      "are shared with other jobs, so the figure is a lower bound of what 2 free CPUs give"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp_path, args.out)
    print(json.dumps({k: record[k] for k in ("seconds", "speedup_2_vs_1", "metrics_equal", "load_average")}))


if __name__ == "__main__":
    main()

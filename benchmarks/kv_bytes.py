"""``kv_bytes=F`` (issue 14 item 5): the VALID search that ships ``kv_bytes_choices.json``, and the TEST
measurement of the shipped choices next to eviction alone and the peers (kvpress, transformers' quantized
cache), ``lm --protocol continue`` (context 1536 + continuation 512, the first N chunks).

    python -m benchmarks.kv_bytes search --chunks 2              # WikiText-2 VALID -> shipped JSON
    python -m benchmarks.kv_bytes test --chunks 8                # TEST via run_task -> results/kv-bytes.json
    python -m benchmarks.kv_bytes plot                           # results/kv-bytes.png
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.common import load_average, machine, setup_threads
from dynaprune.io import write_json_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "kv-bytes.json"
SEARCH_OUT = RESULTS / "kv-bytes-search.json"
FRACTIONS = (0.25, 0.125, 0.0625)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("search", "test", "plot"))
    p.add_argument("--chunks", type=int)
    p.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    p.add_argument("--extra", nargs="*", default=["kv=0.25,score=h2o,kv_alloc=head", ""],
                   help="test mode: recipes measured beside kv_bytes=F (eviction alone, dense '')")
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    if a.mode == "plot":
        from benchmarks.kv_bytes_plot import plot

        plot(OUT, RESULTS / "peers" / "kvpress.json", RESULTS / "kv-bytes.png")
        return
    threads = setup_threads(a.threads)
    from dynaprune import load

    model = load("smollm2-135m")
    t0 = time.perf_counter()
    command = "python -m benchmarks.kv_bytes " + " ".join(sys.argv[1:])

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    meta = {"model": "smollm2-135m", "protocol": "continue", "context": 1536, "continuation": 512,
            "machine": machine(), "threads": threads}
    if a.mode == "search":
        from dynaprune.calibrate.kv_bytes import search
        from dynaprune.prune.techniques.kv_bytes import shape_key, write_choices

        found = search(model, DATA / "valid.txt", a.fractions, chunks=a.chunks or 2, progress=progress)
        meta.update(split="valid", command=command, seconds=round(time.perf_counter() - t0, 1), load=load_average())
        write_json_atomic(SEARCH_OUT, {**meta, **found})
        from dynaprune.runtime.cost import cost_shape

        shape = cost_shape(model)
        choices_file = Path(__file__).resolve().parents[1] / "src/dynaprune/prune/techniques/kv_bytes_choices.json"
        write_choices(choices_file, shape_key(shape.layers, shape.heads, shape.kv_heads, shape.head_dim), found,
                      source="benchmarks/results/kv-bytes-search.json", command=command, default=True)
        return
    from benchmarks.kv_quant import via_run_task

    chunks = a.chunks or 8
    rows = json.loads(OUT.read_text())["rows"] if OUT.is_file() else {}
    recipes = [f"kv_bytes={f:g}" for f in a.fractions] + a.extra
    for r in recipes:
        row = via_run_task(model, DATA / "test.txt", r, 1536, 512, chunks)
        if r.startswith("kv_bytes="):
            from dynaprune.prune.recipe import Recipe

            row["expanded"] = str(Recipe.parse(r))
        rows[r or "dense"] = row
        progress(f"{r or 'dense'}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f}")
        write_json_atomic(OUT, {**meta, "split": "test", "chunks": chunks, "command": command,
                                "seconds": round(time.perf_counter() - t0, 1), "load": load_average(), "rows": rows})


if __name__ == "__main__":
    main()

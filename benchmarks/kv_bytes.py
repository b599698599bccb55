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
    p.add_argument("mode", choices=("search", "merge", "test", "plot"))
    p.add_argument("--part", type=Path, help="search: write this process's F to PATH instead of shipping")
    p.add_argument("parts", nargs="*", help="merge: the --part files; test: measure their choices too")
    p.add_argument("--chunks", type=int)
    p.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    p.add_argument("--extra", nargs="*", default=["kv=0.25,score=h2o,kv_alloc=head", ""],
                   help="test mode: recipes measured beside kv_bytes=F (eviction alone, dense '')")
    p.add_argument("--shared", action="store_true", help="test: prefill each chunk once per score= and evict/pack "
                   "copies (calibrate/kv_bytes.evaluate: the real stages) instead of run_task per recipe")
    p.add_argument("--out", type=Path, help="test: the JSON (default results/kv-bytes.json)")
    p.add_argument("--pairs", help="search: K:V bit pairs, e.g. 4:3,4:4 (default: calibrate/kv_bytes.BIT_PAIRS)")
    p.add_argument("--groups", help="search: stage-1 key groups, e.g. 64,128 (default calibrate/kv_bytes.GROUPS)")
    p.add_argument("--prefill-store", type=Path, help="search / test --shared: keep each prefill in this folder "
                   "and reuse it (one file per text, score, chunks)")
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
        from dynaprune.calibrate import kv_bytes as searcher
        from dynaprune.calibrate.kv_bytes import search

        if a.pairs:  # a narrower search (a rerun on a loaded machine): K:V bit pairs, groups
            pairs = tuple(tuple(int(x) for x in p.split(":")) for p in a.pairs.split(","))
            searcher.BIT_PAIRS = pairs
        if a.groups:
            searcher.GROUPS = tuple(int(g) for g in a.groups.split(","))

        found = search(model, DATA / "valid.txt", a.fractions, chunks=a.chunks or 2, progress=progress,
                       store=a.prefill_store)
        meta.update(split="valid", command=command, seconds=round(time.perf_counter() - t0, 1), load=load_average())
        if a.part is not None:  # one F per process on a loaded machine; `merge` ships them together
            write_json_atomic(a.part, {**meta, **found})
            return
        ship({**meta, **found}, model)
        return
    if a.mode == "merge":
        parts = [json.loads(Path(f).read_text()) for f in a.parts]
        merged = {**parts[0], "choices": [c for p in parts for c in p["choices"]],
                  "tried": {k: v for p in parts for k, v in p["tried"].items()},
                  "command": [p["command"] for p in parts], "seconds": [p["seconds"] for p in parts]}
        ship(merged, model)
        return
    from benchmarks.kv_quant import via_run_task

    chunks = a.chunks or 8
    out = a.out or OUT
    rows = json.loads(out.read_text())["rows"] if out.is_file() else {}
    recipes = [f"kv_bytes={f:g}" for f in a.fractions] + a.extra
    labels = {r: r for r in recipes}
    for part in a.parts:  # a search part's choice, measured before the parts are merged and shipped
        for c in json.loads(Path(part).read_text())["choices"]:
            recipes.append(c["recipe"])
            labels[c["recipe"]] = f"kv_bytes={c['kv_bytes']:g}"
    shared = shared_prefill_rows(model, recipes, chunks, progress, a.prefill_store) if a.shared else {}
    for r in recipes:
        row = shared[r] if a.shared else via_run_task(model, DATA / "test.txt", r, 1536, 512, chunks)
        if labels[r].startswith("kv_bytes="):
            from dynaprune.prune.recipe import Recipe

            row["expanded"] = str(Recipe.parse(r))
        rows[labels[r] or "dense"] = row
        progress(f"{labels[r] or 'dense'}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f}")
        write_json_atomic(out, {**meta, "split": "test", "chunks": chunks, "command": command,
                                "seconds": round(time.perf_counter() - t0, 1), "load": load_average(), "rows": rows})


def shared_prefill_rows(model, recipes: list[str], chunks: int, progress, store: Path | None = None) -> dict[str, dict]:
    """Each recipe from a shared per-score prefill of the TEST chunks (see calibrate/kv_bytes.py)."""
    import torch

    from dynaprune.calibrate.kv_bytes import evaluate, prefill_chunks
    from dynaprune.eval.lm import read_tokens
    from dynaprune.prune.recipe import Recipe

    ids = torch.tensor(read_tokens(model, DATA / "test.txt", None))
    by_score: dict[str, list[str]] = {}
    for r in recipes:
        by_score.setdefault(Recipe.parse(r).scorer.name, []).append(r)
    out = {}
    for score, group in by_score.items():
        prefilled = prefill_chunks(model, ids, 1536, 512, chunks, score,
                                   None if store is None else store / f"test-{score}-{chunks}x1536+512.pt")
        progress(f"prefilled {len(prefilled)} chunks under score={score}")
        for r in group:
            out[r] = {**evaluate(model, prefilled, r), "path": "shared prefill per score (calibrate/kv_bytes.evaluate)"}
    return out


def ship(found: dict, model) -> None:
    """results/kv-bytes-search.json and the package's kv_bytes_choices.json (this model's shape, default)."""
    from dynaprune.prune.techniques.kv_bytes import shape_key, write_choices
    from dynaprune.runtime.cost import cost_shape

    write_json_atomic(SEARCH_OUT, found)
    shape = cost_shape(model)
    choices_file = Path(__file__).resolve().parents[1] / "src/dynaprune/prune/techniques/kv_bytes_choices.json"
    write_choices(choices_file, shape_key(shape.layers, shape.heads, shape.kv_heads, shape.head_dim), found,
                  source="benchmarks/results/kv-bytes-search.json", command=str(found["command"]), default=True)


if __name__ == "__main__":
    main()

"""Gemma 3 270M's own ``kv_bytes=F`` choices (issue 20), derived on WikiText-2 VALID, written into the
shipped ``kv_bytes_choices.json`` under Gemma's shape key (SmolLM2's entry and the file's default are
left as they are); TEST rows are ``benchmarks/gemma3_kv.py``'s.

    python -m benchmarks.gemma3_kv_search --chunks 2 --threads 1

The search of ``calibrate/kv_bytes.py`` (KVzip scores, ``kv_alloc=global_layer``, recent 32, whole key
groups packed), sized for what Gemma's dense cache holds: after the prompt a sliding layer holds the
context's last 511 tokens and a global layer all 1537 (<bos> + 1536), so the dense fp16 cache is
15 x 511 + 3 x 1537 = 12,276 token-layers, 0.444 of a full-attention cache. ``kv`` in a
``kv_alloc=global_layer`` recipe is a number of slots (18 x ``keep_count(kv, 1537)``) that one KVzip
ranking over every layer spreads, each layer capped at what it holds (a sliding layer at 384 = 3 whole
key groups of 128 of its 511); so ``kv`` here is not a share of the bytes: each composition's ``kv`` is
the largest whose packed bytes fit F x the dense windowed bytes (``measured`` says what it held). Prompts
are read after <bos> (``calibrate/kv_bytes.prefill_chunks``, ``requires_bos``); reconstruction respects
the sliding windows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, setup_threads
from benchmarks.gemma3_kv import DATA, SHAPE
from dynaprune.calibrate import kv_bytes as search
from dynaprune.calibrate.kv_bytes import evaluate, prefill_chunks
from dynaprune.io import write_json_atomic
from dynaprune.prune.techniques import kv_bytes as choices_mod

CHOICES = Path(choices_mod.__file__).with_name(choices_mod.CHOICES_NAME)
OUT = Path(__file__).resolve().parent / "results" / "gemma3-kv-search.json"
# (key bits, value bits) tried per F (as SmolLM2's search: its winners all rotate K and V)
PAIRS = {0.25: ((4, 4), (5, 4), (6, 4)), 0.125: ((3, 3), (4, 3), (4, 4)), 0.0625: ((2, 2), (3, 2), (3, 3))}
GROUPS = (128, 64)  # a sliding layer of 511 packs at most 384 of them in groups of 128, 448 in groups of 64
VARIANTS = ({"rotate": "kv", "scale_bits": 16},)
STAGE2 = ({"scale_bits": 8},)  # on the best two of stage 1


def composition(fraction: float, kb: int, vb: int, held: list[int], context: int, head_dim: int,
                group: int = 128, **extra) -> dict | None:
    """The recipe fields with the largest ``kv`` whose whole-group packed cache fits ``fraction`` of the
    dense windowed fp16 bytes (``held``: tokens each layer's dense cache holds after the prompt)."""
    c = {"key_bits": kb, "value_bits": vb, "group": group, "value_group": min(group, search.MAX_VALUE_GROUP),
         "alloc": "global_layer", "score": "kvzip", "recent": search.RECENT, "scale_bits": 16, "rotate": "",
         **extra}
    whole = group * 4
    per_token = search.packed_bytes(search.spec_of(c), whole, head_dim) / whole  # fp16-axis bytes per token
    slots = int(fraction * sum(held) * 2 * head_dim * 2 / per_token)  # token-layers that fit
    # no more than the whole key groups the layers hold: beyond them global_layer would keep a sliding
    # layer's partial group (its 127 oldest-ranked tokens) in fp16, over F
    slots = min(slots, sum(n // group * group for n in held))
    kv = search._share(slots // len(held), context)
    return None if kv is None else {**c, "kv": kv}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.125, 0.0625])
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--threads", type=int)
    p.add_argument("--store", type=Path, help="file keeping the VALID prefills (reused when present)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--choices", type=Path, default=CHOICES, help="the choices file to merge Gemma's entry into")
    p.add_argument("--no-write-choices", action="store_true")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    from dynaprune.eval.lm import read_tokens
    from dynaprune.models import load

    command = "python -m benchmarks.gemma3_kv_search " + " ".join(sys.argv[1:] if argv is None else argv)
    model = load("gemma3-270m")
    ids = torch.tensor(read_tokens(model, DATA / "valid.txt", None))
    t0 = time.perf_counter()
    if args.store is not None and args.store.is_file():
        pre = torch.load(args.store, weights_only=False)
    else:
        pre = prefill_chunks(model, ids, args.context, args.continuation, args.chunks, "kvzip")
        if args.store is not None:
            torch.save(pre, args.store)
    print(f"prefill: {len(pre)} chunks, {time.perf_counter() - t0:.0f}s", flush=True)
    held = [int(n) for n in pre[0][0].lengths]
    head_dim = model.config.head_dim
    found = {"context": args.context + 1, "continuation": args.continuation, "chunks": len(pre),
             "choices": [], "tried": {}, "held_per_layer": held,
             "dense_windowed_share_of_full": sum(held) / (len(held) * max(held))}
    found["dense_perplexity"] = round(evaluate(model, pre, "")["perplexity"], 4)
    print(f"dense {found['dense_perplexity']}", flush=True)
    out = {"what": "Gemma 3 270M kv_bytes=F search on WikiText-2 VALID (continue: <bos> + 1536 + 512)",
           "model": "gemma3-270m", "split": "valid", "command": command, "machine": machine(),
           "threads": threads, "found": found}
    for fraction in args.fractions:
        rows = []
        def measure(c: dict | None, fraction: float = fraction, rows: list = rows) -> None:
            if c is None:
                return
            recipe = search.recipe_of(c)
            t1 = time.perf_counter()
            row = {**c, "recipe": recipe, **evaluate(model, pre, recipe)}
            if row["kv_bytes_vs_fp16"] > fraction + 1e-9:  # refit once from the measured bytes
                c = {**c, "kv": math.floor(c["kv"] * fraction / row["kv_bytes_vs_fp16"] * 0.995 * 1e4) / 1e4}
                recipe = search.recipe_of(c)
                row = {**c, "recipe": recipe, **evaluate(model, pre, recipe)}
            row["fits"] = row["kv_bytes_vs_fp16"] <= fraction + 1e-9
            row["seconds"] = round(time.perf_counter() - t1, 1)
            rows.append(row)
            print(f"F={fraction} {recipe}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f}", flush=True)
            found["tried"][str(fraction)] = rows
            out.update(load=load_average(), seconds=round(time.perf_counter() - t0, 1))
            write_json_atomic(args.out, out)

        for kb, vb in PAIRS.get(fraction, PAIRS[0.125]):
            for group in GROUPS:
                for variant in VARIANTS:
                    measure(composition(fraction, kb, vb, held, args.context + 1, head_dim, group, **variant))
        stage1 = sorted((r for r in rows if r["fits"]), key=lambda r: r["perplexity"])[:2]
        for b in stage1:
            for change in STAGE2:
                measure(composition(fraction, b["key_bits"], b["value_bits"], held, args.context + 1, head_dim,
                                    b["group"], **{"rotate": b["rotate"], "scale_bits": b["scale_bits"], **change}))
        fits = sorted((r for r in rows if r["fits"]), key=lambda r: r["perplexity"])
        if fits:
            w = fits[0]
            found["choices"].append({"kv_bytes": fraction, "recipe": w["recipe"],
                                     "valid_perplexity": round(w["perplexity"], 4),
                                     "measured_kv_bytes_vs_fp16": round(w["kv_bytes_vs_fp16"], 5)})
    found["searched"] = (f"per F, bits (K, V) {({str(k): v for k, v in PAIRS.items()})} x key group "
                         f"{list(GROUPS)} x {list(VARIANTS)}, then the best 2 with {list(STAGE2)}, under score=kvzip,"
                         f"kv_alloc=global_layer,recent={search.RECENT}; kv = the "
                         "largest slot count whose packed bytes fit F of the dense WINDOWED fp16 cache "
                         "(sliding layers 511 tokens, global 1537)")
    out.update(load=load_average(), seconds=round(time.perf_counter() - t0, 1))
    write_json_atomic(args.out, out)
    if not args.no_write_choices and found["choices"]:
        entry = {k: v for k, v in found.items() if k != "tried"}
        choices_mod.write_choices(args.choices, SHAPE, entry, source=str(args.out.relative_to(Path.cwd()))
                                  if args.out.is_relative_to(Path.cwd()) else str(args.out),
                                  command=command, default=False)
    for c in found["choices"]:
        print(f"kv_bytes={c['kv_bytes']}: {c['recipe']} VALID {c['valid_perplexity']} at "
              f"{c['measured_kv_bytes_vs_fp16']}", flush=True)


if __name__ == "__main__":
    main()

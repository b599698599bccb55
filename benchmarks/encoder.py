"""MiniLM encoder with cascade token pruning vs our dense and transformers' dense, wall-clock.

Batch 32 of inputs of 128 / 256 / 512 tokens ([CLS] + WikiText-2 paragraphs cut to length + [SEP], no
padding). Recipes: the ``token=K`` whose schedule removes about 25 / 50 / 75% of the FLOPs at that
length (K bisected from the schedule; the FLOPs kept reported are the run's own work counter). The
pruned forward gathers the surviving tokens (every later layer's projections, attention and FFN run
on fewer rows), computes the column sums of the attention probabilities in blocks up to the last
pruning layer and runs SDPA after it. Dense ours, transformers' dense (AutoModel on the same
checkpoint) and every recipe are timed interleaved in one process; medians of ``--repeats``.

Figures: speed-up = our dense / pruned; flop_ratio = dense FLOPs / pruned FLOPs;
efficiency = speed-up / flop_ratio (target >= 0.85 at 512); vs_transformers = transformers / pruned
(target >= 1.8 at the recipe that halves the FLOPs).

``--policy merge`` times the same targets with ``token_policy=merge`` (pruned tokens merged into their
most similar kept token, proportional attention through SDPA's float mask; the similarity and merge
FLOPs are in flops_kept); ``both`` (default) times drop and merge rows side by side. ``--lengths``
limits the lengths (e.g. ``--lengths 512 --policy merge`` reruns only the merge rows at 512). Unless
``--out`` says otherwise a partial run writes its own file (:func:`default_name`: ``encoder-merge.json``,
``encoder-merge-vs-drop.json``, ...), never over the full run's ``encoder.json``.

    python -m benchmarks.encoder [--quick] [--repeats N] [--policy drop|merge|both] [--lengths 512]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import RESULTS, check_memory, interleaved, parser, save, setup_threads, token_recipe_for
from dynaprune import load
from dynaprune.paths import shared_data_dir
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context

LENGTHS = [128, 256, 512]
FLOPS_KEPT = [0.75, 0.5, 0.25]


def wikitext_batch(tokenizer, batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids: each row [CLS] + consecutive WikiText-2 paragraphs cut to length + [SEP]."""
    text = (shared_data_dir() / "wikitext2" / "test.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 200 and not p.strip().startswith("=")]
    rows, i = [], 0
    while len(rows) < batch:
        ids: list[int] = []
        while len(ids) < length - 2:
            ids += tokenizer(paragraphs[i % len(paragraphs)], add_special_tokens=False)["input_ids"]
            i += 1
        rows.append([tokenizer.cls_token_id, *ids[: length - 2], tokenizer.sep_token_id])
    return torch.tensor(rows)


def default_name(policy: str, lengths: list[int] | None) -> str:
    """The results file's name: ``encoder`` for the full run (both policies, every length); a run of one
    policy ``encoder-merge`` / ``encoder-drop``; both policies at chosen lengths ``encoder-merge-vs-drop``."""
    if policy != "both":
        return f"encoder-{policy}"
    return "encoder" if lengths is None else "encoder-merge-vs-drop"


def memory_needed(batch: int, length: int, heads: int, hidden: int, ffn: int) -> int:
    """Rough peak bytes of one fp32 forward: eager attention probabilities (transformers' worst case)
    twice over, plus a few activations of the FFN width."""
    return 4 * (2 * batch * heads * length * length + 6 * batch * length * max(ffn, 3 * hidden)) + (1 << 28)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--policy", choices=("drop", "merge", "both"), default="both", help="token_policy of the rows")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    args = ap.parse_args(argv)
    threads = setup_threads(args.threads)
    batch, lengths, targets = (2, [32], [0.5]) if args.quick else (32, args.lengths or LENGTHS, FLOPS_KEPT)
    policies = ["drop", "merge"] if args.policy == "both" else [args.policy]
    repeats = 1 if args.quick else args.repeats
    ours = load("minilm-l6")
    cfg = ours.config
    check_memory(memory_needed(batch, max(lengths), cfg.num_heads, cfg.hidden_size, cfg.intermediate_size),
                 f"encoder benchmark (batch {batch} x {max(lengths)} tokens)")
    from transformers import AutoModel

    from dynaprune.models.registry import fetch

    theirs = AutoModel.from_pretrained(fetch("minilm-l6"), dtype=torch.float32).eval()
    shape = cost_shape(ours)
    t0 = time.perf_counter()
    rows = []
    for length in lengths:
        ids = wikitext_batch(ours.tokenizer, batch, length)
        mask = torch.ones_like(ids, dtype=torch.bool)
        recipes = [token_recipe_for(shape, length, f, "" if p == "drop" else ",token_policy=merge")
                   for p in policies for f in targets]
        fns = {"ours_dense": lambda: ours(ids, mask),  # noqa: B023
               "transformers_dense": lambda: theirs(input_ids=ids, attention_mask=mask.long())}  # noqa: B023
        for r in recipes:
            fns[str(r)] = lambda r=r: ours(ids, mask, ctx=make_context(r, ours))  # noqa: B023
        with torch.inference_mode():
            times = interleaved(fns, repeats)
            kept = {}
            for r in recipes:
                ctx = make_context(r, ours)
                ours(ids, mask, ctx=ctx)
                kept[str(r)] = work_cost(shape, ctx.work)["flops_kept"]
        dense_s, tf_s = times["ours_dense"]["median_s"], times["transformers_dense"]["median_s"]
        row = {"length": length, "batch": batch, "ours_dense": times["ours_dense"],
               "transformers_dense": times["transformers_dense"],
               "ours_vs_transformers_dense": tf_s / dense_s, "recipes": []}
        for target, r in zip(targets * len(policies), recipes, strict=True):
            t = times[str(r)]["median_s"]
            speedup, flop_ratio = dense_s / t, 1 / kept[str(r)]
            row["recipes"].append({"recipe": str(r), "policy": r.token_policy or "drop",
                                   "target_flops_kept": target, "flops_kept": kept[str(r)],
                                   "time": times[str(r)], "speedup": speedup, "flop_ratio": flop_ratio,
                                   "efficiency": speedup / flop_ratio, "vs_transformers": tf_s / t})
            print(f"L={length} {str(r):30s} flops kept {kept[str(r)]:.3f}: x{speedup:.2f} vs our dense "
                  f"(efficiency {speedup / flop_ratio:.2f}), x{tf_s / t:.2f} vs transformers")
        # merge rows beside their drop row (same target, same process): the merge's own time share
        drop_s = {e["target_flops_kept"]: e["time"]["median_s"] for e in row["recipes"] if e["policy"] == "drop"}
        for e in row["recipes"]:
            if e["policy"] != "drop" and e["target_flops_kept"] in drop_s:
                e["time_vs_drop"] = e["time"]["median_s"] / drop_s[e["target_flops_kept"]]
                print(f"L={length} {e['recipe']}: {e['time_vs_drop']:.3f} x the drop row's time")
        print(f"L={length} dense: ours {dense_s:.3f} s, transformers {tf_s:.3f} s")
        rows.append(row)
    payload = {"quick": args.quick, "threads": threads, "model": "minilm-l6", "batch": batch,
               "kind": "gathered tensors (token pruning), fp32 CPU",
               "targets": {"efficiency_at_512": 0.85, "vs_transformers_at_half_flops_512": 1.8},
               "results": rows, "seconds": time.perf_counter() - t0}
    payload["policy"], payload["lengths"] = args.policy, lengths
    out = args.out or RESULTS / f"{default_name(args.policy, args.lengths)}.json"
    print("wrote", save("encoder", payload, path=out))
    return payload


if __name__ == "__main__":
    main()

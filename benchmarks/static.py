"""Wall-clock of statically pruned models against their dense parent, in the same process, interleaved
(dense, pruned, dense, ... so load changes hit every variant alike), next to the FLOP ratio
(``runtime/cost.py``, per-layer shapes): issue 18's speed targets (pruning guide sections 4-5 and its
table: structured removal speeds real hardware; unstructured and N:M zeros do not without support).

* MiniLM classifier (SST-2), encoder forward, batch 32 x 128 and 8 x 512 tokens: the dense parent, the
  configurations of ``static-accuracy.json`` (heads40, ffn30, combined; same criteria and ratios, the
  criteria run on held-out SST-2 TRAIN rows), and combined + ``token=0.5`` (static + run-time);
* SmolLM2-135M, prefill of 1024 tokens and decode steps at 1024 cached tokens: dense vs the same
  configurations, criteria on WikiText-2 *valid* chunks;
* CPU, MiniLM 32 x 128: dense vs unstructured magnitude 50% and 2:4 zeros run by the dense kernels (same
  shapes) and by ``torch.sparse`` CSR matmuls (the only CPU sparse path in torch).

speedup = parent median / variant median; ``speedup_vs_flop_ratio`` = speedup / (parent FLOPs / variant
FLOPs) (issue target: >= 0.85 for structured removal).

    python -m benchmarks.static --threads 2 [--repeats 7] [--quick]
Writes benchmarks/results/static.json (+ .png).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import RESULTS, interleaved, parser, save, setup_threads, wikitext_ids
from benchmarks.static_accuracy import DEFAULT_CHECKPOINT, heldout_rows

DEFAULT_CONFIGS = {"heads40": (0.4, 0.0, 0, "taylor", "cosine"), "ffn30": (0.0, 0.3, 0, "taylor", "cosine"),
                   "combined": (0.4, 0.6, 0, "taylor", "cosine")}


def configs_from(path: Path) -> dict[str, tuple]:
    """(heads, ffn, layers, criterion, layer criterion) per target, as static-accuracy.json chose them (else
    the defaults)."""
    if not path.exists():
        return dict(DEFAULT_CONFIGS)
    targets = json.loads(path.read_text())["targets"]
    return {k: (t["heads"], t["ffn"], t["layers"], t["criterion"], t.get("layer_criterion", "cosine"))
            for k, t in targets.items()}


def prune_copy(model, calib, heads: float, ffn: float, layers: int, criterion: str, layer_criterion: str):
    from dynaprune.static.prune import StaticConfig, prune_model

    m = copy.deepcopy(model)
    prune_model(m, calib, StaticConfig(heads=heads, ffn=ffn, layers=layers, criterion=criterion,
                                       layer_criterion=layer_criterion))
    return m.eval()


def dense_flops(model, lengths: list[int], cached: list[int] | None = None, last_only: bool = False) -> int:
    from dynaprune.runtime.cost import cost_shape, dense_cost

    flops = dense_cost(cost_shape(model), lengths, cached)["dense_flops"]
    if last_only:  # prefill with last_only: logits of one position per sequence
        per_token = flops["lm_head"] // max(1, sum(lengths))
        return flops["total"] - flops["lm_head"] + per_token * len(lengths)
    return flops["total"]


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with W stored as a torch.sparse CSR matrix (zeros not stored)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_csr(model):
    m = copy.deepcopy(model)
    for _name, mod in list(m.layers.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, nn.Linear):
                setattr(mod, child, CSRLinear(sub))
    return m


def sparse_variants(model) -> dict:
    from dynaprune.static.criteria.magnitude import magnitude_prune
    from dynaprune.static.criteria.nm import apply_nm

    unstructured, nm = copy.deepcopy(model), copy.deepcopy(model)
    magnitude_prune(unstructured, 0.5, 1)
    apply_nm(nm, 2, 4)
    return {"unstructured50 (dense kernel)": unstructured, "2:4 (dense kernel)": nm,
            "unstructured50 (CSR)": to_csr(unstructured), "2:4 (CSR)": to_csr(nm)}


def time_encoder(parent, variants: dict, batch: int, length: int, repeats: int, token_of: set[str]) -> dict:
    from dynaprune.runtime.cost import cost_shape, work_cost
    from dynaprune.runtime.pruning import make_context

    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    parent_flops = dense_flops(parent, [length] * batch)
    fns, kept = {}, {}
    for name, m in {"dense": parent, **variants}.items():
        recipe = "token=0.5" if name in token_of else ""
        if recipe:
            ctx = make_context(recipe, m)
            with torch.inference_mode():
                m(ids, mask, ctx=ctx)
            kept[name] = work_cost(cost_shape(m), ctx.work)["flops_useful"] / parent_flops
        elif isinstance(getattr(m.layers[0], "qkv", None), CSRLinear) or "kernel" in name:
            kept[name] = 1.0  # same shapes: the FLOPs of the dense function (zeros multiplied or skipped)
        else:
            kept[name] = dense_flops(m, [length] * batch) / parent_flops

        def fn(m=m, recipe=recipe):
            with torch.inference_mode():
                m(ids, mask, ctx=make_context(recipe, m) if recipe else None)

        fns[name] = fn
    return finish(interleaved(fns, repeats), kept, {"batch": batch, "tokens": length})


def finish(times: dict, kept: dict, case: dict) -> dict:
    base = times["dense"]["median_s"]
    out = {**case, "variants": {}}
    for name, t in times.items():
        speedup = base / t["median_s"]
        out["variants"][name] = {**t, "flops_kept_vs_parent": kept[name], "flop_ratio": 1 / kept[name],
                                 "speedup": speedup, "speedup_vs_flop_ratio": speedup * kept[name]}
        print(f"{json.dumps(case)} {name:30s} {t['median_s'] * 1e3:9.2f} ms  x{speedup:5.2f}  "
              f"FLOPs x{1 / kept[name]:5.2f}", file=sys.stderr, flush=True)
    return out


def time_prefill(parent, variants: dict, length: int, repeats: int, ids: torch.Tensor) -> dict:
    parent_flops = dense_flops(parent, [length], last_only=True)
    kept = {name: dense_flops(m, [length], last_only=True) / parent_flops for name, m in
            {"dense": parent, **variants}.items()}

    def run(m):
        def fn():
            with torch.inference_mode():
                m(ids, cache=m.new_cache(1, length + 1), last_only=True)
        return fn

    times = interleaved({name: run(m) for name, m in {"dense": parent, **variants}.items()}, repeats)
    return finish(times, kept, {"prefill_tokens": length})


def time_decode(parent, variants: dict, context: int, steps: int, ids: torch.Tensor) -> dict:
    models = {"dense": parent, **variants}
    state = {}
    with torch.inference_mode():
        for name, m in models.items():
            cache = m.new_cache(1, context + steps + 2)
            token = m(ids, cache=cache, last_only=True)[:, -1:].argmax(-1)
            state[name] = (cache, token)
        parent_flops = dense_flops(parent, [1], [context])
        kept = {name: dense_flops(m, [1], [context]) / parent_flops for name, m in models.items()}
        times = {name: [] for name in models}
        for step in range(steps + 1):  # round-robin; the first step is a warm-up
            for name, m in models.items():
                cache, token = state[name]
                t0 = time.perf_counter()
                token = m(token, cache=cache)[:, -1:].argmax(-1)
                if step:
                    times[name].append(time.perf_counter() - t0)
                state[name] = (cache, token)
    import statistics

    medians = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": len(t)}
               for n, t in times.items()}
    return finish(medians, kept, {"decode_at": context, "steps": steps})


def targets(payload: dict) -> dict:
    """Issue 18's speed targets read off the measured cases."""
    mini = payload["minilm"]
    long = max((c for k, c in mini.items() if "sparse" not in k), key=lambda c: c["tokens"])
    structured = [(f"{m} {k} {name}", v["speedup_vs_flop_ratio"]) for m in ("minilm", "smollm2")
                  for k, c in payload[m].items() if "sparse" not in k
                  for name, v in c["variants"].items() if name in ("heads40", "ffn30", "combined")]
    return {
        "combined_speedup_ge_2": {k: c["variants"]["combined"]["speedup"] for k, c in mini.items()
                                  if "combined" in c["variants"]},
        "static_plus_token_speedup_ge_3_at_longest": long["variants"]["combined + token=0.5"]["speedup"],
        "structured_speedup_vs_flop_ratio_ge_0.85": dict(structured),
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(f"{model} {key}", case) for model in ("minilm", "smollm2") for key, case in payload[model].items()]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4), squeeze=False)
    for ax, (title, case) in zip(axes[0], cases, strict=True):
        names = list(case["variants"])
        v = [case["variants"][n] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r["speedup"] for r in v], 0.4, label="measured speed-up")
        ax.bar([i + 0.2 for i in x], [r["flop_ratio"] for r in v], 0.4, label="FLOP ratio")
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the MiniLM SST-2 classifier")
    p.add_argument("--configs", type=Path, default=RESULTS / "static-accuracy.json")
    p.add_argument("--decode-steps", type=int, default=32)
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    import dynaprune
    from dynaprune.paths import shared_data_dir
    from dynaprune.static.calib import load_calibration

    t_start = time.perf_counter()
    q = args.quick
    repeats = 1 if q else args.repeats
    configs = configs_from(args.configs)
    payload: dict = {"command": " ".join(["python -m benchmarks.static", *(argv or sys.argv[1:])]),
                     "threads": threads, "repeats": repeats, "configs": configs, "quick": q,
                     "split": {"minilm_criteria": "held-out SST-2 TRAIN rows",
                               "smollm2_criteria": "WikiText-2 valid chunks", "inputs": "random ids / WikiText-2 test"}}
    bert = dynaprune.load(str(args.checkpoint)).eval()
    training = json.loads((args.checkpoint / "config.json").read_text()).get("dynaprune", {}).get("training", {})
    rows, _ = heldout_rows(training, 32 if q else 256)
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "calib.tsv"
        cal.write_text("".join(f"{t}\t{lab}\n" for t, lab in rows))
        calib = load_calibration(bert, cal, max_examples=len(rows))
    pruned = {name: prune_copy(bert, calib, *cfg) for name, cfg in configs.items()}
    variants = {**pruned, "combined + token=0.5": pruned["combined"]}
    shapes = [(4, 32), (2, 64)] if q else [(32, 128), (8, 512)]
    payload["minilm"] = {f"{b}x{n}": time_encoder(bert, variants, b, n, repeats, {"combined + token=0.5"})
                         for b, n in shapes}
    b, n = shapes[0]
    payload["minilm"][f"{b}x{n} sparse"] = time_encoder(bert, sparse_variants(bert), b, n, repeats, set())
    del bert, pruned, variants
    lm = dynaprune.load("smollm2-135m").eval()
    length = 64 if q else 1024
    lm_calib = load_calibration(lm, shared_data_dir() / "wikitext2" / "valid.txt", max_examples=1 if q else 4,
                                seq_len=64 if q else 256)
    lm_variants = {name: prune_copy(lm, lm_calib, *cfg) for name, cfg in configs.items()}
    ids = torch.tensor([wikitext_ids(lm.tokenizer, length)])
    payload["smollm2"] = {f"prefill {length}": time_prefill(lm, lm_variants, length, repeats, ids),
                          f"decode at {length}": time_decode(lm, lm_variants, length, 2 if q else args.decode_steps,
                                                             ids)}
    payload["targets"] = targets(payload)
    payload["seconds"] = round(time.perf_counter() - t_start, 1)
    out = args.out or RESULTS / "static.json"
    save("static", payload, path=out)
    plot(payload, out.with_suffix(".png"))
    print(out)
    return payload


if __name__ == "__main__":
    main()

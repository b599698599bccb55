"""Our own runs' workload traces through the SpAtten and HDP accelerator models.

Real models, real inputs, traced by ``make_context(recipe, model, trace=True)`` and converted by
``dynaprune.runtime.trace.trace_rows`` (SpAtten schema; prefill / encoder = consecutive rows of one
(iteration, layer, head)), then simulated with the hw Python API (``simulate_spatten``,
``simulate_hdp``):

* MiniLM-L6 (encoder): the first SST-2 dev sentence of at least 32 tokens and the first WikiText-2
  test paragraph of 110-130 tokens, under the baseline, ``token=0.5``, ``token=0.5,quant=4+4@0.1``,
  ``token=0.5,head=0.8,value=0.5,quant=4+4@0.1`` and HDP's ``block=0.2``.
* SmolLM2-135M (decoder): the longest MT-Bench first turn (question 133, 402 tokens with the chat
  template), greedy, exactly 64 new tokens (no stop token, so every recipe has the same 63 decode
  iterations after the prefill), under the baseline, ``kv=0.25``, ``kv=0.25,quant=4+4@0.1``,
  ``token=0.5,kv=0.25,quant=4+4@0.1``, ``kv_bytes=0.25`` and ``kv_bytes=0.125`` (a packed K/V cache: K and V
  fetched at their stored bits; KVzip's reconstruction pass, an extra prefill-sized forward, is not in the
  trace).

Baseline: ``token=1,token_adapt=0``, a traced context that prunes nothing (``token=1`` alone is not a
no-op: the length-adaptive rule keeps (128 / L)^(1/3) of an L > 128 token input). Its trace says
"not quantized" (-1): SpAtten reads that at its 12-bit datapath width (``unquantized_bits``), HDP at
the run's default fixed-point word 8.8 (``HdpConfig(int_bits=8, frac_bits=8)``, our HDP default
``fixed=8.8``). Speed-up and DRAM reduction are against the same model's and input's baseline on
the same architecture.

HDP decisions: ``trace_rows`` writes an HDP run as if nothing were pruned (every key fetched), so the
block=0.2 trace is rebuilt here from the run's own per-head decisions (``hdp_attention``'s stats,
recorded while the run executes): a kept head's rows keep ``pairs_kept / pairs_valid`` of their keys,
an early-pruned head's rows are left out (HDP's reading of the schema). See the report of this
benchmark for the fix proposed in ``runtime/``.

Sensitivities (SmolLM2): prefill and decode simulated separately; KV-eviction top-k marked in the
trace (``if_topk`` on the last row of each decode iteration that evicted, ``topk`` = budget, which
``trace_rows`` leaves out); K/V shared by the query heads of a GQA group (rows keyed by KV head, so
the simulators fetch each group's K/V once).

Writes benchmarks/results/hw/own/hw_own_traces.{json,png} and every trace as CSV there when it is
under 2 MB (the others: a summary with the CSV's sha256 in the JSON; ``--traces-dir DIR`` rewrites
all of them, regenerated from the runs, into DIR).

    python -m benchmarks.hw_own_traces [--traces-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, save
from dynaprune.hw.hdp import HdpConfig, simulate_hdp
from dynaprune.hw.report import SimResult
from dynaprune.hw.spatten import SpAttenConfig, simulate_spatten
from dynaprune.hw.trace import Trace, TraceRow, write_trace
from dynaprune.paths import shared_data_dir
from dynaprune.prune.techniques import hdp as hdp_technique
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.trace import trace_rows

OUT = RESULTS / "hw" / "own"
MAX_CSV_BYTES = 2_000_000
BASELINE = "token=1,token_adapt=0"
ENCODER_RECIPES = [BASELINE, "token=0.5", "token=0.5,quant=4+4@0.1", "token=0.5,head=0.8,value=0.5,quant=4+4@0.1",
                   "block=0.2"]
DECODER_RECIPES = [BASELINE, "kv=0.25", "kv=0.25,quant=4+4@0.1", "token=0.5,kv=0.25,quant=4+4@0.1", "kv_bytes=0.25",
                   "kv_bytes=0.125"]
MTBENCH_QUESTION = 133
NEW_TOKENS = 64
ARCHS = ("spatten", "hdp")
SPATTEN = SpAttenConfig()
HDP = HdpConfig(int_bits=8, frac_bits=8)


# ------------------------------------------------------------------------------------------ inputs


def sst2_sentence(model) -> str:
    with open(shared_data_dir() / "sst2" / "dev.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            text = row["sentence"].strip()
            if len(model.tokenize([text])[0]) >= 32:
                return text
    raise RuntimeError("no SST-2 dev sentence of 32 tokens")


def wikitext_paragraph(model) -> str:
    for line in (shared_data_dir() / "wikitext2" / "test.txt").read_text().splitlines():
        text = line.strip()
        if text and not text.startswith("=") and 110 <= len(model.tokenize([text])[0]) <= 130:
            return text
    raise RuntimeError("no WikiText-2 paragraph of 110-130 tokens")


def mtbench_prompt() -> str:
    for line in (shared_data_dir() / "mt-bench" / "questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        if q["question_id"] == MTBENCH_QUESTION:
            return q["turns"][0]
    raise RuntimeError(f"MT-Bench question {MTBENCH_QUESTION} not found")


# ------------------------------------------------------------------------------------------ traced runs


@contextlib.contextmanager
def hdp_decisions():
    """Record, per HDP attention call, the first input's per-head decisions (kept, kept pairs, valid pairs)."""
    calls: list[dict] = []
    original = hdp_technique.hdp_attention

    def recording(*args, **kwargs):
        out, stats = original(*args, **kwargs)
        calls.append({"head_kept": stats.head_kept[0].tolist(), "pairs_kept": stats.pairs_kept[0].tolist(),
                      "pairs_valid": stats.pairs_valid[0].tolist()})
        return out, stats

    hdp_technique.hdp_attention = recording
    try:
        yield calls
    finally:
        hdp_technique.hdp_attention = original


def with_hdp_decisions(rows: list[TraceRow], ctx, decisions: list[dict]) -> list[TraceRow]:
    """The rows of ``trace_rows(ctx)`` with the HDP run's decisions: kept heads keep their kept-pair share of
    keys (and values), early-pruned heads are left out."""
    if len(decisions) != len(ctx.trace_calls):
        raise RuntimeError(f"{len(decisions)} HDP calls recorded for {len(ctx.trace_calls)} traced calls")
    out, i = [], 0
    for call, dec in zip(ctx.trace_calls, decisions, strict=True):
        n_queries = len(call["keys_per_query"])
        for slot in range(len(call["heads"])):
            chunk, i = rows[i : i + n_queries], i + n_queries
            if not dec["head_kept"][slot]:
                continue
            share = dec["pairs_kept"][slot] / max(1.0, dec["pairs_valid"][slot])
            for r in chunk:
                k = min(r.key_fetch_num, max(1, round(share * r.key_fetch_num)))
                out.append(dataclasses.replace(r, key_fetch_num=k, value_fetch_num=min(r.value_fetch_num, k)))
    if i != len(rows):
        raise RuntimeError("trace rows and traced calls disagree")
    return out


def traced(model, recipe: str, run) -> tuple[Trace, object, float]:
    """Run ``run(ctx)`` under a traced context for ``recipe``; (trace, context, seconds)."""
    ctx = make_context(recipe, model, trace=True)
    t0 = time.perf_counter()
    with hdp_decisions() as decisions:
        run(ctx)
    seconds = time.perf_counter() - t0
    rows = trace_rows(ctx)
    if getattr(ctx, "hdp", None) is not None:
        rows = with_hdp_decisions(rows, ctx, decisions)
    config = f"dynaprune {getattr(model, 'name', 'model')} {recipe}".replace(",", ";")
    return Trace.from_rows(rows, config=config), ctx, seconds


def encoder_runs(model, inputs: dict[str, str]) -> list[dict]:
    runs = []
    for name, text in inputs.items():
        dense = model.embed([text])[0]
        for recipe in ENCODER_RECIPES:
            out = {}

            def run(ctx, text=text, out=out):
                out["embedding"] = model.embed([text], ctx_factory=lambda: ctx)[0]

            trace, ctx, seconds = traced(model, recipe, run)
            runs.append({"model": "minilm-l6", "input": name, "recipe": recipe, "trace": trace, "ctx": ctx,
                         "run_seconds": seconds,
                         "output": {"cosine_to_dense": float(torch.nn.functional.cosine_similarity(
                             out["embedding"], dense, dim=0))}})
    return runs


def decoder_runs(model, prompt: str) -> tuple[list[dict], object]:
    dense = model.generate(prompt, max_new_tokens=NEW_TOKENS, chat=True, stop_tokens=[])
    runs = []
    for recipe in DECODER_RECIPES:
        out = {}

        def run(ctx, out=out):
            out["result"] = model.generate(prompt, max_new_tokens=NEW_TOKENS, chat=True, stop_tokens=[], ctx=ctx)

        trace, ctx, seconds = traced(model, recipe, run)
        res = out["result"]
        same = sum(1 for _ in _common_prefix(res.new_ids, dense.new_ids))
        runs.append({"model": "smollm2-135m", "input": f"mt-bench-{MTBENCH_QUESTION}", "recipe": recipe,
                     "trace": trace, "ctx": ctx, "run_seconds": seconds,
                     "output": {"prompt_tokens": len(res.prompt_ids), "new_tokens": len(res.new_ids),
                                "tokens_equal_to_dense_greedy": same, "text": res.text,
                                "kv_budget_tokens": getattr(ctx, "kv_budget", None)}})
    return runs, dense


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


# ------------------------------------------------------------------------------------------ simulation


def simulate(trace: Trace, arch: str) -> SimResult:
    return simulate_spatten(trace, SPATTEN) if arch == "spatten" else simulate_hdp(trace, HDP)


def metrics(r: SimResult) -> dict:
    out = {"cycles": r.cycles, "seconds_at_1ghz": r.cycles / 1e9, "dram_bytes": r.dram_bytes,
           "energy_j": r.energy_j["total"], "energy_breakdown_j": r.energy_j, "gflops": r.gflops,
           "ops_per_dram_byte": r.intensity, "achieved_gbps": r.achieved_gbps, "utilisation": r.utilisation}
    if r.arch == "hdp":
        out["hdp_speedup_vs_same_trace_dense"] = r.extra["speedup_vs_dense"]
        out["hdp_heads_pruned"] = r.extra["heads_pruned"]
    return out


def subset(trace: Trace, keep: np.ndarray) -> Trace:
    return Trace({c: v[keep] for c, v in trace.columns.items()}, trace.config, trace.source)


def with_eviction_topk(trace: Trace, ctx) -> Trace:
    """Mark the KV eviction of each decode iteration as SpAtten's after-the-last-layer token top-k."""
    budget = getattr(ctx, "kv_budget", None)  # a stage's state: absent without a KV budget
    if budget is None:
        return trace
    it, layer = trace["iteration_id"], trace["layer_id"]
    last = np.ones(len(trace), dtype=bool)
    last[:-1] = it[1:] != it[:-1]  # the last row of each iteration (its last layer's last head)
    last &= (layer == layer.max()) & (trace["key_fetch_num"] > budget)
    topk = np.where(last, budget, trace["topk"])
    return trace.replace(if_topk=trace["if_topk"] | last, topk=topk)


def gqa_shared_kv(trace: Trace, group: int) -> Trace:
    """Rows keyed by KV head: the query heads of a group become consecutive queries over the same K/V."""
    return trace.replace(head_id=trace["head_id"] // group) if group > 1 else trace


def trace_summary(trace: Trace) -> dict:
    it = trace["iteration_id"]
    return {
        "rows": len(trace), "iterations": int(it.max()) + 1, "layers": int(trace["layer_id"].max()) + 1,
        "heads": int(trace["head_id"].max()) + 1, "D": int(trace["embedding_length_D"][0]),
        "sentence_length_L_max": int(trace["sentence_length_L"].max()),
        "key_fetch_total": int(trace["key_fetch_num"].sum()), "value_fetch_total": int(trace["value_fetch_num"].sum()),
        "requant_rows": int(trace["if_requant"].sum()), "topk_rows": int(trace["if_topk"].sum()),
        "keys_per_decode_row_mean": float(trace["key_fetch_num"][it > 0].mean()) if (it > 0).any() else None,
    }


def csv_bytes(trace: Trace) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write_trace(Path(tmp) / "t.csv", trace).read_bytes()


def slug(run: dict) -> str:
    return re.sub(r"[^A-Za-z0-9.+@-]+", "_", f"{run['model']}_{run['input']}_{run['recipe']}")


# ------------------------------------------------------------------------------------------ figure


def figure(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [(r["model"], r["input"], r["recipe"]) for r in table
              if r["arch"] == "spatten" and r["recipe"] != BASELINE]
    by = {(r["model"], r["input"], r["recipe"], r["arch"]): r for r in table}
    x = np.arange(len(groups))
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    for ax, key, label in ((axes[0], "speedup", "speed-up vs baseline trace"),
                           (axes[1], "dram_reduction", "DRAM reduction vs baseline trace")):
        for j, (arch, color) in enumerate((("spatten", "tab:blue"), ("hdp", "tab:orange"))):
            ys = [by[(*g, arch)][key] for g in groups]
            bars = ax.bar(x + (j - 0.5) * 0.38, ys, 0.38, color=color, label=arch)
            for b, y in zip(bars, ys, strict=True):
                ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        starts = [i for i, g in enumerate(groups) if i == 0 or g[:2] != groups[i - 1][:2]]
        for i in starts:
            if i:
                ax.axvline(i - 0.5, color="gray", lw=0.8, ls="--")
            if ax is axes[0]:
                ax.text(i - 0.4, 0.97, f"{groups[i][0]}, {groups[i][1]}", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, fontweight="bold")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="upper left")
    axes[1].set_xticks(x, [g[2].replace(",", "\n") for g in groups], fontsize=7)
    axes[0].set_title("Our runs' traces on SpAtten and HDP (Table I / stated HDP defaults), vs each input's "
                      f"baseline trace ({BASELINE})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces-dir", type=Path, default=None, help="also write every trace CSV (any size) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import dynaprune

    t_start = time.perf_counter()
    minilm = dynaprune.load("minilm-l6")
    smol = dynaprune.load("smollm2-135m")
    enc_inputs = {"sst2-dev": sst2_sentence(minilm), "wikitext2-test": wikitext_paragraph(minilm)}
    prompt = mtbench_prompt()
    runs = encoder_runs(minilm, enc_inputs)
    dec, dense = decoder_runs(smol, prompt)
    runs += dec
    t_runs = time.perf_counter()

    OUT.mkdir(parents=True, exist_ok=True)
    table, details = [], []
    baselines: dict[tuple[str, str, str], SimResult] = {}
    t_sim = 0.0
    for run in runs:
        trace, ctx = run["trace"], run["ctx"]
        data = csv_bytes(trace)
        name = f"{slug(run)}.csv"
        stored = len(data) < MAX_CSV_BYTES
        if stored:
            (OUT / name).write_bytes(data)
        else:
            (OUT / name).unlink(missing_ok=True)
        if args.traces_dir is not None:
            args.traces_dir.mkdir(parents=True, exist_ok=True)
            (args.traces_dir / name).write_bytes(data)
        entry = {"model": run["model"], "input": run["input"], "recipe": run["recipe"],
                 "trace_file": name if stored else None, "trace_csv_bytes": len(data),
                 "trace_csv_sha256": hashlib.sha256(data).hexdigest(), "trace": trace_summary(trace),
                 "run_seconds": run["run_seconds"], "run_summary": ctx.summary(), "output": run["output"], "sim": {}}
        for arch in ARCHS:
            t0 = time.perf_counter()
            r = simulate(trace, arch)
            t_sim += time.perf_counter() - t0
            key = (run["model"], run["input"], arch)
            if run["recipe"] == BASELINE:
                baselines[key] = r
            base = baselines[key]
            m = metrics(r)
            m["speedup"] = base.cycles / r.cycles
            m["dram_reduction"] = base.dram_bytes / r.dram_bytes
            m["energy_reduction"] = base.energy_j["total"] / r.energy_j["total"]
            entry["sim"][arch] = m
            table.append({"model": run["model"], "input": run["input"], "recipe": run["recipe"], "arch": arch,
                          "cycles": r.cycles, "seconds_at_1ghz": r.cycles / 1e9, "dram_bytes": r.dram_bytes,
                          "energy_j": r.energy_j["total"], "speedup": m["speedup"],
                          "dram_reduction": m["dram_reduction"], "energy_reduction": m["energy_reduction"]})
        details.append(entry)

    # sensitivities on the decoder traces: stages, eviction top-k, GQA-shared K/V
    sens = []
    group = smol.config.heads // smol.config.kv_heads
    for run in (r for r in runs if r["model"] == "smollm2-135m"):
        trace, ctx = run["trace"], run["ctx"]
        it = trace["iteration_id"]
        variants = {"prefill (iteration 0)": subset(trace, it == 0), "decode (iterations >= 1)": subset(trace, it > 0),
                    "decode + eviction top-k marked": subset(with_eviction_topk(trace, ctx), it > 0),
                    f"K/V shared per GQA group ({group} query heads)": gqa_shared_kv(trace, group),
                    "decode, K/V shared per GQA group": gqa_shared_kv(subset(trace, it > 0), group)}
        row = {"recipe": run["recipe"]}
        for vname, tr in variants.items():
            row[vname] = {}
            for arch in ARCHS:
                if "top-k" in vname and arch == "hdp":
                    continue
                r = simulate(tr, arch)
                row[vname][arch] = {"cycles": r.cycles, "dram_bytes": r.dram_bytes, "energy_j": r.energy_j["total"]}
        sens.append(row)
    base_sens = sens[0]
    for row in sens:
        for vname, per_arch in row.items():
            if vname == "recipe":
                continue
            for arch, m in per_arch.items():
                b = base_sens[vname][arch]
                m["speedup"] = b["cycles"] / m["cycles"]
                m["dram_reduction"] = b["dram_bytes"] / m["dram_bytes"]

    figure(table, OUT / "hw_own_traces.png")
    payload = {
        "command": "python -m " + " ".join(["benchmarks.hw_own_traces", *sys.argv[1:]]),
        "baseline_recipe": BASELINE,
        "readings": {
            "spatten": "SpAttenConfig() (Table I); -1 (not quantized) fetched at unquantized_bits=12",
            "hdp": "HdpConfig(int_bits=8, frac_bits=8): -1 read as the run's default fixed=8.8 word; "
                   "quant=M+L@T rows read as M integer + L fraction bits",
            "block=0.2": "trace rebuilt from the run's HDP decisions (trace_rows writes HDP runs unpruned); "
                         "on SpAtten read as per-query key pruning (SpAtten has no block pruning): indicative only",
            "decoder": f"greedy, exactly {NEW_TOKENS} new tokens (stop tokens off): iteration 0 = prefill, "
                       f"{NEW_TOKENS - 1} decode iterations",
        },
        "configs": {"spatten": dataclasses.asdict(SPATTEN), "hdp": dataclasses.asdict(HDP)},
        "inputs": {
            **{k: {"text": v, "tokens": len(minilm.tokenize([v])[0])} for k, v in enc_inputs.items()},
            f"mt-bench-{MTBENCH_QUESTION}": {"text": prompt, "prompt_tokens_with_chat_template": len(dense.prompt_ids),
                                             "dense_greedy_text": dense.text},
        },
        "table": table,
        "runs": details,
        "decoder_sensitivity": sens,
        "timing_s": {"runs": t_runs - t_start, "simulation": t_sim, "total": time.perf_counter() - t_start},
        "max_csv_bytes": MAX_CSV_BYTES,
    }
    path = save("hw_own_traces", payload, subdir="hw/own")
    print(f"wrote {path} and {OUT / 'hw_own_traces.png'}")
    print(f"{'model':13} {'input':16} {'recipe':44} {'arch':7} {'cycles':>11} {'ms@1GHz':>8} {'DRAM MB':>9} "
          f"{'speed-up':>8} {'DRAM red':>8} {'energy uJ':>10}")
    for t in table:
        print(f"{t['model']:13} {t['input']:16} {t['recipe']:44} {t['arch']:7} {t['cycles']:>11} "
              f"{t['seconds_at_1ghz'] * 1e3:>8.3f} {t['dram_bytes'] / 1e6:>9.3f} {t['speedup']:>8.2f} "
              f"{t['dram_reduction']:>8.2f} {t['energy_j'] * 1e6:>10.1f}")
    for row in sens:
        print(row["recipe"], {k: {a: f"{m['cycles']} cyc x{m['speedup']:.2f}, {m['dram_bytes'] / 1e6:.1f} MB "
                                     f"x{m['dram_reduction']:.2f}" for a, m in v.items()}
                              for k, v in row.items() if k != "recipe"})
    print(f"runs {t_runs - t_start:.1f} s, simulation {t_sim:.1f} s")


if __name__ == "__main__":
    main()

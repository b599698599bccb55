"""The kvpress peers on Gemma 3 270M (issue 20), in the PEERS venv, after ``python -m benchmarks.gemma3_peers``:

    .venv-peers/bin/python benchmarks/gemma3_peers_run.py --threads 1 [--rows observed25,quanto4,dense]

``benchmarks/peers/run_kvpress.py``'s ``run_row`` (same protocol, same accounting) on the exported Gemma
folder and its <bos> chunks; rows to ``benchmarks/results/gemma3-peers.json`` (atomic, after each row).

kvpress 0.5.5 and Gemma 3: its ``BasePress`` compresses only the global layers of a Gemma 3 model, but
recognises Gemma 3 by ``Gemma3ForConditionalGeneration`` alone, so on ``Gemma3ForCausalLM`` it hooks every
layer (the default here; ``run_row``'s ``DynamicCache()`` keeps every token in every layer, so the sliding
layers are compressed like the others). ``--global-only`` applies its Gemma 3 rule instead: the continuation
then fails (the masks are sized from layer 0's uncompressed length: 2048 vs 895 keys). KVzip refuses
``Gemma3ForCausalLM`` outright (not run).
Bytes: ``kv_bytes_vs_fp16`` is run_kvpress's (over a fp16 cache of every context token in EVERY layer);
``kv_bytes_vs_windowed_fp16`` rescales it to our dense reference (sliding layers hold 511 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
CACHE = Path.home() / ".cache" / "dynaprune" / "peers"
OUT = HERE / "results" / "gemma3-peers.json"
ROWS = {"observed25": {"peer": "kvpress", "press": "ObservedAttention", "keep": 0.25, "bits": None},
        "observed50": {"peer": "kvpress", "press": "ObservedAttention", "keep": 0.5, "bits": None},
        "quanto4": {"peer": "quantized-cache", "press": None, "keep": 1.0, "bits": 4},
        "dense": {"peer": "dense", "press": None, "keep": 1.0, "bits": None}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="observed25,quanto4,dense")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--global-only", action="store_true",
                   help="kvpress's Gemma 3 rule (compress global layers only): its continuation then fails on our "
                        "cache (the masks are sized from layer 0)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    import kvpress.presses.base_press as base_press
    import torch
    import transformers
    from run_kvpress import run_row
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    if args.global_only:
        base_press.Gemma3ForConditionalGeneration = (base_press.Gemma3ForConditionalGeneration, Gemma3ForCausalLM)
    data = json.loads((CACHE / "gemma3-chunks" / "chunks-test.json").read_text())
    chunks, context = data["chunks"][: args.chunks], data["context"]
    cfg = json.loads((CACHE / "gemma3-270m" / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    sliding = sum(t == "sliding_attention" for t in cfg["layer_types"])
    windowed = (sliding * min(context, cfg["sliding_window"] - 1) + (layers - sliding) * context) / (layers * context)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    out.update(model="gemma3-270m (dynaprune's dequantized Q4_K_M GGUF, exported fp32: benchmarks/gemma3_peers.py)",
               protocol=f"continue: {len(chunks)} chunks of <bos> + 1536 context + 512 continuation, WikiText-2 "
                        "TEST, original positions",
               gemma3_policy=("global layers only (--global-only)" if args.global_only else "every layer (kvpress's "
                              "default on Gemma3ForCausalLM; run_row's DynamicCache() holds every token in every "
                              "layer, sliding ones included)")
               + "; KVzip: refused by kvpress 0.5.5 on Gemma3ForCausalLM",

               windowed_dense_share=windowed,
               command="nice -n 5 .venv-peers/bin/python benchmarks/gemma3_peers_run.py " + " ".join(sys.argv[1:]),
               versions={"transformers": transformers.__version__, "torch": torch.__version__})
    models = {}
    for name in args.rows.split(","):
        spec = dict(ROWS[name], split="test")
        attn = "eager" if spec["press"] == "ObservedAttention" else "sdpa"
        if attn not in models:  # one model at a time (memory)
            models.clear()
            models[attn] = AutoModelForCausalLM.from_pretrained(CACHE / "gemma3-270m", dtype=torch.float32,
                                                                attn_implementation=attn).eval()
        t0 = time.perf_counter()
        try:
            row = run_row(spec, models[attn], chunks, context)
        except Exception as e:  # recorded, not fatal
            row = {"failed": repr(e)[:500]}
        else:
            row["kv_bytes_vs_windowed_fp16"] = row["kv_bytes_vs_fp16"] / windowed
        row.update(spec=spec, attn_implementation=attn, seconds=round(time.perf_counter() - t0, 1))
        out["rows"][name] = row
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.out)
        print(name, {k: v for k, v in row.items() if k != "spec"}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

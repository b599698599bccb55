"""The peers on our ``continue`` protocol: NVIDIA kvpress 0.5.5's presses and transformers' QuantizedCache
(quanto backend), alone and composed, on exactly the chunks ``dynaprune eval ... --protocol continue
--context 1536 --continuation 512 --max-examples 8`` scores.

Runs in the peers' venv (``make peers``; kvpress needs transformers<5.3) after ``python -m
benchmarks.peers.export`` (main venv) wrote the model folder and the chunks. Per chunk: the context is
prefilled into the cache under the press (kvpress compresses in its prefill hooks), the last context
logits predict continuation[0], then continuation[:-1] is teacher-forced in one pass on the compressed
cache with ``position_ids`` = the ORIGINAL positions (context .. context+511); perplexity over the 512
continuation tokens. Rows go to ``benchmarks/results/peers/kvpress.json`` (atomic, resumable: rows
already there are skipped).

Bytes (``schema.py``): after each chunk's prefill, every tensor the cache holds is inspected: a
DynamicCache layer's ``keys``/``values`` (fp), a QuantizedCache layer's quanto tensors flattened with
``__tensor_flatten__`` down to plain tensors (integer codes, float scales and zero-points) plus its fp
residual ``keys``/``values``. Presses that mask per head instead of evicting (AdaKV, KVzip) keep every
token in the cache and hide ``masked_key_indices`` from the continuation's attention: their masked rows
are subtracted (the continuation never reads them), and ``cache_tokens_held_share`` says what is held.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:  # imported as benchmarks.peers.run_kvpress (the main suite's test of the plan)
    from benchmarks.peers.schema import (
        HeldTensor,
        compression_ratio_for_keep,
        fp16_cache_bytes,
        kv_bytes,
        load_rows,
        row_key,
        write_rows_atomic,
    )
except ImportError:  # run as a script in the peers' venv: its folder is sys.path[0]
    from schema import (  # type: ignore[no-redef]
        HeldTensor,
        compression_ratio_for_keep,
        fp16_cache_bytes,
        kv_bytes,
        load_rows,
        row_key,
        write_rows_atomic,
    )

PEERS_CACHE = Path(os.environ.get("DYNAPRUNE_CACHE", Path.home() / ".cache" / "dynaprune")) / "peers"
OUT = Path(__file__).resolve().parents[1] / "results" / "peers" / "kvpress.json"
QUANT = {"backend": "quanto", "q_group_size": 64, "residual_length": 128, "axis_key": 0, "axis_value": 0}
BEST_TWO = ("ObservedAttention", "KVzip")  # the best presses at 25% and 12.5% kept (issue 14's table)
OTHERS = ("SnapKV", "ExpectedAttention", "TOVA", "StreamingLLM", "Knorm", "AdaKV(ExpectedAttention)",
          "AdaKV(SnapKV)", "PyramidKV", "KeyDiff")


def make_press(name: str, compression_ratio: float):
    import kvpress

    if name.startswith("AdaKV("):
        return kvpress.AdaKVPress(make_press(name[6:-1], compression_ratio))
    cls = getattr(kvpress, f"{name}Press")
    return cls(compression_ratio=compression_ratio)


def _key_rows(split: str) -> list[dict[str, Any]]:
    """The points to beat, most wanted first (on a busy machine a run may stop early; it resumes)."""
    def press(p: str, keep: float, bits: int | None = None) -> dict[str, Any]:
        peer = "kvpress" if bits is None else "kvpress+quantized-cache"
        return {"peer": peer, "press": p, "keep": keep, "bits": bits, "split": split}

    def quant(bits: int) -> dict[str, Any]:
        return {"peer": "quantized-cache", "press": None, "keep": 1.0, "bits": bits, "split": split}

    first, second = BEST_TWO
    return [{"peer": "dense", "press": None, "keep": 1.0, "bits": None, "split": split},
            press(first, 0.5), press(first, 0.25), press(first, 0.125), quant(4),
            press(first, 0.5, 4), press(first, 0.25, 4), press(second, 0.25), quant(2),
            # a press on the 4- and 2-bit caches at every share kept: a peer at each bytes point
            press(first, 0.125, 4), press(first, 0.5, 2), press(first, 0.25, 2), press(first, 0.125, 2),
            press(second, 0.5, 4), press(second, 0.25, 4), press(second, 0.5), press(second, 0.125)]


def plan(splits: list[str]) -> list[dict[str, Any]]:
    """Every row in the order they run: on every split the points to beat (dense, the best two presses,
    the quantized cache, the compositions), then 6.25% and the other presses on TEST only (VALID is for
    the best presses only)."""
    rows = [row for split in splits for row in _key_rows(split)]
    if "test" in splits:
        rows += [{"peer": "kvpress", "press": p, "keep": 0.0625, "bits": None, "split": "test"} for p in BEST_TWO]
        for keep in (0.5, 0.25, 0.125):
            rows += [{"peer": "kvpress", "press": p, "keep": keep, "bits": None, "split": "test"} for p in OTHERS]
    return rows


def options_of(spec: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"context": 1536, "continuation": 512, "max_examples": 8}  # the protocol; checked
    if spec["press"] is not None:
        opts.update(keep=spec["keep"], compression_ratio=compression_ratio_for_keep(spec["keep"]))
        opts["attn_implementation"] = "eager" if spec["press"] == "ObservedAttention" else "sdpa"
        if spec["press"] == "KVzip":  # its repeat prompt: raw ("\n" suffix) unless the tokenizer has a template
            opts["kvzip_chat_template"] = False
    else:
        opts["attn_implementation"] = "sdpa"
    if spec["bits"] is not None:
        opts.update(QUANT, nbits=spec["bits"])
    return opts


def flat_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors under a (possibly nested) tensor subclass such as quanto's QBitsTensor."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in flat_tensors(getattr(t, name))]


def held(t: torch.Tensor) -> list[HeldTensor]:
    out = []
    for leaf in flat_tensors(t):
        kind = "float" if leaf.dtype.is_floating_point else "codes"
        out.append(HeldTensor(kind, leaf.numel(), leaf.numel() * leaf.element_size()))
    return out


def cache_accounting(cache, model, context: int) -> dict[str, float]:
    """Bytes and tokens the cache holds for the context after the prefill (see the module docstring)."""
    from transformers import QuantizedCache

    cfg = model.config
    layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    read_bytes = held_bytes = as_held_bytes = 0.0
    rows_held = rows_read = 0
    attn = [layer.self_attn for layer in model.model.layers]
    for i, layer in enumerate(cache.layers):
        tensors: list[HeldTensor] = []
        if isinstance(cache, QuantizedCache):
            tensors += held(layer._quantized_keys) + held(layer._quantized_values)
            tokens = layer._quantized_keys.shape[-2]
            if layer.keys.dim() == 4:  # the fp residual window (empty after a one-pass prefill)
                tensors += held(layer.keys) + held(layer.values)
                tokens += layer.keys.shape[-2]
        else:
            tensors += held(layer.keys) + held(layer.values)
            tokens = layer.keys.shape[-2]
        masked = getattr(attn[i], "masked_key_indices", None)
        n_masked = 0 if masked is None else len(masked[0])
        rows = kv_heads * tokens  # (head, token) rows held, batch 1
        share_read = (rows - n_masked) / rows
        held_bytes += kv_bytes(tensors)
        read_bytes += kv_bytes(tensors) * share_read
        as_held_bytes += kv_bytes(tensors, as_held=True) * share_read
        rows_held += rows
        rows_read += rows - n_masked
    dense = fp16_cache_bytes(layers, kv_heads, head_dim, context)
    total_rows = layers * kv_heads * context
    return {"kv_bytes_vs_fp16": read_bytes / dense, "kv_bytes_as_held_vs_fp16": as_held_bytes / dense,
            "cache_bytes_held_vs_fp16": held_bytes / dense, "tokens_kept_share": rows_read / total_rows,
            "cache_tokens_held_share": rows_held / total_rows}


def new_cache(spec: dict[str, Any], model):
    from transformers import DynamicCache, QuantizedCache

    if spec["bits"] is None:
        return DynamicCache()
    q = dict(QUANT)
    return QuantizedCache(q.pop("backend"), model.config, nbits=spec["bits"], **q)


def run_row(spec: dict[str, Any], model, chunks: list[list[int]], context: int) -> dict[str, Any]:
    nll, count = 0.0, 0
    acct: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for chunk in chunks:
        ids = torch.tensor(chunk)[None]
        prompt, cont = ids[:, :context], ids[0, context:]
        cache = new_cache(spec, model)
        with torch.inference_mode():
            if spec["press"] is None:
                last = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            else:
                press = make_press(spec["press"], compression_ratio_for_keep(spec["keep"]))
                with press(model):
                    last = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            acct.append(cache_accounting(cache, model, context))
            # cache_position defaults to (held length ..): a causal mask over the compressed cache; RoPE
            # gets the original positions from position_ids.
            positions = torch.arange(context, context + len(cont) - 1)[None]
            rest = model(input_ids=cont[None, :-1], past_key_values=cache, use_cache=True,
                         position_ids=positions).logits
        logits = torch.cat([last[0, -1:], rest[0]]).float()
        nll += float(F.cross_entropy(logits, cont, reduction="sum"))
        count += len(cont)
        for layer in model.model.layers:  # masks of a head-wise press must not leak into the next chunk
            layer.self_attn.masked_key_indices = None
    row = {k: sum(a[k] for a in acct) / len(acct) for k in acct[0]}
    row.update(perplexity=math.exp(nll / count), seconds=time.perf_counter() - t0, scored_tokens=count,
               load="load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=PEERS_CACHE / "smollm2-135m")
    p.add_argument("--chunks", type=Path, default=PEERS_CACHE, help="folder of chunks-{split}.json")
    p.add_argument("--splits", default="test,valid")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", default=None, help="comma-separated presses/peers to run (default: the plan)")
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many new rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()  # one progress line per row, not per weight
    transformers.utils.logging.disable_progress_bar()

    splits = args.splits.split(",")
    wanted = [args.model / "config.json"] + [args.chunks / f"chunks-{s}.json" for s in splits]
    if any(s not in ("test", "valid") for s in splits) or not all(p.exists() for p in wanted):
        print(f"error: need splits among test,valid (got {args.splits!r}) and the exported model and chunks "
              f"({args.model}, {args.chunks}); run `python -m benchmarks.peers.export` (main venv)", file=sys.stderr)
        return 2
    versions = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist("kvpress"),
                "transformers": transformers.__version__, "torch": torch.__version__,
                "optimum-quanto": _dist("optimum-quanto")}
    models: dict[str, Any] = {}

    def model_for(attn: str):
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(
                args.model, dtype=torch.float32, attn_implementation=attn).eval()
        return models[attn]

    # Re-read before every row and before every write: a second run on another part of the plan (--only)
    # may share the file; rows are merged by key, so neither drops the other's.
    def merged(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
        on_disk = load_rows(args.out)
        keys = {row_key(r) for r in on_disk}
        return on_disk + [r for r in mine if row_key(r) not in keys]

    rows: list[dict[str, Any]] = []
    run_cmd = "nice -n 5 .venv-peers/bin/python benchmarks/peers/run_kvpress.py " + " ".join(argv or sys.argv[1:])
    meta = {"command": f"make peers  (= python -m benchmarks.peers.export; {run_cmd})",
            "model": "smollm2-135m (dynaprune's dequantized Q4_1 GGUF, exported fp32)",
            "protocol": "continue: 8 chunks of 1536 context + 512 continuation, WikiText-2, original positions",
            "bytes": "see benchmarks/peers/schema.py and run_kvpress.py docstrings",
            "quantized_cache": QUANT | {"note": "a one-pass prefill quantizes the whole context (transformers' "
                                        "QuantizedLayer keeps no fp residual after its first update), so the "
                                        "context's fp residual window is 0 tokens; residual_length only "
                                        "applies to later tokens"}}
    only = set(args.only.split(",")) if args.only else None
    new = 0
    for spec in plan(splits):
        if only and (spec["press"] or spec["peer"]) not in only:
            continue
        opts = options_of(spec)
        press_name = spec["press"] or ("QuantizedCache" if spec["bits"] else "none")
        base = {"peer": spec["peer"], "press": press_name, "options": opts, "split": spec["split"]}
        if row_key(base) in {row_key(r) for r in merged(rows)}:
            continue
        data = json.loads((args.chunks / f"chunks-{spec['split']}.json").read_text())
        model = model_for(opts["attn_implementation"])
        if spec["press"] == "KVzip" and getattr(_tokenizer(args.model), "chat_template", None) is not None:
            print(f"error: {args.model} has a chat template: KVzip would leave the first tokens of our raw "
                  "chunks unscored; re-run the export (it drops the template)", file=sys.stderr)
            return 2
        try:
            result = run_row(spec, model, data["chunks"], data["context"])
        except Exception as e:  # a press that fails on this model is recorded as missing, not fatal
            print(f"[peers] {spec['split']} {press_name} keep={spec['keep']} bits={spec['bits']}: FAILED {e!r}",
                  flush=True)
            continue
        row = base | result | {"versions": versions}
        rows.append(row)
        write_rows_atomic(args.out, merged(rows), meta)
        print(f"[peers] {spec['split']} {press_name} keep={spec['keep']} bits={spec['bits']}: "
              f"ppl {row['perplexity']:.3f}  kept {row['tokens_kept_share']:.4f}  "
              f"bytes {row['kv_bytes_vs_fp16']:.4f}  {row['seconds']:.0f}s", flush=True)
        new += 1
        if args.max_rows and new >= args.max_rows:
            break
    return 0


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())

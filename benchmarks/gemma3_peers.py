"""Export Gemma 3 270M for the kvpress peers (issue 20): ``benchmarks/peers/export.py`` for Gemma. Main venv:

    python -m benchmarks.gemma3_peers [--max-examples 8] [--chunks-only N]

Writes under ``~/.cache/dynaprune/peers/`` (never the repo): ``gemma3-270m/`` (transformers'
``Gemma3ForCausalLM``, fp32, the weights ``dynaprune.load`` builds, and our GGUF tokenizer) and
``gemma3-chunks/chunks-test.json``: <bos> + 1536 + 512 ids per chunk (``evaluate_lm``'s continue chunks of
a ``requires_bos`` model; context 1537 = <bos> + 1536). Then, in the peers venv:

    .venv-peers/bin/python benchmarks/peers/run_kvpress.py --model ~/.cache/dynaprune/peers/gemma3-270m \\
        --chunks ~/.cache/dynaprune/peers/gemma3-chunks --splits test --only ObservedAttention --max-rows 2 \\
        --out benchmarks/results/gemma3-peers.json --threads 1

Checked before success (exit 1 otherwise): the reloaded folder gives our logits to 1e-4 on 600 tokens
(beyond the 512-token window). kvpress 0.5.5 refuses KVzip on ``Gemma3ForCausalLM`` (``KVzipPress is not
supported``), and hooks every layer of it, sliding ones included (its sliding-layer skip is for
``Gemma3ForConditionalGeneration`` only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.peers.export import DATA, PEERS_CACHE, continue_chunks, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PEERS_CACHE)
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--max-examples", type=int, default=8)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    import dynaprune
    from dynaprune.eval.lm import read_tokens

    model = dynaprune.load("gemma3-270m").eval()
    folder = args.out / "gemma3-270m"
    hf = model.to_transformers()
    hf.config.dtype = "float32"
    hf.save_pretrained(folder, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)
    ids = read_tokens(model, DATA / "test.txt", None)
    bos = model.tokenizer.bos_token_id
    chunks = [[bos, *c] for c in continue_chunks(ids, args.context, args.continuation, args.max_examples)]
    write_json_atomic(args.out / "gemma3-chunks" / "chunks-test.json", {
        "split": "test", "data": str(DATA / "test.txt"), "context": args.context + 1,
        "continuation": args.continuation, "max_examples": args.max_examples, "bos": True, "chunks": chunks})
    del hf  # memory: the check holds two copies at most
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    piece = torch.tensor(chunks[0][:600])[None]
    with torch.inference_mode():
        diff = float((model(piece) - reloaded(input_ids=piece).logits.float()).abs().max())
    print(f"exported {folder}; max |logit diff| ours vs reloaded folder on 600 tokens: {diff:.2e}")
    if diff > 1e-3:  # logits reach ~100: 1e-3 is 1e-5 of their size (tests/models/test_gemma3.py)
        print(f"error: the exported model's logits differ from ours by {diff:.2e}", file=sys.stderr)
        return 1
    print(json.dumps({"chunks": len(chunks), "context": args.context + 1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

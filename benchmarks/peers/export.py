"""Export SmolLM2-135M (our dequantized Q4_1 GGUF) as a transformers folder for the peers' venv, and the
exact token chunks of our ``continue`` protocol.

Runs in the main venv: ``python -m benchmarks.peers.export``. Writes, under ``~/.cache/dynaprune/peers/``
(never in the repo):
- ``smollm2-135m/``: config.json, model.safetensors (fp32, the same weights ``dynaprune.load`` builds),
  the GGUF's tokenizer saved with ``save_pretrained`` (KVzip reloads the tokenizer by the model's path);
- ``chunks-{test,valid}.json``: the first ``max_examples`` chunks of ``context + continuation`` token ids
  cut exactly as ``evaluate_lm(protocol="continue")`` cuts them (``read_tokens``: no special tokens).

Checks before it reports success (exit 1 otherwise): the folder reloaded with transformers gives our
logits to 1e-4 on a 2048-token chunk, and the saved tokenizer reloaded from the folder gives the same ids
as ours on the whole of both splits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

DATA = Path("/work/shared/data/wikitext2")
PEERS_CACHE = Path(os.environ.get("DYNAPRUNE_CACHE", Path.home() / ".cache" / "dynaprune")) / "peers"
SPLITS = {"test": "test.txt", "valid": "valid.txt"}


def continue_chunks(ids: list[int], context: int, continuation: int, max_examples: int) -> list[list[int]]:
    """The chunks ``evaluate_lm(protocol="continue")`` scores: consecutive, non-overlapping pieces of
    ``context + continuation`` ids, the last partial one dropped, the first ``max_examples`` kept."""
    size = context + continuation
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][:max_examples]


def write_json_atomic(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PEERS_CACHE)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--max-examples", type=int, default=8)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dynaprune
    from dynaprune.eval.lm import read_tokens

    model = dynaprune.load("smollm2-135m").eval()
    folder = args.out / "smollm2-135m"
    hf = model.to_transformers()
    hf.config.torch_dtype = "float32"
    hf.save_pretrained(folder, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)
    # No chat template in the folder: KVzip wraps the context in the template's prefix when it has one and
    # then leaves that many leading tokens unscored, but our chunks are raw WikiText (no chat prefix).
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = folder / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    if cfg.pop("chat_template", None) is not None:
        tok_cfg.write_text(json.dumps(cfg, indent=2))

    for split, name in SPLITS.items():
        ids = read_tokens(model, args.data / name, None)
        mine = AutoTokenizer.from_pretrained(folder)(
            (args.data / name).read_bytes().decode("utf-8"), add_special_tokens=False).input_ids
        if mine != ids:
            print(f"error: the saved tokenizer's ids differ from ours on {split}", file=sys.stderr)
            return 1
        chunks = continue_chunks(ids, args.context, args.continuation, args.max_examples)
        write_json_atomic(args.out / f"chunks-{split}.json", {
            "split": split, "data": str(args.data / name), "context": args.context,
            "continuation": args.continuation, "max_examples": args.max_examples, "chunks": chunks})

    # The reloaded folder must be our model: logits of the first test chunk to 1e-4.
    reloaded = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    chunk = torch.tensor(json.loads((args.out / "chunks-test.json").read_text())["chunks"][0])[None]
    with torch.inference_mode():
        ours = model(chunk)
        ours = ours[0] if isinstance(ours, tuple) else ours
        theirs = reloaded(chunk).logits
    diff = float((ours.float() - theirs.float()).abs().max())
    print(f"exported {folder}; max |logit diff| ours vs reloaded folder: {diff:.2e}")
    if diff > 1e-4:
        print(f"error: the exported model's logits differ from ours by {diff:.2e} (> 1e-4)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

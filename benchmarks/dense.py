"""Our dense forward vs transformers' dense forward, same process, same inputs (fp32, CPU or CUDA).

Workloads: MiniLM batch 32 x 128 tokens; SmolLM2 prefill of 1024 tokens; SmolLM2 decode of 128
tokens at a 1k context (greedy loop over a KV cache on both sides). Ratio = transformers / ours
(> 1 means ours is faster). Run: python -m benchmarks.dense [--repeats N]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

from benchmarks.common import median_seconds, save
from dynaprune import load
from dynaprune.paths import shared_data_dir


def wikitext_ids(tokenizer, n: int) -> list[int]:
    text = (shared_data_dir() / "wikitext2" / "test.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: n * 12], add_special_tokens=False)["input_ids"]
    assert len(ids) >= n, "not enough text"
    return ids[:n]


def bench_encoder(repeats: int) -> dict:
    ours = load("minilm-l6")
    from dynaprune.models.registry import fetch

    folder = fetch("minilm-l6")
    theirs = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor(wikitext_ids(ours.tokenizer, 32 * 128)).view(32, 128)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        t_ours = median_seconds(lambda: ours(ids, mask), repeats)
        t_theirs = median_seconds(lambda: theirs(input_ids=ids, attention_mask=mask.long()), repeats)
    return {"workload": "minilm batch 32 x 128", "ours": t_ours, "transformers": t_theirs,
            "ratio_transformers_over_ours": t_theirs["median_s"] / t_ours["median_s"]}


def _smollm2_pair():
    """Our SmolLM2 and transformers' LlamaForCausalLM holding the very same (dequantized) weights."""
    ours = load("smollm2-135m")
    return ours, ours.to_transformers()


def bench_prefill(ours, theirs, repeats: int) -> dict:
    ids = torch.tensor([wikitext_ids(ours.tokenizer, 1024)])
    with torch.inference_mode():
        t_ours = median_seconds(lambda: ours(ids), repeats)
        t_theirs = median_seconds(lambda: theirs(input_ids=ids, use_cache=False), repeats)
    return {"workload": "smollm2 prefill 1024", "ours": t_ours, "transformers": t_theirs,
            "ratio_transformers_over_ours": t_theirs["median_s"] / t_ours["median_s"]}


def bench_decode(ours, theirs, repeats: int, context: int = 1024, new_tokens: int = 128) -> dict:
    ids = torch.tensor([wikitext_ids(ours.tokenizer, context)])

    def run_ours():
        cache = ours.new_cache(1, context + new_tokens)
        logits = ours(ids, cache=cache)
        token = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            token = ours(token, cache=cache)[:, -1:].argmax(-1)

    def run_theirs():
        out = theirs(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = theirs(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    # Time the decode part only: subtract a prefill-only run measured the same way.
    with torch.inference_mode():
        full_ours = median_seconds(run_ours, repeats)
        full_theirs = median_seconds(run_theirs, repeats)
        pre_ours = median_seconds(lambda: ours(ids, cache=ours.new_cache(1, context + 1)), repeats)
        pre_theirs = median_seconds(lambda: theirs(input_ids=ids, use_cache=True), repeats)
    dec_ours = full_ours["median_s"] - pre_ours["median_s"]
    dec_theirs = full_theirs["median_s"] - pre_theirs["median_s"]
    return {"workload": f"smollm2 decode {new_tokens} tokens at {context} context",
            "ours_tokens_per_s": new_tokens / dec_ours, "transformers_tokens_per_s": new_tokens / dec_theirs,
            "ours_full": full_ours, "transformers_full": full_theirs,
            "ratio_transformers_over_ours": dec_theirs / dec_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"encoder": bench_encoder(args.repeats)}
    print("encoder", round(results["encoder"]["ratio_transformers_over_ours"], 3))
    ours, theirs = _smollm2_pair()
    results["prefill"] = bench_prefill(ours, theirs, args.repeats)
    print("prefill", round(results["prefill"]["ratio_transformers_over_ours"], 3))
    results["decode"] = bench_decode(ours, theirs, max(3, args.repeats // 2))
    print("decode", round(results["decode"]["ratio_transformers_over_ours"], 3))
    sub = "gpu" if torch.cuda.is_available() else ""
    print("wrote", save("dense", {"results": results}, sub))


if __name__ == "__main__":
    main()

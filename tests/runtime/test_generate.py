"""generate(): greedy/sampling/stop tokens/batches on a tiny model; SmolLM2 greedy == transformers."""

from __future__ import annotations

import json

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.generate import default_stop_tokens


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=50, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=64)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # peaked distributions: no near-ties between greedy candidates
    return model


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def test_greedy_with_cache_equals_recomputing_everything(tiny):
    res = tiny.generate([3, 1, 4, 1, 5], max_new_tokens=12, stop_tokens=[])
    assert res.new_ids == greedy_without_cache(tiny, [3, 1, 4, 1, 5], 12)
    assert res.prompt_ids == [3, 1, 4, 1, 5] and res.stop_reason == "max_new_tokens"
    assert res.seconds >= res.prefill_seconds > 0 and res.decode_tokens_per_s > 0


def test_stop_token_ends_generation_and_is_kept(tiny):
    first = tiny.generate([7, 8, 9], max_new_tokens=5, stop_tokens=[]).new_ids
    res = tiny.generate([7, 8, 9], max_new_tokens=5, stop_tokens=[first[1]])
    assert res.new_ids == first[:2] and res.stop_reason == "stop_token"


def test_sampling_is_reproducible_with_a_seed_and_tiny_top_p_is_greedy(tiny):
    a = tiny.generate([1, 2, 3], max_new_tokens=10, temperature=1.5, seed=7, stop_tokens=[]).new_ids
    b = tiny.generate([1, 2, 3], max_new_tokens=10, temperature=1.5, seed=7, stop_tokens=[]).new_ids
    assert a == b
    greedy = tiny.generate([1, 2, 3], max_new_tokens=10, stop_tokens=[]).new_ids
    nucleus = tiny.generate([1, 2, 3], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=1, stop_tokens=[])
    assert nucleus.new_ids == greedy
    seeds = {tuple(tiny.generate([1, 2, 3], max_new_tokens=10, temperature=5.0, seed=s, stop_tokens=[]).new_ids)
             for s in range(4)}
    assert len(seeds) > 1  # it really samples


def test_left_padded_batch_equals_one_by_one(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batch = tiny.generate(prompts, max_new_tokens=8, stop_tokens=[])
    assert batch.new_ids == [tiny.generate(p, max_new_tokens=8, stop_tokens=[]).new_ids for p in prompts]
    assert batch.prompt_ids == prompts and batch.stop_reason == ["max_new_tokens"] * 3


def test_batch_rows_stop_independently(tiny):
    prompts = [[5, 6, 7], [20, 21, 22, 23]]
    alone = [tiny.generate(p, max_new_tokens=6, stop_tokens=[]).new_ids for p in prompts]
    stop = alone[0][1]
    res = tiny.generate(prompts, max_new_tokens=6, stop_tokens=[stop])
    assert res.new_ids[0] == alone[0][:2] and res.stop_reason[0] == "stop_token"
    if stop not in alone[1]:
        assert res.new_ids[1] == alone[1] and res.stop_reason[1] == "max_new_tokens"


def test_bad_generation_arguments(tiny):
    with pytest.raises(DynapruneError, match="max_new_tokens"):
        tiny.generate([1, 2], max_new_tokens=0)
    with pytest.raises(DynapruneError, match="top_p"):
        tiny.generate([1, 2], top_p=0.0)
    with pytest.raises(DynapruneError, match="temperature"):
        tiny.generate([1, 2], temperature=-1.0)
    with pytest.raises(DynapruneError, match="exceeds the model's 64 positions"):
        tiny.generate(list(range(40)), max_new_tokens=30)
    with pytest.raises(DynapruneError, match="no tokenizer"):
        tiny.generate("hello")
    with pytest.raises(DynapruneError, match="prompt must be"):
        tiny.generate([])


# ---- SmolLM2: greedy generation equals transformers' generate -------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Llama.from_gguf(smollm2_path)


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_on_mt_bench(smol, shared_data):
    """64 greedy tokens on 5 MT-Bench first turns, chat template applied; the oracle is transformers'
    LlamaForCausalLM with the same weights (test_llama checks them against transformers' GGUF loading)."""
    lines = (shared_data / "mt-bench" / "questions.jsonl").read_text().splitlines()[:5]
    questions = [json.loads(line)["turns"][0] for line in lines]
    hf = smol.to_transformers()
    tok = smol.tokenizer
    stops = sorted(default_stop_tokens(tok))
    assert tok.eos_token_id in stops
    for q in questions:
        ours = smol.generate(q, max_new_tokens=64, chat=True)
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        assert ours.prompt_ids == ids[0].tolist()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id)
        assert ours.new_ids == out[0, ids.shape[1]:].tolist(), q
        assert ours.text == tok.decode(ours.new_ids, skip_special_tokens=True)
        assert ours.stop_reason in ("stop_token", "max_new_tokens") and len(ours.new_ids) <= 64

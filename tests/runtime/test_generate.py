"""generate(): greedy/sampling/stop tokens/batches on a tiny model; SmolLM2 greedy == transformers."""

from __future__ import annotations

import json

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.generate import cache_capacity, default_stop_tokens
from dynaprune.runtime.pruning import make_context


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


# ---- a KV budget bounds the cache's memory for any generation length --------------------------------



@pytest.fixture(scope="module")
def tiny_long():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab=50, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=512)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(20)
    return model


def test_kv_budget_bounds_the_cache_for_any_generation_length(tiny_long, streaming_oracle):
    """kv_tokens=8 on a 16-token prompt: the cache holds 8 tokens + the one a step adds, whether 20 or 120
    tokens are generated; the tokens are those of the StreamingLLM oracle (recompute-everything)."""
    prompt = [(7 * i + 3) % 50 for i in range(16)]
    # independent count: layers x (K, V) x batch x KV heads x (budget + 1) slots x head_dim x 4 bytes
    bound = 2 * 2 * 1 * 2 * (8 + 1) * 8 * 4
    held = {}
    for n in (20, 120):
        ctx = make_context("kv_tokens=8,sink=2,score=streaming", tiny_long)
        out = tiny_long.generate(prompt, max_new_tokens=n, stop_tokens=[], ctx=ctx)
        assert len(out.new_ids) == n and ctx.cache.capacity == 16  # the prompt's prefill needs 16 slots
        held[n] = ctx.cache.bytes_held()
        assert ctx.cache.bytes_allocated() == 2 * 2 * 1 * 2 * 16 * 8 * 4 and held[n] <= bound
    assert held[20] == held[120] == 2 * 2 * 1 * 2 * 8 * 8 * 4  # 8 tokens held after the last step
    dense = tiny_long.new_cache(1, 16 + 120).bytes_allocated()  # what an unbounded cache would take
    assert dense > 8 * ctx.cache.bytes_allocated()
    ids = list(prompt)
    with torch.inference_mode():  # greedy, recomputing everything under the eviction's attention pattern
        for _ in range(40):
            logits = tiny_long(torch.tensor([ids]), ctx=streaming_oracle(budget=8, sink=2, first=16))
            ids.append(int(logits[0, -1].argmax()))
    assert out.new_ids[:40] == ids[16:]


def test_kv_budget_of_the_whole_prompt_and_batches(tiny_long):
    """A budget of the whole prompt needs budget + 1 slots; a left-padded batch evicts per row."""
    ctx = make_context("kv_tokens=16,score=h2o", tiny_long)
    tiny_long.generate(list(range(1, 17)), max_new_tokens=40, stop_tokens=[], ctx=ctx)
    assert ctx.cache.capacity == 17 and ctx.cache.lengths == [16, 16]
    prompts = [list(range(1, 17)), list(range(5, 15))]
    ctx = make_context("kv_tokens=6,sink=2,score=streaming", tiny_long)
    batch = tiny_long.generate(prompts, max_new_tokens=20, stop_tokens=[], ctx=ctx)
    assert ctx.cache.capacity == 16 and ctx.cache.lengths == [6, 6]
    alone = [tiny_long.generate(p, max_new_tokens=20, stop_tokens=[],
                                ctx=make_context("kv_tokens=6,sink=2,score=streaming", tiny_long)).new_ids
             for p in prompts]
    assert batch.new_ids == alone
    assert cache_capacity(316, 16, 1, None) == 316 and cache_capacity(316, 16, 1, 8) == 16
    assert cache_capacity(316, 16, 1, 24) == 25 and cache_capacity(10, 4, 1, 24) == 10

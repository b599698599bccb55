"""The generate task (MT-Bench answers scored against the dense answers): metrics against hand-worked
oracles, the dense-answer cache, batching, errors, the CLI; a tiny random Llama with a character-level
chat tokenizer stands in for SmolLM2 (one short real-model test)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval.mtbench import (
    agreement,
    answers_cache_path,
    common_prefix,
    evaluate_generate,
    lcs_length,
    length_batches,
    load_questions,
    rouge_l_f1,
)
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.pruning import make_context

VOCAB = 64
EOS = 63


class ChatCharTokenizer:
    """One token per character (ids 1..62), EOS 63, a chat template of plain text markers."""

    chat_template = "user: {content}\nassistant:"
    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[1 + ord(ch) % (VOCAB - 2) for ch in text])

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.chat_template.format(content=messages[0]["content"])

    def get_vocab(self):
        return {"<eos>": EOS}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + i % 64) for i in ids if i != EOS)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=256)
    model = Llama(cfg, tokenizer=ChatCharTokenizer(), name="tiny-chat").eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # peaked distributions: no near-ties between greedy candidates
    return model


@pytest.fixture(autouse=True)
def answers_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "answers"


def write_questions(path, prompts):
    path.write_text("".join(json.dumps({"question_id": 81 + i, "category": "writing", "turns": [p, "again?"]})
                            + "\n" for i, p in enumerate(prompts)))
    return path


PROMPTS = ["Tell me a story.", "Why is the sky blue?", "List three fruits please.", "Hi", "Explain attention.",
           "What is a KV cache used for in decoders?"]


@pytest.fixture
def questions(tmp_path):
    return write_questions(tmp_path / "questions.jsonl", PROMPTS)


# ---- metrics against hand-worked oracles ---------------------------------------------------------


def brute_force_lcs(a, b):
    """Longest common subsequence by trying every subsequence of the shorter one (tiny inputs only)."""
    from itertools import combinations

    short, long_ = (a, b) if len(a) <= len(b) else (b, a)

    def is_subsequence(sub, seq):
        it = iter(seq)
        return all(x in it for x in sub)

    for n in range(len(short), -1, -1):
        if any(is_subsequence(c, long_) for c in combinations(short, n)):
            return n
    return 0


def test_lcs_and_rouge_l_against_oracles():
    assert lcs_length([1, 2, 3, 4], [2, 4, 3, 1, 4]) == 3  # 2 3 4
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        a = torch.randint(0, 4, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(0, 4, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
        assert lcs_length(a, b) == brute_force_lcs(a, b) == lcs_length(b, a)
    # LCS 3 of 4 candidate and 5 reference tokens: P = 3/4, R = 3/5, F = 2PR / (P + R) = 2/3
    assert rouge_l_f1([1, 2, 3, 4], [2, 4, 3, 1, 4]) == pytest.approx(2 / 3)
    assert rouge_l_f1([5, 6], [5, 6]) == 1.0 and rouge_l_f1([], []) == 1.0
    assert rouge_l_f1([1], []) == 0.0 and rouge_l_f1([1, 2], [3, 4]) == 0.0


def test_agreement_metrics():
    ref = [list(range(40)), [1, 2, 3], [7, 8, 9, 10]]
    ans = [list(range(40)), [1, 2, 4], [9, 8, 7]]  # exact; first 2 shared; only 8 in common (LCS 1)
    m = agreement(ans, ref)
    assert m["match32"] == pytest.approx(1 / 3)
    assert m["prefix_tokens_agreed"] == pytest.approx((40 + 2 + 0) / 3)
    assert m["prefix_agreement"] == pytest.approx((40 / 40 + 2 / 3 + 0 / 4) / 3)  # share of the longer answer
    rouge = [1.0, 2 / 3, 2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4)]
    assert m["per_prompt_rouge_l"] == pytest.approx(rouge) and m["rouge_l_f1"] == pytest.approx(sum(rouge) / 3)
    assert m["mean_length"] == pytest.approx(46 / 3) and m["dense_mean_length"] == pytest.approx(47 / 3)
    long_same_start = agreement([list(range(32)) + [99]], [list(range(32)) + [98, 97]])
    assert long_same_start["match32"] == 1.0 and long_same_start["prefix_tokens_agreed"] == 32
    assert long_same_start["prefix_agreement"] == pytest.approx(32 / 34)
    assert agreement([[1]], [[1]], max_new_tokens=31)["match32"] is None  # 31 new tokens cannot show 32
    assert agreement([[1]], [[1]], max_new_tokens=32)["match32"] == 1.0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_length_batches():
    lengths = [50, 10, 11, 12, 30, 10, 100, 105]
    assert length_batches(lengths, 2) == [[1, 5], [2, 3], [4], [0], [6, 7]]
    assert length_batches(lengths, 8) == [[1, 5, 2], [3], [4], [0], [6, 7]]  # 12 > 1.1 x 10
    assert sorted(i for b in length_batches(lengths, 3, spread=10.0) for i in b) == list(range(8))


# ---- the task ------------------------------------------------------------------------------------


def test_dense_against_dense_is_exact_and_the_answers_are_cached(tiny, questions, answers_cache):
    res = evaluate_generate(tiny, questions, max_new_tokens=8, batch_size=4)
    assert res.task == "generate" and res.n == 6 and res.metric["name"] == "rouge_l_f1"
    assert res.metric["value"] == 1.0 and res.metric["match32"] is None  # 8 new tokens: n/a
    assert res.metric["prefix_agreement"] == 1.0
    assert res.metric["prefix_tokens_agreed"] == res.metric["mean_length"] == res.metric["dense_mean_length"]
    assert res.extra["reference_cached"] is False and len(res.extra["per_prompt"]) == 6
    files = list(answers_cache.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("tiny-chat-")
    cached = json.loads(files[0].read_text())
    # the oracle: each prompt alone, through generate() with the chat template, stop token removed
    for prompt, answer in zip(PROMPTS, cached["answers"], strict=True):
        alone = tiny.generate(prompt, chat=True, max_new_tokens=8).new_ids
        assert answer == [t for t in alone if t != EOS]
    again = evaluate_generate(tiny, questions, max_new_tokens=8, batch_size=4,
                              ctx_factory=lambda: make_context("dense", tiny))
    assert again.extra["reference_cached"] is True and again.metric["value"] == 1.0
    evaluate_generate(tiny, questions, max_new_tokens=9, batch_size=4, max_examples=2)  # new key, new file
    assert len(list(answers_cache.glob("*.json"))) == 2


def test_a_changed_setting_or_a_corrupt_file_recomputes(tiny, questions, answers_cache):
    prompts = [tiny.tokenizer(f"user: {p}\nassistant:").input_ids for p in PROMPTS]
    key = answers_cache_path(tiny, prompts, 8, 4)
    assert key != answers_cache_path(tiny, prompts, 16, 4) != answers_cache_path(tiny, prompts[:3], 8, 4)
    assert key != answers_cache_path(tiny, prompts, 8, 2)
    evaluate_generate(tiny, questions, max_new_tokens=8, batch_size=4)
    assert key.is_file()
    key.write_text("{not json")
    res = evaluate_generate(tiny, questions, max_new_tokens=8, batch_size=4)
    assert res.extra["reference_cached"] is False and res.metric["value"] == 1.0
    assert json.loads(key.read_text())["max_new_tokens"] == 8


def test_pruned_answers_are_scored_against_dense(tiny, questions):
    """kv_tokens=4 tokens under StreamingLLM eviction, in batches; the oracle is each prompt generated alone
    (its own cache, same recipe) scored by ROUGE-L against the dense answer generated alone."""
    recipe = "kv_tokens=4,sink=1,score=streaming"
    made = []

    def factory():
        made.append(make_context(recipe, tiny))
        return made[-1]

    res = evaluate_generate(tiny, questions, max_new_tokens=24, batch_size=4, ctx_factory=factory)
    prompts = [tiny.tokenizer(f"user: {p}\nassistant:").input_ids for p in PROMPTS]
    batches = length_batches([len(p) for p in prompts], 4)
    assert len(made) == res.extra["batches"] == len(batches) >= 2
    for ctx, rows in zip(made, batches, strict=True):  # slots for the prompt, not prompt + 24 new tokens
        assert ctx.cache.capacity == max(len(prompts[i]) for i in rows) and ctx.cache.lengths == [4, 4]
    per = res.extra["per_prompt"]
    assert [p["question_id"] for p in per] == list(range(81, 87))
    for prompt, row in zip(PROMPTS, per, strict=True):
        dense = [t for t in tiny.generate(prompt, chat=True, max_new_tokens=24).new_ids if t != EOS]
        pruned = tiny.generate(prompt, chat=True, max_new_tokens=24, ctx=make_context(recipe, tiny)).new_ids
        pruned = [t for t in pruned if t != EOS]
        assert row["rouge_l_f1"] == pytest.approx(rouge_l_f1(pruned, dense)) and row["length"] == len(pruned)
    assert res.metric["value"] == pytest.approx(sum(p["rouge_l_f1"] for p in per) / 6)
    assert res.metric["value"] < 1.0  # the budget changed some answers


@pytest.mark.parametrize(("recipe", "budget"), [("kv_tokens=4,sink=1,score=streaming", 4), ("kv_tokens=6,score=h2o", 6),
                                                ("kv_tokens=5,score=spatten", 5)])
def test_generation_holds_the_budget_at_every_decode_step(tiny, questions, attended_keys, recipe, budget):
    """The real keys of every row at every layer of every decode step (read from what the attention
    receives, not from the cache's counters) never exceed the budget + the token being fed, and reach
    it; the prefill sees each row's whole prompt."""
    evaluate_generate(tiny, questions, max_new_tokens=16, batch_size=4)  # the dense answers, cached
    attended_keys.calls.clear()
    evaluate_generate(tiny, questions, max_new_tokens=16, batch_size=4, ctx_factory=lambda: make_context(recipe, tiny))
    prompts = [tiny.tokenizer(f"user: {p}\nassistant:").input_ids for p in PROMPTS]
    batches = length_batches([len(p) for p in prompts], 4)
    forwards = attended_keys.per_forward(layers=2)
    prefills = [i for i, (q, _) in enumerate(forwards) if q > 1]
    assert len(prefills) == len(batches)
    for rows, start in zip(batches, prefills, strict=True):
        assert forwards[start][1] == [len(prompts[i]) for i in rows] * 2  # 2 layers
    steps = [keys for q, keys in forwards if q == 1]
    assert len(steps) >= 15 and max(max(keys) for keys in steps) == budget + 1
    assert all(n <= budget + 1 for keys in steps for n in keys)


def test_bad_input(tiny, tmp_path, questions):
    with pytest.raises(DynapruneError, match="no such questions file"):
        evaluate_generate(tiny, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DynapruneError, match="no questions"):
        evaluate_generate(tiny, empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(DynapruneError, match="bad.jsonl:1: needs a 'turns' list"):
        evaluate_generate(tiny, bad)
    bad.write_text("[1, 2\n")
    with pytest.raises(DynapruneError, match="not JSON"):
        load_questions(bad)
    for n in (0, -3):
        with pytest.raises(DynapruneError, match="max_new_tokens must be > 0"):
            evaluate_generate(tiny, questions, max_new_tokens=n)
    with pytest.raises(DynapruneError, match="max_examples must be > 0"):
        evaluate_generate(tiny, questions, max_examples=0)
    with pytest.raises(DynapruneError, match="exceeds the model's 256 positions"):
        evaluate_generate(tiny, questions, max_new_tokens=250)


def test_cli_generate_task_and_errors(tiny, questions, tmp_path, monkeypatch, dynaprune_cli):
    """`dynaprune eval MODEL generate` (loading stubbed with the tiny model); bad input: exit 2."""
    import dynaprune

    monkeypatch.setattr(dynaprune, "load", lambda name, say=None: tiny)

    def cli(*args):
        return dynaprune_cli("eval", "tiny", "generate", *args)

    out_json = tmp_path / "r.json"
    code, out = cli("--data", str(questions), "--max-new-tokens", "8", "--max-examples", "3", "--recipe",
                    "kv_tokens=4,score=h2o", "--json", str(out_json))
    assert code == 0 and "rouge_l_f1" in out
    row = json.loads(out_json.read_text())
    assert row["task"] == "generate" and row["n"] == 3 and row["recipe"] == "kv_tokens=4,score=h2o"
    assert row["cost"]["flops_kept"] < 1.0 and "pruning" in row["cost"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args, message in ((("--data", str(questions), "--max-new-tokens", "0"), "--max-new-tokens"),
                          (("--data", str(tmp_path / "nope.jsonl")), "data file not found"),
                          (("--data", str(empty)), "no questions")):
        code, out = cli(*args)
        assert code == 2 and message in out and "Traceback" not in out


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_dense_reference_is_transformers_greedy_answer(smollm2_path, shared_data):
    """SmolLM2-Instruct, two MT-Bench prompts x 12 tokens: the dense reference answers (generated in a
    left-padded batch of 2 and cached) are transformers' own greedy answers to each prompt alone, so
    agreement is measured against the real model's output; the cache gives them back unchanged."""
    from dynaprune.eval.mtbench import dense_answers
    from dynaprune.runtime.generate import default_stop_tokens, encode_prompts

    model = Llama.from_gguf(smollm2_path)
    path = shared_data / "mt-bench" / "questions.jsonl"
    prompts, _ = encode_prompts(model, [q.prompt for q in load_questions(path, 2)], chat=True)
    answers, cached, _ = dense_answers(model, prompts, max_new_tokens=12, batch_size=2)
    assert cached is False and len(answers) == 2
    hf = model.to_transformers()
    stops = sorted(default_stop_tokens(model.tokenizer))
    for prompt, ours in zip(prompts, answers, strict=True):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        theirs = out[0, len(prompt):].tolist()
        theirs = theirs[:-1] if theirs and theirs[-1] in stops else theirs
        assert ours == theirs and len(ours) > 0
    assert dense_answers(model, prompts, max_new_tokens=12, batch_size=2)[:2] == (answers, True)

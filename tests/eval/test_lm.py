"""The lm task: window and continue perplexity protocols, errors; SmolLM2 against transformers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError
from dynaprune.eval.lm import evaluate_lm
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.attention import RunContext


class CharTokenizer:
    """One token per character (enough to test the protocols without a real vocabulary)."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    return Llama(cfg, tokenizer=CharTokenizer(), name="tiny").eval()


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 10)  # 450 characters
    return p


def nll_sum(model, ids):
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0]
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


def test_window_protocol_matches_a_manual_computation(tiny, text):
    ids = CharTokenizer()(text.read_text()).input_ids[:301]
    calls = []
    res = evaluate_lm(tiny, text, window=100, max_tokens=301, progress=lambda d, t: calls.append((d, t)))
    # windows of 100, 100, 100 and a last one of 1 token, which predicts nothing and is dropped
    expected = sum(nll_sum(tiny, ids[i:i + 100]) for i in (0, 100, 200)) / 297
    assert res.task == "lm" and res.n == 3 and res.metric["tokens"] == 297
    assert res.metric["name"] == "perplexity" and math.isclose(res.metric["nll"], expected, rel_tol=1e-6)
    assert math.isclose(res.metric["value"], math.exp(expected), rel_tol=1e-6)
    assert calls == [(1, 3), (2, 3), (3, 3)] and res.cost == {} and res.model == "tiny"
    assert evaluate_lm(tiny, text, window=100, max_tokens=302).n == 4  # a last window of 2 tokens counts
    assert evaluate_lm(tiny, text, window=100, max_examples=2).n == 2


def test_continue_protocol_scores_the_continuation_only(tiny, text):
    ids = CharTokenizer()(text.read_text()).input_ids
    made = []

    def factory():
        made.append(RunContext())
        return made[-1]

    res = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, ctx_factory=factory)
    assert res.n == 4 and res.metric["tokens"] == 160 and len(made) == 4  # 450 tokens -> 4 chunks of 100
    total = 0.0
    for c in range(4):
        chunk = torch.tensor([ids[c * 100:(c + 1) * 100]])
        with torch.inference_mode():
            logits = tiny(chunk)[0]
        total += float(F.cross_entropy(logits[59:99], chunk[0, 60:], reduction="sum"))
    assert math.isclose(res.metric["nll"], total / 160, rel_tol=1e-5)
    step = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, max_examples=2,
                       stepwise=True)
    assert step.n == 2 and math.isclose(step.metric["nll"], total / 160, rel_tol=0.5)  # sanity
    one = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, max_examples=2)
    assert math.isclose(step.metric["nll"], one.metric["nll"], rel_tol=1e-5)  # decode steps == one pass


def test_bad_input(tiny, tmp_path, text):
    with pytest.raises(DynapruneError, match="no such text file"):
        evaluate_lm(tiny, tmp_path / "missing.txt", window=16)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DynapruneError, match="empty"):
        evaluate_lm(tiny, empty, window=16)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(DynapruneError, match="not UTF-8"):
        evaluate_lm(tiny, latin, window=16)
    with pytest.raises(DynapruneError, match="max_tokens must be > 0"):
        evaluate_lm(tiny, text, window=16, max_tokens=0)
    with pytest.raises(DynapruneError, match="window must be >= 2"):
        evaluate_lm(tiny, text, window=1)
    with pytest.raises(DynapruneError, match="exceeds the model's 128 positions"):
        evaluate_lm(tiny, text, window=129)
    with pytest.raises(DynapruneError, match="exceeds the model's 128 positions"):
        evaluate_lm(tiny, text, protocol="continue", context=100, continuation=29)
    with pytest.raises(DynapruneError, match="fewer than the 120"):
        evaluate_lm(tiny, text, protocol="continue", context=80, continuation=40, max_tokens=100)
    with pytest.raises(DynapruneError, match="unknown lm protocol"):
        evaluate_lm(tiny, text, protocol="sliding")


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_wikitext_perplexity_matches_transformers(smollm2_path, shared_data):
    """Our perplexity on the first 2048 WikiText-2 test tokens (two 1024-token windows) equals the one
    transformers' LlamaForCausalLM gives on the same windows (same weights)."""
    model = Llama.from_gguf(smollm2_path)
    path = shared_data / "wikitext2" / "test.txt"
    res = evaluate_lm(model, path, window=1024, max_tokens=2048)
    hf = model.to_transformers()
    ids = model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:2048]
    nll = 0.0
    with torch.inference_mode():
        for i in range(0, 2048, 1024):
            w = torch.tensor([ids[i:i + 1024]])
            nll += float(F.cross_entropy(hf(w).logits[0, :-1], w[0, 1:], reduction="sum"))
    ppl = math.exp(nll / 2046)
    assert res.metric["tokens"] == 2046 and res.n == 2
    assert abs(res.metric["value"] / ppl - 1) <= 1e-3
    assert 5 < ppl < 60  # a sane language model, not noise

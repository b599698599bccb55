"""Issue 17: one recipe= everywhere, costs returned with outputs, dynaprune.evaluate, the CLI's generate
--recipe / eval --compare-dense / --trace, plain progress lines. Oracles are hand counts on a tiny model."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

import dynaprune
from dynaprune import DynapruneError, Recipe
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.pruning import make_context


class CharTokenizer:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    return Llama(cfg, tokenizer=CharTokenizer(), name="tiny").eval()


def test_recipe_keyword_typo_says_did_you_mean():
    for build in (lambda: Recipe(tokn=0.5), lambda: Recipe.parse("tokn=0.5"), lambda: Recipe.from_dict({"tokn": 1})):
        with pytest.raises(DynapruneError, match="did you mean 'token'"):
            build()


def test_generate_with_a_recipe_returns_its_cost(tiny):
    """40-token prompt, kv=0.25: budget 10 tokens (hand count). 5 new tokens = 4 decode forwards after the
    prompt, each reading the 10 held tokens where a full cache holds 40, 41, 42, 43: K/V bytes 40/166.
    Eviction: 30 per layer after the prompt, then 1 per layer per decode step: (30 + 4) x 2 layers."""
    out = tiny.generate("x" * 40, max_new_tokens=5, recipe="kv=0.25,score=h2o")
    assert len(out.new_ids) == 5 and out.cost["kv_budget_tokens"] == 10
    assert out.cost["kv_bytes_vs_fp16"] == pytest.approx(40 / 166)
    assert out.cost["pruning"]["kv_evicted_tokens"] == 68 and out.cost["pruning"]["kv_evictions"] == 10
    ctx = make_context("kv=0.25,score=h2o", tiny)  # the same run with the context made by hand
    assert tiny.generate("x" * 40, max_new_tokens=5, ctx=ctx).new_ids == out.new_ids
    summary = ctx.summary()
    assert summary["kv_held_per_layer"] == [10, 10] and summary["kv_evicted_tokens"] == 68
    dense = tiny.generate("x" * 40, max_new_tokens=5)
    assert dense.cost["flops_kept"] == 1.0 and dense.cost["kv_bytes_vs_fp16"] == 1.0
    assert "kv_budget_tokens" not in dense.cost
    assert out.cost["flops_kept"] < 1.0


def test_generate_bad_recipe_refused_before_model_work(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(DynapruneError, match="unknown recipe key"):
        tiny.generate("hello", recipe="tokn=0.5")
    with pytest.raises(DynapruneError, match="not both"):
        tiny.generate("hello", recipe="kv=0.5", ctx=make_context("kv=0.5", tiny))
    with pytest.raises(DynapruneError):
        tiny.generate("hello", recipe="head=0.5,head_schedule=9:0.5")  # layer 9 of a 2-layer model


def test_dense_trace_has_one_row_per_head_and_query(tiny, tmp_path):
    """make_context('dense', trace=True) keeps the flag: a 10-token prefill of 2 layers x 4 heads gives
    80 rows, query i fetching i + 1 keys (causal), readable by the hw simulator's reader."""
    from dynaprune.hw.trace import read_trace
    from dynaprune.runtime.trace import write_run_trace

    ctx = make_context("dense", tiny, trace=True)
    tiny(torch.ones(1, 10, dtype=torch.long), ctx=ctx)
    path = write_run_trace(tmp_path / "dense.csv", ctx)
    trace = read_trace(path)
    keys = trace.columns["key_fetch_num"].tolist()
    assert len(keys) == 80 and keys[:10] == list(range(1, 11))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    return path


def test_evaluate_returns_the_record_the_cli_writes(tiny, text_file):
    from dynaprune.cli_eval import run_task

    options = dict(protocol="continue", context=40, continuation=8, max_examples=2)
    record = dynaprune.evaluate(tiny, "lm", data=text_file, recipe=Recipe(kv=0.25), **options)
    cli = run_task("tiny", "lm", data=text_file, recipe="kv=0.25", model=tiny, **options).to_json()
    for key in ("metric", "recipe", "n", "extra"):
        assert record[key] == cli[key], key
    assert record["cost"]["flops_kept"] == cli["cost"]["flops_kept"] < 1.0
    assert record["extra"]["kv_budget_tokens"] == 10  # keep 25% of the 40 context tokens


@pytest.mark.parametrize("kwargs, needle", [
    (dict(task="nope"), "unknown task"), (dict(task="lm", max_examples=0), "positive"),
    (dict(task="lm", windw=5), "unknown option 'windw'"), (dict(task="lm", recipe="tokn=1"), "did you mean"),
    (dict(task="lm", data="/nonexistent/x.txt"), "not found"),
])
def test_evaluate_bad_input_raises_before_loading(monkeypatch, kwargs, needle):
    monkeypatch.setattr(dynaprune, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DynapruneError, match=needle):
        dynaprune.evaluate("smollm2-135m", **kwargs)


def test_evaluate_writes_a_trace(tiny, text_file, tmp_path):
    from dynaprune.hw.trace import read_trace

    path = tmp_path / "run.csv"
    dynaprune.evaluate(tiny, "lm", data=text_file, recipe="token=0.5", trace=path, max_tokens=60, window=30)
    assert len(read_trace(path).columns["key_fetch_num"]) > 0


def test_encode_takes_a_string_or_a_list(minilm_path):
    model = dynaprune.load(str(minilm_path))
    one = model.encode("A man is playing a guitar.")
    many = model.encode(["A man is playing a guitar.", "A dog runs."])
    assert one.shape == (384,) and many.shape == (2, 384)
    assert torch.allclose(one, many[0], atol=1e-5) and one.cost["flops_kept"] == 1.0
    pruned = model.embed(["A man is playing a guitar in the park at night."], "token=0.5")
    assert pruned.cost["flops_kept"] < 1.0 and pruned.cost["pruning"]["tokens_per_layer"]
    with pytest.raises(DynapruneError, match="not both"):
        model.embed(["a b"], "token=0.5", ctx_factory=lambda: make_context("token=0.5", model))


def test_plain_progress_lines(capsys):
    from dynaprune.cli_common import plain_progress

    with plain_progress("sts on dev.tsv", every=3600) as update:
        for done in range(0, 11):
            update(done, 10)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("sts on dev.tsv: 0/10 (0%)") and "10/10 (100%)" in lines[1]


# ------------------------------------------------------------------ the CLI


def test_cli_generate_recipe_refused_before_loading(dynaprune_cli, monkeypatch):
    monkeypatch.setattr(dynaprune, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    code, text = dynaprune_cli("generate", "smollm2-135m", "hi", "--recipe", "kvv=0.5")
    assert code == 2 and text.strip().startswith("error:") and "did you mean 'kv'" in text
    assert len(text.strip().splitlines()) == 1


def test_cli_generate_with_recipe_prints_its_cost(dynaprune_cli, monkeypatch, tiny):
    monkeypatch.setattr(dynaprune, "load", lambda *a, **k: tiny)
    code, text = dynaprune_cli("generate", "tiny", "x" * 40, "--max-new-tokens", "5", "--recipe", "kv=0.25")
    assert code in (0, None), text
    assert "KV budget 10 tokens" in text and "K/V bytes kept 0.241 of fp16" in text


def test_cli_eval_compare_dense_and_trace(dynaprune_cli, monkeypatch, tiny, text_file, tmp_path):
    monkeypatch.setattr(dynaprune, "load", lambda *a, **k: tiny)
    trace = tmp_path / "t.csv"
    code, text = dynaprune_cli("eval", "tiny", "lm", "--data", str(text_file), "--protocol", "continue",
                               "--context", "40", "--continuation", "8", "--max-examples", "2", "--recipe",
                               "kv=0.25", "--compare-dense", "--trace", str(trace))
    assert code in (0, None), text
    assert "lm (continue 40+8)" in text and "vs dense" in text and "K/V bytes kept" in text
    assert "KV budget 10" in text and trace.is_file()
    with open(trace) as f:
        assert next(csv.reader(f))[0] == "iteration_id"
    code, text = dynaprune_cli("eval", "tiny", "lm", "--trace", str(tmp_path / "t.txt"))
    assert code == 2 and ".csv" in text

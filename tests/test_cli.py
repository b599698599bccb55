"""Bad input through the CLI: one clear message, exit code 2, no traceback."""

from __future__ import annotations

import pytest


def test_unknown_alias(dynaprune_cli):
    code, text = dynaprune_cli("eval", "no-such-model", "sts")
    assert code == 2 and "unknown model 'no-such-model'" in text and "Traceback" not in text


def test_unknown_alias_for_fetch(dynaprune_cli):
    code, text = dynaprune_cli("fetch", "gpt-17")
    assert code == 2 and "unknown model alias 'gpt-17'" in text


def test_unknown_task(dynaprune_cli):
    code, text = dynaprune_cli("eval", "minilm-l6", "translate")
    assert code == 2 and "unknown task 'translate'" in text


@pytest.mark.parametrize("flag", ["--max-tokens", "--max-examples", "--window"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_numbers(dynaprune_cli, flag, value):
    code, text = dynaprune_cli("eval", "smollm2-135m", "lm", flag, value)
    assert code == 2 and flag in text and "positive" in text


def test_missing_data_file(dynaprune_cli, tmp_path):
    code, text = dynaprune_cli("eval", "minilm-l6", "sts", "--data", str(tmp_path / "nope.tsv"))
    assert code == 2 and "data file not found" in text


def write_bert_config(folder) -> None:
    from transformers import BertConfig

    BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37).to_json_file(folder / "config.json")


def test_folder_without_weights(dynaprune_cli, tmp_path):
    write_bert_config(tmp_path)
    code, text = dynaprune_cli("eval", str(tmp_path), "sts")
    assert code == 2 and "no weights" in text


def test_pickle_checkpoint_refused(dynaprune_cli, tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"not to be unpickled")
    code, text = dynaprune_cli("eval", str(bad), "sts")
    assert code == 2 and "pickle" in text and "safetensors" in text
    write_bert_config(tmp_path)
    code, text = dynaprune_cli("eval", str(tmp_path), "sts")
    assert code == 2 and "pickle" in text


def test_corrupt_safetensors(dynaprune_cli, tmp_path):
    write_bert_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    code, text = dynaprune_cli("eval", str(tmp_path), "sts")
    assert code == 2 and "corrupt or truncated" in text


def test_unsupported_model_type(dynaprune_cli, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    code, text = dynaprune_cli("eval", str(tmp_path), "sts")
    assert code == 2 and "'t5' is not supported" in text


def test_models_lists_aliases(dynaprune_cli):
    code, text = dynaprune_cli("models")
    assert code == 0 and "minilm-l6" in text and "smollm2-135m" in text


def test_every_documented_command_exists(dynaprune_cli):
    code, text = dynaprune_cli("--help")
    for command in ("models", "fetch", "eval", "generate", "run", "demo", "sweep", "report", "hw"):
        assert f" {command} " in text, command


def test_report_command_on_an_empty_results_file(dynaprune_cli, tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    code, text = dynaprune_cli("report", str(results), "-o", str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "report.html").exists()
    code, text = dynaprune_cli("report", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "results file not found" in text


# ------------------------------------------------------------- issue 12 items 15-18: refused before any work


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model fails the test: every case below must be refused before that."""
    import dynaprune

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the bad input was refused")

    monkeypatch.setattr(dynaprune, "load", refuse)
    monkeypatch.setattr("dynaprune.models.registry.fetch", refuse)


def one_error_line(code: int, text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text, text
    return lines[0]


def test_eval_json_folder_refused_before_the_evaluation(dynaprune_cli, no_model_work, tmp_path):
    line = one_error_line(*dynaprune_cli("eval", "minilm-l6", "sts", "--json", str(tmp_path)))
    assert f"--json {tmp_path} is a folder; give a file path" in line


def test_eval_json_under_a_file_refused(dynaprune_cli, no_model_work, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" / "r.json"
    line = one_error_line(*dynaprune_cli("eval", "minilm-l6", "sts", "--json", str(target)))
    assert "is a file, so no folder can be made inside it" in line


def test_sweep_out_folder_refused_before_running(dynaprune_cli, no_model_work, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("runs:\n  - model: minilm-l6\n    task: sts\n    recipes: [dense]\n")
    line = one_error_line(*dynaprune_cli("sweep", str(config), "-o", str(tmp_path)))
    assert f"--out {tmp_path} is a folder; give a file path, e.g. {tmp_path / 'results.jsonl'}" in line


@pytest.mark.parametrize("args", [["eval", "minilm-l6", "sts", "--data"],
                                  ["eval", "minilm-l6", "classify", "--train-data"]])
def test_data_folder_is_named_a_folder(dynaprune_cli, no_model_work, tmp_path, args):
    line = one_error_line(*dynaprune_cli(*args, str(tmp_path)))
    assert f"{tmp_path} is a folder, expected a file" in line and "not found" not in line


@pytest.mark.parametrize("args, needle", [
    (["eval", "minilm-l6", "sts", "--recipe", "kv=0.5"], "recipe key 'kv': a KV-cache budget evicts between the "
                                                          "forwards of a decoder; task sts runs an encoder"),
    (["eval", "minilm-l6", "classify", "--recipe", "kv_tokens=16,score=h2o"], "recipe key 'kv_tokens'"),
    (["eval", "smollm2-135m", "lm", "--recipe", "kv=0.25"], "lm --protocol window scores each window in one forward"),
    (["run", "smollm2-135m", "-t", "hello", "--recipe", "token=0.5,kv=0.5"], "dynaprune run runs a single prefill"),
    (["calibrate", "minilm-l6", "--target-sparsity", "0.5", "-o", "r.txt", "--recipe", "kv=0.5"], "calibrate"),
])
def test_keys_without_effect_refused(dynaprune_cli, no_model_work, args, needle):
    line = one_error_line(*dynaprune_cli(*args))
    assert needle in line and "no effect" in line


def test_kv_budget_where_it_acts_passes_the_checks(dynaprune_cli, monkeypatch):
    """The same key where it does act (lm continue, generate) gets as far as loading the model."""
    import dynaprune
    from dynaprune.errors import DynapruneError

    def loaded(*args, **kwargs):
        raise DynapruneError("reached the model")

    monkeypatch.setattr(dynaprune, "load", loaded)
    for args in (["lm", "--protocol", "continue"], ["lm", "--protocol", "stream"], ["generate"]):
        code, text = dynaprune_cli("eval", "smollm2-135m", *args, "--recipe", "kv=0.25")
        assert "reached the model" in text, (args, text)


def test_kv_as_a_count_is_refused_naming_kv_tokens(dynaprune_cli, no_model_work):
    line = one_error_line(*dynaprune_cli("eval", "smollm2-135m", "generate", "--recipe", "kv=256"))
    assert "kv is the share of the prompt kept" in line and "kv_tokens=256" in line


def test_quant_suggestion_is_itself_valid(dynaprune_cli, no_model_work):
    line = one_error_line(*dynaprune_cli("eval", "minilm-l6", "sts", "--recipe", "quant=20+4"))
    assert "quant=20+4@" not in line and "20 bits is outside 1..16" in line


def test_unknown_lm_protocol_refused_first(dynaprune_cli, no_model_work):
    line = one_error_line(*dynaprune_cli("eval", "smollm2-135m", "lm", "--protocol", "sliding"))
    assert "unknown lm protocol 'sliding'" in line


# ------------------------------------------------------------- issue 12 item 17: the budget in tokens in the result


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])


@pytest.mark.parametrize("recipe, budget", [("kv=0.25", 10), ("kv_tokens=7,score=h2o", 7), ("kv=1", 40)])
def test_result_records_the_budget_in_tokens(tmp_path, recipe, budget):
    """lm continue with 40 context tokens: kv=0.25 holds keep_count(0.25, 40) = 10 tokens, kv=1 all 40,
    kv_tokens=7 seven (counted by hand from the context length, not read from the recipe code)."""
    import torch

    from dynaprune.cli import run_task
    from dynaprune.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    model = Llama(cfg, tokenizer=_CharTokenizer(), name="tiny").eval()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    result = run_task("tiny", "lm", data=text, protocol="continue", context=40, continuation=8, max_examples=2,
                      recipe=recipe, model=model)
    assert result.extra["kv_budget_tokens"] == budget
    dense = run_task("tiny", "lm", data=text, protocol="continue", context=40, continuation=8, max_examples=2,
                     model=model)
    assert "kv_budget_tokens" not in dense.extra

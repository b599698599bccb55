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

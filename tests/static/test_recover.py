"""``dynaprune prune --finetune`` (recovery fine-tuning) and fine-tuning a pruned checkpoint again: the
written folder keeps its per-layer shapes and static record, reloads to the same logits, and the
recovery really trained (tensors differ from the same pruning without it); bad input is one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ft_fixtures import ft
from safetensors.torch import load_file
from test_structured import tiny_llama

import dynaprune
from dynaprune.errors import DynapruneError
from dynaprune.static.recover import check_recoverable


def logits(folder: Path, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return dynaprune.load(str(folder)).classify_logits(texts, None)


def test_prune_with_recovery_writes_a_trained_pruned_checkpoint(dynaprune_cli, classifier, tmp_path):
    clf, tsv = classifier
    common = ["prune", str(clf), "--heads", "0.25", "--ffn", "0.3", "--calib", str(tsv), "--max-calib", "32"]
    code, out = dynaprune_cli(*common, "-o", str(tmp_path / "plain"))
    assert code == 0, out
    code, out = dynaprune_cli(*common, "--finetune", str(tsv), "--max-train", "48", "-o", str(tmp_path / "rec"))
    assert code == 0, out
    cfg = json.loads((tmp_path / "rec" / "config.json").read_text())
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert cfg["dynaprune_layer_heads"] == plain["dynaprune_layer_heads"] and sum(cfg["dynaprune_layer_heads"]) == 6
    assert cfg["dynaprune_layer_intermediate"] == [26, 26]  # round(0.3 * 37) = 11 removed per layer
    rec = cfg["dynaprune_static"]["recovery"]
    assert rec["rows"] == 48 and rec["steps"] == 2  # 48 rows, batch 32
    assert cfg["dynaprune_static"]["removed_heads"] == plain["dynaprune_static"]["removed_heads"]
    # prune --finetune keeps the whole record: the same as without recovery, plus the recovery
    assert {k: v for k, v in cfg["dynaprune_static"].items() if k != "recovery"} == plain["dynaprune_static"]
    a, b = load_file(tmp_path / "rec" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # recovery trained the pruned weights
    texts = [t for t, _ in ft.toy_rows(8, 3)]
    assert not torch.allclose(logits(tmp_path / "rec", texts), logits(tmp_path / "plain", texts))


def test_finetune_of_a_pruned_checkpoint_keeps_its_shapes(dynaprune_cli, classifier, tmp_path):
    clf, tsv = classifier
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--ffn", "0.3", "--calib", str(tsv),
                              "-o", str(tmp_path / "p"))
    assert code == 0, out
    code, out = dynaprune_cli("finetune", str(tmp_path / "p"), "--data", str(tsv), "--max-train", "32",
                              "-o", str(tmp_path / "ft"))
    assert code == 0, out
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    pruned = json.loads((tmp_path / "p" / "config.json").read_text())
    for key in ("dynaprune_layer_heads", "dynaprune_layer_intermediate", "dynaprune_static"):
        assert cfg[key] == pruned[key]
    assert cfg["dynaprune"]["training"]["rows"] == 32  # the fine-tune's own record beside it
    model = dynaprune.load(str(tmp_path / "ft"))
    assert model.config.layer_heads == pruned["dynaprune_layer_heads"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-train", "0"], "--max-train must be a positive integer"),
    (["--finetune-lr", "0"], "--finetune-lr must be a positive number"),
])
def test_bad_recovery_options(dynaprune_cli, classifier, tmp_path, extra, message):
    clf, tsv = classifier
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tsv), "--finetune", str(tsv),
                              "-o", str(tmp_path / "o"), *extra)
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_recovery_refuses_what_it_cannot_train(dynaprune_cli, classifier, tiny_bert_folder, tmp_path):
    clf, tsv = classifier
    code, out = dynaprune_cli("prune", str(tiny_bert_folder), "--heads", "0.25", "--calib", str(tsv),
                              "--finetune", str(tsv), "-o", str(tmp_path / "o"))
    assert code == 2 and "needs a fine-tuned classifier" in out
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tsv),
                              "--finetune", str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "o"))
    assert code == 2 and "missing.tsv" in out
    other = ft.write_tsv(tmp_path / "other.tsv", ft.toy_rows(8, 0, labels=("pos", "neg")))
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tsv),
                              "--finetune", str(other), "-o", str(tmp_path / "o"))
    assert code == 2 and "do not occur in the training data" in out
    assert not (tmp_path / "o").exists()
    with pytest.raises(DynapruneError, match="tokenizer"):  # a Llama trains on text: it needs its tokenizer
        check_recoverable(tiny_llama())

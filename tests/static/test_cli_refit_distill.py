"""``dynaprune prune --ffn-refit`` and ``--finetune ... --distill W``: the refit is recorded and beats plain
removal on the calibration rows (closer to the dense parent's logits); distillation is recorded and
changes the recovered weights; bad values are one error, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dynaprune


def logits(folder, texts):
    with torch.no_grad():
        return dynaprune.load(str(folder)).classify_logits(texts, None)


def test_ffn_refit_from_the_cli(dynaprune_cli, classifier, tmp_path):
    clf, tsv = classifier
    common = ["prune", str(clf), "--ffn", "0.4", "--criterion", "magnitude", "--calib", str(tsv),
              "--max-calib", "64"]
    assert dynaprune_cli(*common, "-o", str(tmp_path / "plain"))[0] == 0
    code, out = dynaprune_cli(*common, "--ffn-refit", "output", "-o", str(tmp_path / "refit"))
    assert code == 0, out
    rec = json.loads((tmp_path / "refit" / "config.json").read_text())["dynaprune_static"]
    assert rec["config"]["ffn_refit"] == "output" and set(rec["ffn_refit"]) == {"0", "1"}
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())["dynaprune_static"]
    assert rec["removed_ffn_neurons"] == plain["removed_ffn_neurons"]  # same neurons, other down-projection
    # oracle: the dense parent's logits on the calibration rows; the refit is closer than plain removal
    texts = [line.split("\t")[0] for line in tsv.read_text().splitlines()[:64]]
    dense = logits(clf, texts)
    err = {k: float((logits(tmp_path / k, texts) - dense).pow(2).sum()) for k in ("plain", "refit")}
    assert err["refit"] < err["plain"]


def test_distill_from_the_cli(dynaprune_cli, classifier, tmp_path):
    clf, tsv = classifier
    common = ["prune", str(clf), "--ffn", "0.3", "--calib", str(tsv), "--max-calib", "32", "--finetune", str(tsv),
              "--max-train", "48", "--finetune-lr", "1e-3"]
    assert dynaprune_cli(*common, "-o", str(tmp_path / "ce"))[0] == 0
    code, out = dynaprune_cli(*common, "--distill", "1.0", "--temperature", "1.5", "--finetune-warmup", "0.2",
                              "-o", str(tmp_path / "kd"))
    assert code == 0, out
    rec = json.loads((tmp_path / "kd" / "config.json").read_text())["dynaprune_static"]["recovery"]
    assert (rec["distill"], rec["temperature"], rec["warmup"]) == (1.0, 1.5, 0.2)
    a, b = load_file(tmp_path / "kd" / "model.safetensors"), load_file(tmp_path / "ce" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # a different loss trained different weights


@pytest.mark.parametrize(("extra", "message"), [
    (["--ffn", "0.3", "--ffn-refit", "nope"], "unknown --ffn-refit"),
    (["--heads", "0.25", "--ffn-refit", "output"], "--ffn-refit needs --ffn"),
    (["--ffn", "0.3", "--distill", "0.5"], "--distill needs --finetune"),
    (["--ffn", "0.3", "--distill", "1.5", "--finetune", "TSV"], "--distill must lie in [0, 1]"),
    (["--ffn", "0.3", "--finetune-warmup", "1.0", "--finetune", "TSV"], "warm-up share must lie"),
])
def test_bad_refit_and_distill_options(dynaprune_cli, classifier, tmp_path, extra, message):
    clf, tsv = classifier
    extra = [str(tsv) if e == "TSV" else e for e in extra]
    code, out = dynaprune_cli("prune", str(clf), "--calib", str(tsv), "-o", str(tmp_path / "o"), *extra)
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()



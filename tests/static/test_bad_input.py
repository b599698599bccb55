"""Issue 18's bad input, end to end through ``dynaprune prune`` / ``eval`` (loaded model, in process):
each is one ``error:`` message naming the option or file, exit 2, no traceback, no output folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_structured import tiny_bert

from dynaprune.errors import DynapruneError
from dynaprune.static import plan


def one_error(code: int, out: str, message: str) -> None:
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert sum(line.startswith("error:") for line in out.splitlines()) == 1, out


@pytest.mark.parametrize(("extra", "message"), [
    (["--nm", "2:4"], "M=4 does not divide the input width 37"),  # the tiny BERT's FFN width is 37
    (["--layers", "2"], "removing every layer is not allowed"),  # it has 2 layers
    (["--sparsity", "1.0"], "--sparsity must lie in [0, 1)"),
    (["--heads", "-0.5"], "--heads must lie in [0, 1)"),
])
def test_bad_pruning_options(dynaprune_cli, classifier, tmp_path, extra, message):  # noqa: F811
    clf, tsv = classifier
    code, out = dynaprune_cli("prune", str(clf), "--calib", str(tsv), "-o", str(tmp_path / "o"), *extra)
    one_error(code, out, message)
    assert not (tmp_path / "o").exists()


def test_missing_or_empty_calibration(dynaprune_cli, classifier, tmp_path):  # noqa: F811
    clf, _ = classifier
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tmp_path / "nope.tsv"),
                              "-o", str(tmp_path / "o"))
    one_error(code, out, "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tmp_path / "empty.tsv"),
                              "-o", str(tmp_path / "o"))
    one_error(code, out, "empty.tsv")
    assert "empty" in out
    assert not (tmp_path / "o").exists()


def test_existing_output_and_overwrite(dynaprune_cli, classifier, tmp_path):  # noqa: F811
    clf, tsv = classifier
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tsv), "-o", str(tmp_path / "o"))
    one_error(code, out, "already exists")
    assert (tmp_path / "o" / "keep.txt").exists()
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--calib", str(tsv), "-o", str(tmp_path / "o"),
                              "--overwrite")
    assert code == 0, out
    assert (tmp_path / "o" / "config.json").exists() and not (tmp_path / "o" / "keep.txt").exists()


def test_recorded_shapes_disagreeing_with_the_tensors(dynaprune_cli, classifier, tmp_path):  # noqa: F811
    clf, tsv = classifier
    code, out = dynaprune_cli("prune", str(clf), "--heads", "0.25", "--ffn", "0.3", "--calib", str(tsv),
                              "-o", str(tmp_path / "p"))
    assert code == 0, out
    for key, change in (("dynaprune_layer_intermediate", 2), ("dynaprune_layer_heads", -1)):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(tmp_path / "p", bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key][0] += change
        (bad / "config.json").write_text(json.dumps(cfg))
        code, out = dynaprune_cli("eval", str(bad), "classify", "--data", str(tsv))
        one_error(code, out, "do not match config.json")
        code, out = dynaprune_cli("prune", str(bad), "--heads", "0.25", "--calib", str(tsv), "-o", str(tmp_path / "q"))
        one_error(code, out, "do not match config.json")
    assert not (tmp_path / "q").exists()


def test_every_head_of_a_layer_is_never_removed():
    m = tiny_bert()  # 3 layers of 4 heads
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0]),
              torch.tensor([0.0, 0.0, 0.0, 1.0])]
    removed = plan.heads_to_remove(m, scores, 0.9)  # round(0.9 * 12) = 11 wanted; at most 3 per layer
    assert {k: len(v) for k, v in removed.items()} == {0: 3, 1: 3, 2: 3}
    with pytest.raises(DynapruneError, match="removing every head of layer 1 is not allowed"):
        plan.apply_heads(m, {1: [0, 1, 2, 3]})

"""Issue 18, "results say both": evaluating a statically pruned checkpoint records its pruning (the
checkpoint's ``dynaprune_static``) beside the run-time recipe, with FLOPs against the dense parent
checked against an evaluation of the parent itself on the same data (an independent run)."""

from __future__ import annotations

import json

import pytest
from ft_fixtures import ft


def eval_json(dynaprune_cli, model, tsv, out, *recipe: str) -> dict:
    code, text = dynaprune_cli("eval", str(model), "classify", "--data", str(tsv), "--json", str(out), *recipe)
    assert code == 0, text
    return json.loads(out.read_text())


@pytest.mark.parametrize(("prune_args", "recipe"), [
    (["--heads", "0.25", "--ffn", "0.3"], ["--recipe", "token=0.5"]),
    (["--layers", "1", "--ffn", "0.3"], []),
])
def test_eval_of_a_pruned_checkpoint_records_the_static_pruning(dynaprune_cli, classifier, tmp_path,  # noqa: F811
                                                                 prune_args, recipe):
    clf, tsv = classifier
    dev = ft.write_tsv(tmp_path / "dev.tsv", ft.toy_rows(24, 5))
    code, out = dynaprune_cli("prune", str(clf), *prune_args, "--calib", str(tsv), "-o", str(tmp_path / "p"))
    assert code == 0, out
    written = json.loads((tmp_path / "p" / "config.json").read_text())["dynaprune_static"]
    parent = eval_json(dynaprune_cli, clf, dev, tmp_path / "parent.json")
    assert "static_pruning" not in parent["extra"]  # a plain checkpoint records none
    run = eval_json(dynaprune_cli, tmp_path / "p", dev, tmp_path / "pruned.json", *recipe)
    static = run["extra"]["static_pruning"]
    assert run["recipe"] == (recipe[1] if recipe else "dense")
    for key in ("config", "parent", "parent_layers", "kept_layers", "removed_ffn_neurons", "params",
                "params_parent", "static_flops_kept_at", "calibration"):
        assert static[key] == written[key], key
    assert static.get("removed_heads") == written.get("removed_heads")
    assert static.get("removed_layers") == written.get("removed_layers")
    assert static["config"]["criterion"] == "taylor" and static["flops_vs"] == written["parent"]
    parent_dense = parent["cost"]["dense"]["flops"]["total"]
    assert parent["cost"]["actual"]["flops"]["total"] == parent_dense  # the parent ran dense
    assert static["static_flops_kept"] == pytest.approx(run["cost"]["dense"]["flops"]["total"] / parent_dense,
                                                        rel=1e-12)
    assert static["flops_kept_vs_parent"] == pytest.approx(run["cost"]["actual"]["flops"]["total"] / parent_dense,
                                                           rel=1e-12)
    assert 0.3 < static["static_flops_kept"] < 0.95
    if recipe:  # token=0.5 on top: fewer FLOPs than the pruned model's dense run
        assert static["flops_kept_vs_parent"] < static["static_flops_kept"]
    else:
        assert static["flops_kept_vs_parent"] == static["static_flops_kept"]

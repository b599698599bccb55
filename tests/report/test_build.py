"""The report: figures embedded, a table per task, empty results said plainly, foreign schemas refused."""

from __future__ import annotations

import json

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import SCHEMA
from dynaprune.report.build import build_report, method_of


def row(recipe, value, kept):
    return {"schema": SCHEMA, "run_id": recipe, "model": "minilm-l6", "task": "sts", "n": 10, "recipe": recipe,
            "metric": {"name": "spearman", "value": value}, "cost": {"flops_kept": kept}, "versions": {"torch": "x"}}


def test_report_has_figure_and_table(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in
                               [row("dense", 0.867, 1.0), row("token=0.5", 0.86, 0.6), row("token=0.3", 0.84, 0.45)]))
    html = build_report([results], tmp_path / "out").read_text()
    assert html.count("data:image/png;base64,") == 1
    assert "token=0.5" in html and "+0.0070" in html  # drop vs dense
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| spatten token | token=0.3 | 0.8400 | +0.0270 | 0.450 | 10 |" in md
    assert (tmp_path / "out" / "figures" / "minilm-l6-sts.png").stat().st_size > 1000


def test_empty_results_say_so(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    html = build_report([results], tmp_path / "out").read_text()
    assert "No results" in html


def test_foreign_schema_refused(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"schema": "other/2"}) + "\n")
    with pytest.raises(DynapruneError, match="schema"):
        build_report([results], tmp_path / "out")


def test_method_labels():
    assert method_of(None) == "dense"
    assert method_of("kv=0.25,score=h2o") == "h2o"
    assert method_of("token=0.5,block=0.2") == "hdp+spatten token"
    assert method_of("token=0.5,head=0.8") == "spatten token+head"
    assert method_of("kv=0.25") == "spatten kv"

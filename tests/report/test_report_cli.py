"""`dynaprune report` and `dynaprune demo` on bad input: one clear message, exit 2, nothing run."""

from __future__ import annotations

import json

import pytest


def test_foreign_schema_refused_before_any_picture(monkeypatch, dynaprune_cli, tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"schema": "dynaprune.result/9", "task": "sts"}) + "\n")
    monkeypatch.setattr("dynaprune.report.pictures.draw_pictures", lambda *a, **k: pytest.fail("drew pictures"))
    code, text = dynaprune_cli("report", str(results), "-o", str(tmp_path / "out"), "--pictures")
    assert code == 2 and "schema 'dynaprune.result/9'" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_empty_results_make_an_empty_report(dynaprune_cli, tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    code, text = dynaprune_cli("report", str(results), "-o", str(tmp_path / "out"))
    assert code == 0 and "report.html" in text
    assert "No results" in (tmp_path / "out" / "report.html").read_text()


def test_demo_with_a_missing_sweep_runs_nothing(monkeypatch, dynaprune_cli, tmp_path):
    plan = tmp_path / "full.yaml"
    plan.write_text("configs: [configs/demo.yaml, configs/no-such-sweep.yaml]\n")
    monkeypatch.setattr("dynaprune.models.registry.fetch", lambda *a, **k: pytest.fail("fetched"))
    code, text = dynaprune_cli("demo", "--config", str(plan), "--out", str(tmp_path / "out"))
    assert code == 2 and "listed sweep config not found: configs/no-such-sweep.yaml" in text

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


# ------------------------------------------------------------- issue 12 item 14: what is not a results file

ROW = json.dumps({"schema": "dynaprune.result/1", "run_id": "a", "model": "m", "task": "sts", "data": "d.tsv",
                  "n": 3, "recipe": "dense", "metric": {"name": "spearman", "value": 0.8}})


def _one_error(code: int, text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("name, text, needle", [
    ("list.jsonl", "[1, 2]\n", "list.jsonl:1: not a dynaprune results line (a JSON list, expected an object)"),
    ("mid.jsonl", f"{ROW}\n{{broken\n{ROW}\n", "mid.jsonl:2: not a dynaprune results line (not JSON"),
    ("noschema.jsonl", '{"task": "sts"}\n', "noschema.jsonl:1: not a dynaprune results line (no 'schema'"),
    ("trace.csv", "iteration_id,layer_id,head_id\n0,0,0\n", "trace.csv: not a results file"),
    ("notes.txt", "hello world\n", "notes.txt: not a results file"),
    ("trace.jsonl", "iteration_id,layer_id,head_id\n0,0,0\n", "trace.jsonl:1: not a dynaprune results line"),
])
def test_foreign_files_refused_naming_the_line(dynaprune_cli, tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    line = _one_error(*dynaprune_cli("report", str(path), "-o", str(tmp_path / "out")))
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_a_folder_is_refused(dynaprune_cli, tmp_path):
    (tmp_path / "results").mkdir()
    line = _one_error(*dynaprune_cli("report", str(tmp_path / "results"), "-o", str(tmp_path / "out")))
    assert "results is a folder, expected a results file" in line


def test_output_that_is_a_file_is_refused(dynaprune_cli, tmp_path):
    results, out = tmp_path / "r.jsonl", tmp_path / "out"
    results.write_text(ROW + "\n")
    out.write_text("a file")
    line = _one_error(*dynaprune_cli("report", str(results), "-o", str(out)))
    assert "--out" in line and "is a file" in line


def test_interrupted_last_line_is_dropped_with_a_warning(dynaprune_cli, tmp_path):
    """A sweep killed mid-write leaves a last line without a newline: the report warns with its line number
    and reports the finished lines."""
    results = tmp_path / "r.jsonl"
    results.write_text(f"{ROW}\n" + '{"schema": "dynaprune.res')
    code, text = dynaprune_cli("report", str(results), "-o", str(tmp_path / "out"))
    assert code == 0 and "warning:" in text and "r.jsonl:2: skipped an incomplete last line" in text.replace("\n", "")
    assert "1 result(s) from 1 file(s)" in (tmp_path / "out" / "report.md").read_text()

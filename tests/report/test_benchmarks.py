"""The report's section of committed benchmark results (report/benchmarks.py): what it reads from each
file, exactly, and that a file of another shape gives no point."""

from __future__ import annotations

import json

import pytest

from dynaprune.report import benchmarks, kv_panel
from dynaprune.report.build import build_report


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    _write(d / "gemma3-kv.json", {"split": "test", "command": "python -m benchmarks.gemma3_kv", "rows": {
        "dense": {"perplexity": 10.0, "kv_bytes_vs_fp16": 1.0},
        "kv_bits=4": {"perplexity": 10.5, "kv_bytes_vs_fp16": 0.3}}})
    _write(d / "gemma3-peers.json", {"command": "peers", "rows": {
        "quanto4": {"perplexity": 12.0, "kv_bytes_vs_fp16": 0.28,
                    "spec": {"peer": "quantized-cache", "press": None, "keep": 1.0, "bits": 4, "split": "test"}},
        "valid-only": {"perplexity": 9.0, "kv_bytes_vs_fp16": 0.5,
                       "spec": {"peer": "kvpress", "press": "SnapKV", "keep": 0.5, "split": "valid"}}}})
    _write(d / "prefill-search.json", {"grid": [{"recipe": "prefill_keep=0.5", "flops_kept": 0.5,
                                                 "perplexity_cost": 0.07}, {"recipe": "broken"}]})
    _write(d / "prefill.json", {"load": "up 1 day, load average: 0.50, 0.40, 0.30", "rows": [
        {"name": "prefill=0.6", "speedup": 1.4, "valid_perplexity_cost": 0.05}]})
    _write(d / "gemma3-prefill.json", {"rows": {"prefill=0.8": {"flops_kept": 0.83, "valid_cost": 0.028},
                                                "dense": {"valid": 10.9}}})
    _write(d / "static.json", {"minilm": {"32x128": {"variants": {
        "dense": {"speedup": 1.0, "flop_ratio": 1.0}, "combined": {"speedup": 2.0, "flop_ratio": 2.5}}}}})
    return d


def test_gemma_peers_keyed_by_name_are_read_as_peer_points(results):
    files = benchmarks.kv_files(results)
    assert list(files) == ["Gemma 3 270M"]  # SmolLM2's files are absent here
    points, dense, empty = kv_panel.read_points(files["Gemma 3 270M"])
    got = {(p.series, p.label, p.kv_bytes, p.perplexity) for p in points}
    assert got == {("quantization only", "kv_bits=4", 0.3, 10.5),
                   ("quantized-cache: no press", "no press 1, 4 bits", 0.28, 12.0)}  # the VALID peer row is not drawn
    assert dense == 10.0 and empty == []


def test_prefill_points_and_static_rows(results):
    points = benchmarks.prefill_points(results)
    assert points == {
        "SmolLM2-135M, VALID (FLOPs kept)": [(0.5, pytest.approx(7.0), "prefill_keep=0.5")],
        "Gemma 3 270M, VALID (FLOPs kept)": [(0.83, pytest.approx(2.8), "prefill=0.8")],
        "SmolLM2-135M, time to first token (speed-up)": [(1.4, pytest.approx(5.0), "prefill=0.6")],
    }
    header, body = benchmarks.static_rows(results)
    assert body == [["minilm", "32x128", "combined", "2.00", "2.50", "0.80"]]
    assert "(load: 0.50, 0.40, 0.30)" in benchmarks.provenance(results / "prefill.json")


def test_report_draws_the_section_and_an_empty_folder_adds_nothing(results, tmp_path):
    build_report([], tmp_path / "rep", command="t", benchmarks_dir=results)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Benchmark results (committed, not re-run by this report)" in md
    figures = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    assert figures == {"bench-kv-gemma-3-270m.png", "bench-prefill.png"}
    assert "| minilm | 32x128 | combined | 2.00 | 2.50 | 0.80 |" in md
    (tmp_path / "none").mkdir()
    build_report([], tmp_path / "rep2", command="t", benchmarks_dir=tmp_path / "none")
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "## Benchmark results" in md and "bench-" not in md


def test_cli_benchmarks_folder_missing_is_one_error_line(dynaprune_cli, tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    code, text = dynaprune_cli("report", str(results), "-o", str(tmp_path / "out"), "--benchmarks",
                               str(tmp_path / "nowhere"))
    lines = [x for x in text.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "--benchmarks" in lines[0], text

"""The report: figures embedded (checked independently: every <img> a decodable PNG), a table per
comparable group, provenance, empty results said plainly, foreign schemas refused."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import SCHEMA
from dynaprune.report.build import build_report, load_rows, method_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(recipe, value, kept, task="sts", n=10, pruning=None, **extra):
    cost = {"flops_kept": kept, "attention_flops_kept": kept / 2, "kv_bytes_kept": kept,
            "shape": {"heads": 4, "kv_heads": 4}}
    if pruning:
        cost["pruning"] = pruning
    return {"schema": SCHEMA, "run_id": f"{task}-{recipe}-{n}", "model": "minilm-l6", "task": task, "n": n,
            "recipe": recipe, "data": "/data/stsb/dev.tsv", "metric": {"name": "spearman", "value": value},
            "cost": cost, "versions": {"torch": "x"}, **extra}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def embedded_pngs(html: str) -> list[tuple[int, int]]:
    """(width, height) of every <img>; fails unless each is an embedded, decodable PNG."""
    parser = Images()
    parser.feed(html)
    sizes = []
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        sizes.append(struct.unpack(">II", data[16:24]))
        assert data.endswith(b"IEND\xaeB`\x82")
    return sizes


def test_report_has_figures_tables_and_provenance(tmp_path):
    per_layer = {"tokens_per_layer": [100, 70, 50], "heads_per_layer_last_call": [4, 4, 3]}
    results = write(tmp_path / "r.jsonl", [
        row("dense", 0.867, 1.0, command="dynaprune sweep configs/x.yaml", finished="2026-11-23 10:00:00 UTC"),
        row("token=0.5", 0.86, 0.6, pruning=per_layer, finished="2026-11-23 10:05:00 UTC"),
        row("token=0.3", 0.84, 0.45, pruning={**per_layer, "key_bits_fetched_vs_fp16": 0.5}),
    ])
    html = build_report([results], tmp_path / "out", command="dynaprune report r.jsonl").read_text()
    sizes = embedded_pngs(html)
    assert len(sizes) == 2 and all(w > 300 and h > 200 for w, h in sizes)  # trade-off curves + per layer
    assert "token=0.5" in html and "+0.0070" in html  # drop vs dense
    md = (tmp_path / "out" / "report.md").read_text()
    # bits fetched: 0.45 K/V bytes x head share (100*4+70*4+50*3)/(220*4) x (0.5 + 1) / 2
    bits = 0.45 * (830 / 880) * 0.75
    assert ("| spatten token | token=0.3 | 0.8400 | +0.0270 | 0.450 | 0.225 | 0.450 | "
            f"{bits:.3f} | 10 | sts-token=0.3-10 |") in md
    assert "## minilm-l6 · sts · dev.tsv (n=10)" in md
    for text in ("dynaprune report r.jsonl", "dynaprune sweep configs/x.yaml", "not recorded",
                 "2026-11-23 10:00:00 UTC .. 2026-11-23 10:05:00 UTC", '{"torch": "x"}', "sha256"):
        assert text in md and text.replace('"', "&quot;") in html
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert figures == ["minilm-l6-sts-dev-10-layers.png", "minilm-l6-sts-dev-10-tradeoff.png"]
    assert all(f"](figures/{name})" in md for name in figures)


def test_groups_keep_incomparable_runs_apart(tmp_path):
    """Another n, another protocol: another figure and table; the same run twice counts once."""
    lm = {"task": "lm", "metric": {"name": "perplexity", "value": 20.0}}
    results = write(tmp_path / "r.jsonl", [
        row("dense", 0.867, 1.0), row("token=0.5", 0.86, 0.6), row("dense", 0.85, 1.0, n=500),
        {**row("dense", 0, 1.0, task="lm"), **lm, "extra": {"protocol": "window"}},
        {**row("dense", 0, 1.0, task="lm", n=11), **lm, "extra": {"protocol": "continue"}},
        {**row("kv=0.25", 0, 0.5, task="lm", n=11), **lm, "metric": {"name": "perplexity", "value": 22.0},
         "extra": {"protocol": "continue"}},
    ])
    copy = write(tmp_path / "copy.jsonl", [row("dense", 0.867, 1.0)])
    out = tmp_path / "out"
    html = build_report([results, copy], out).read_text()
    md = (out / "report.md").read_text()
    assert len(embedded_pngs(html)) == 4  # one trade-off figure per group; nothing prunes per layer
    assert "lm (window)" in md and "lm (continue)" in md and "(n=500)" in md
    assert "| spatten kv | kv=0.25 | 22.0000 | +2.0000 |" in md  # perplexity: higher is a drop
    assert md.count("| dense | dense | 0.8670 |") == 1


def test_empty_results_say_so(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    html = build_report([results], tmp_path / "out").read_text()
    assert "No results" in html and "<img" not in html
    assert "No results" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("name, text, message", [
    ("r.jsonl", json.dumps({"schema": "other/2"}) + "\n", "schema 'other/2'"),
    ("r.json", json.dumps({"schema": "dynaprune.result/9", "task": "sts"}), "schema 'dynaprune.result/9'"),
    ("r.json", json.dumps({"model": "x"}), "not a dynaprune result"),
    ("r.json", "[1, 2]", "not a dynaprune result"),
    ("r.json", "{", "not valid JSON"),
])
def test_foreign_input_refused(tmp_path, name, text, message):
    results = tmp_path / name
    results.write_text(text)
    with pytest.raises(DynapruneError, match=message):
        build_report([results], tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_method_labels():
    assert method_of(None) == "dense"
    assert method_of("kv=0.25,score=h2o") == "h2o"
    assert method_of("token=0.5,block=0.2") == "hdp blocks (max)+spatten token"
    assert method_of("block=0.2,block_score=max,hdp_head=10,approx=on,fixed=8.8") == "hdp blocks+heads+approx (max)"
    assert method_of("fixed=8.8") == "hdp fixed-point"
    assert method_of("token=0.5,head=0.8") == "spatten token+head"
    assert method_of("kv=0.25") == "spatten kv"


def test_probes_of_another_size_are_another_group(tmp_path):
    rows = [{**row("dense", 0.79, 1.0, task="classify"), "extra": {"n_train": 5000}, "run_id": "a"},
            {**row("dense", 0.78, 1.0, task="classify"), "extra": {"n_train": 2000}, "run_id": "b"}]
    build_report([write(tmp_path / "r.jsonl", rows)], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "classify (probe on 5000)" in md and "classify (probe on 2000)" in md


COMMITTED = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob("*.jsonl"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_results_still_parse(path):
    """Issue 12 item 17: kv became a share in (0, 1] only (counts are kv_tokens). Every committed results
    file still loads, and every recipe in it parses under today's rules: no committed run used an
    integer kv, so no old file needs its recipes mapped."""
    from dynaprune.prune.recipe import Recipe

    rows = load_rows([path])
    assert rows
    for row in rows:
        recipe = Recipe.parse(row.get("recipe") or "")
        assert recipe.kv is None or 0 < recipe.kv <= 1


def test_kv_share_and_count_are_one_series():
    assert method_of("kv=0.25") == method_of("kv_tokens=256") == "spatten kv"
    assert method_of("token=0.5,kv_tokens=64") == "spatten token+kv"

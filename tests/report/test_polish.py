"""Report polish: short recipe numbers, duplicate rows merged, a caption per figure, and hover spots that
sit on the drawn points (checked on the PNG's own pixels)."""

from __future__ import annotations

import io
import json
import re

from dynaprune.eval.sweep import SCHEMA
from dynaprune.report.build import build_report, table
from dynaprune.report.labels import merge_duplicates, short_recipe
from dynaprune.report.results import group_rows, load_rows
from dynaprune.report.tradeoff import tradeoff_figure


def row(recipe, value, kept, run_id=None):
    return {"schema": SCHEMA, "run_id": run_id or f"run-{value}", "model": "minilm-l6", "task": "sts", "n": 10,
            "recipe": recipe, "data": "/d/dev.tsv", "metric": {"name": "spearman", "value": value},
            "cost": {"flops_kept": kept, "attention_flops_kept": kept, "kv_bytes_kept": kept}, "versions": {}}


def test_short_recipe():
    assert short_recipe("block=-0.10438942909240723,head=0.3") == "block=-0.1044,head=0.3"
    assert short_recipe("token_schedule=0.123456789:0.5,quant=4:2") == "token_schedule=0.1235:0.5,quant=4:2"
    assert short_recipe("hdp_head=1.5e-05,kv_tokens=128") == "hdp_head=1.5e-05,kv_tokens=128"
    assert short_recipe("fixed=12.3456") == "fixed=12.3456"  # 4 decimals are already short
    assert short_recipe(None) == "dense" and short_recipe("") == "dense"


def test_merge_duplicates_keeps_first_order_and_all_refs():
    body = [["a", "1", "r1"], ["b", "2", "r2"], ["a", "1", "r3"], ["a", "1", "r1"]]
    assert merge_duplicates(body, 2) == [["a", "1", "r1, r3"], ["b", "2", "r2"]]


def test_table_merges_same_run_from_two_configs(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [row("dense", 0.87, 1.0), row("block=-0.10438942909240723", 0.8, 0.5, "run-a"),
            row("block=-0.10438942909240723", 0.8, 0.5, "run-b")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    header, body = table(group_rows(load_rows([path]))[0])
    assert len(body) == 2
    assert body[1][1] == "block=-0.1044" and body[1][-1] == "run-a, run-b"


def test_every_figure_has_a_caption_and_hover_recipes(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [row("dense", 0.87, 1.0), row("token=0.5123456789", 0.85, 0.6), row("token=0.3", 0.8, 0.45)]
    for r in rows[1:]:
        r["cost"]["pruning"] = {"tokens_per_layer": [100, 60, 40], "heads_per_layer_last_call": [4, 4, 3]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = build_report([path], tmp_path / "out").read_text()
    figures = re.findall(r"<figure>.*?</figure>", html, flags=re.S)
    assert len(figures) == 2 and all("<figcaption>" in f for f in figures)
    assert "title='spatten token: token=0.5123'" in html and "title='dense'" in html
    assert "0.5123456789" not in html.split("<h2>Provenance")[0]


def test_hover_spots_sit_on_the_points():
    """The dense star is the only black mark inside the panels: the pixel under each 'dense' spot is dark,
    and a spot moved by 5% of the width is not on a point."""
    from PIL import Image

    rows = [row("dense", 0.87, 1.0), row("token=0.5", 0.85, 0.6), row("token=0.3", 0.8, 0.45)]
    for r in rows:
        r["_source"] = "x"
    png, spots = tradeoff_figure(group_rows(rows)[0])
    image = Image.open(io.BytesIO(png)).convert("L")
    w, h = image.size

    def dark(x_pct, y_pct):
        return image.getpixel((min(w - 1, int(x_pct / 100 * w)), min(h - 1, int(y_pct / 100 * h)))) < 60

    dense = [(x, y) for x, y, t in spots if t == "dense"]
    assert len(dense) == 4 and len(spots) == 12  # 3 points in each of 4 panels
    assert all(dark(x, y) for x, y in dense)
    assert not any(dark(x - 5, y + 10) for x, y in dense)

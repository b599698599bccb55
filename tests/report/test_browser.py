"""The report in a real browser: headless Chromium loads the page and every figure decodes."""

from __future__ import annotations

import json

import pytest

from dynaprune.eval.sweep import SCHEMA
from dynaprune.report.browser import figures_loaded, find_chromium, screenshot
from dynaprune.report.build import build_report

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium not installed (Debian: apt-get install -y chromium)")


def result(recipe: str, value: float, kept: float) -> dict:
    pruning = {"tokens_per_layer": [100, int(100 * kept), int(90 * kept)], "heads_per_layer_last_call": [4, 4, 3]}
    return {"schema": SCHEMA, "run_id": recipe, "model": "minilm-l6", "task": "sts", "n": 10, "recipe": recipe,
            "metric": {"name": "spearman", "value": value}, "versions": {"torch": "x"},
            "cost": {"flops_kept": kept, "kv_bytes_kept": kept, "pruning": {} if recipe == "dense" else pruning}}


def test_every_figure_loads_in_chromium(tmp_path):
    results = tmp_path / "r.jsonl"
    rows = [result("dense", 0.87, 1.0), result("token=0.5", 0.85, 0.6), result("token=0.3", 0.8, 0.45)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = build_report([results], tmp_path / "out")
    assert figures_loaded(html) == (2, 2)  # trade-off curves and tokens/heads per layer

    png = screenshot(html, tmp_path / "shot.png", width=800, height=600)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_broken_figure_is_caught(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><body><img src='data:image/png;base64,AAAA'>"
                    "<img src='missing.png'></body></html>")
    assert figures_loaded(page) == (0, 2)


def test_page_with_long_recipes_fits_1400px(tmp_path):
    """Long optimizer-made recipes and run ids: the page must not scroll sideways in a 1400-px window."""
    from dynaprune.report.browser import page_widths

    results = tmp_path / "r.jsonl"
    long_recipe = ("block=-0.10438942909240723,block_sparsity=0.6123456789,hdp_head=0.31234567,"
                   "token=0.4412345678,token_schedule=0.1:0.2:0.3:0.4:0.5:0.6,head=0.25,value=0.3,quant=4:2")
    rows = [result("dense", 0.87, 1.0), result(long_recipe, 0.85, 0.6)]
    rows[1]["run_id"] = "x" * 90  # a long unbroken run id
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = build_report([results], tmp_path / "out")
    scroll, client = page_widths(html, width=1400)
    assert 1300 <= client <= 1400 and scroll <= client, (scroll, client)
    # the same page without the wrapping rules does overflow: the check can fail
    text = html.read_text().replace("overflow-wrap:anywhere", "white-space:nowrap").replace("width:100%", "")
    wide = tmp_path / "wide.html"
    wide.write_text(text)
    scroll, client = page_widths(wide, width=1400)
    assert scroll > client

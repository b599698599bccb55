"""The KV trade-off panel (report/kv_panel.py): built by `dynaprune report` from small fake benchmark JSON
files, our curves' membership and lower envelope against brute force, the peers as points."""

from __future__ import annotations

import json
import random

from dynaprune.report.kv_panel import KVPoint, is_kv_source, lower_envelope, read_points, series_of
from dynaprune.report.results import load_rows

OURS = {
    "runs": {
        "test": {
            "dense": {"perplexity": 10.0},
            "kv_bits=4,kv_group=64": {"perplexity": 10.1, "kv_bytes_vs_fp16": 0.28125},
            "kv_bits=2,kv_group=32": {"perplexity": 12.5, "kv_bytes_vs_fp16": 0.1875},
        },
        "valid": {"kv_bits=3,kv_group=32": {"perplexity": 9.0, "kv_bytes_vs_fp16": 0.25}},
    },
    "commands": [{"command": "python -m benchmarks.kv_quant --split test"}],
}
EVICT = {
    "split": "test",
    "command": "python -m benchmarks.kv_bytes test",
    "rows": {
        "kv=0.25,score=h2o": {"perplexity": 11.25, "kv_bytes_kept_vs_fp16": 0.25},
        "previous: kv=0.25,score=h2o": {"perplexity": 11.5, "kv_bytes_vs_fp16": 0.25},  # a note, not a recipe
        "kv_bytes=0.125": {"perplexity": 10.75, "kv_bytes_vs_fp16": 0.125},
        "kv=0.5,kv_bits=4": {"perplexity": 10.5, "kv_bytes_vs_fp16": 0.140625},
    },
}
PEERS = {
    "meta": {"command": "make peers"},
    "rows": [
        {"peer": "dense", "press": "none", "split": "test", "options": {}, "perplexity": 10.0, "kv_bytes_vs_fp16": 1.0},
        {
            "peer": "kvpress",
            "press": "KVzip",
            "split": "test",
            "options": {"keep": 0.25, "kvzip_chat_template": True},
            "perplexity": 9.5,
            "kv_bytes_vs_fp16": 0.25,
        },
        {
            "peer": "kvpress",
            "press": "KVzip",
            "split": "test",
            "options": {"keep": 0.25, "kvzip_chat_template": False},
            "perplexity": 11.125,
            "kv_bytes_vs_fp16": 0.25,
        },
        {
            "peer": "kvpress+quantized-cache",
            "press": "ObservedAttention",
            "split": "test",
            "options": {"keep": 0.5, "nbits": 4},
            "perplexity": 10.625,
            "kv_bytes_vs_fp16": 0.140625,
        },
        {
            "peer": "quantized-cache",
            "press": "QuantizedCache",
            "split": "valid",
            "options": {"nbits": 4},
            "perplexity": 9.0,
            "kv_bytes_vs_fp16": 0.28125,
        },
    ],
}


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_series_of_recipes() -> None:
    assert series_of("kv=0.25,score=h2o") == "eviction only"
    assert series_of("kv_tokens=40") == "eviction only"
    assert series_of("kv_key_bits=4,kv_value_bits=3") == "quantization only"
    assert series_of("kv=0.5,kv_bits=4") == "eviction + quantization"
    assert series_of("kv_bytes=0.25") == "kv_bytes=F"


def test_lower_envelope_against_brute_force() -> None:
    rng = random.Random(0)
    pts = [KVPoint("s", str(i), rng.choice([0.1, 0.2, 0.3, 0.5]), rng.uniform(10, 20), "f") for i in range(40)]
    env = lower_envelope(pts)
    # brute force: a point is on the envelope iff no point with bytes <= its bytes has a lower perplexity
    # (ties in bytes: only the lowest perplexity)
    expected = {p.label for p in pts if not any(q.kv_bytes <= p.kv_bytes and q.perplexity < p.perplexity for q in pts)}
    assert {p.label for p in env} == expected
    assert [p.kv_bytes for p in env] == sorted(p.kv_bytes for p in env)


def test_points_read_from_fake_files(tmp_path) -> None:
    files = [
        _write(tmp_path, "kv-quant.json", OURS),
        _write(tmp_path, "kv-bytes.json", EVICT),
        _write(tmp_path, "kvpress.json", PEERS),
        _write(tmp_path, "other.json", {"runs": {"valid": {}}}),
    ]
    assert all(is_kv_source(f) for f in files)
    points, dense, empty = read_points(files)
    got = {(p.series, p.label): (p.kv_bytes, p.perplexity) for p in points}
    assert got == {
        ("quantization only", "kv_bits=4,kv_group=64"): (0.28125, 10.1),
        ("quantization only", "kv_bits=2,kv_group=32"): (0.1875, 12.5),
        ("eviction only", "kv=0.25,score=h2o"): (0.25, 11.25),
        ("kv_bytes=F", "kv_bytes=0.125"): (0.125, 10.75),
        ("eviction + quantization", "kv=0.5,kv_bits=4"): (0.140625, 10.5),
        ("kvpress: KVzip", "KVzip 0.25"): (0.25, 11.125),  # the chat-template row is left out
        ("kvpress+quantized-cache: ObservedAttention", "ObservedAttention 0.5, 4 bits"): (0.140625, 10.625),
    }
    assert dense == 10.0 and empty == ["other.json"]


def test_report_draws_the_panel_and_sweep_reader_skips_kv_files(tmp_path, dynaprune_cli) -> None:
    files = [_write(tmp_path, "kv-quant.json", OURS), _write(tmp_path, "kvpress.json", PEERS)]
    assert load_rows(files) == []  # not sweep rows: the KV panel reads them
    out = tmp_path / "out"
    code, text = dynaprune_cli("report", *map(str, files), "-o", str(out))
    assert code == 0, text
    md = (out / "report.md").read_text()
    assert "## KV cache: perplexity vs K/V bytes" in md and "figures/kv-bytes-panel.png" in md
    assert "| quantization only | kv_bits=2,kv_group=32 | 0.1875 | 12.5000 | kv-quant.json |" in md
    assert "| kvpress: KVzip | KVzip 0.25 | 0.2500 | 11.1250 | kvpress.json |" in md
    assert "python -m benchmarks.kv_quant --split test" in md and "make peers" in md
    png = (out / "figures" / "kv-bytes-panel.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "KV cache: perplexity vs K/V bytes" in html and "data:image/png;base64," in html

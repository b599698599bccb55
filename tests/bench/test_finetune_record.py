"""benchmarks/finetune_record: per-interval rates recovered from the cumulative steps/s progress lines
(hand-computed), and the JSON it writes from a checkpoint's config + a load log."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.finetune_record import intervals, main

LOG = """loading minilm-l6 ...
step 100/400  epoch 1  loss 0.5000  lr 1.00e-04  4.00 steps/s
step 200/400  epoch 1  loss 0.4000  lr 8.00e-05  2.00 steps/s  dev acc 0.8000
step 300/400  epoch 1  loss 0.3000  lr 5.00e-05  1.00 steps/s
"""


def test_intervals_are_the_rates_between_progress_lines():
    rows = intervals(LOG)
    # cumulative 4, 2, 1 steps/s -> reported at 25 s, 100 s, 300 s -> 100/25, 100/75, 100/200
    assert [r["seconds"] for r in rows] == [25.0, 100.0, 300.0]
    assert [r["interval_steps_per_second"] for r in rows] == pytest.approx([4.0, 1.333, 0.5], abs=1e-3)
    assert [r["loss"] for r in rows] == [0.5, 0.4, 0.3]


def test_record_writes_wall_time_load_and_a_quiet_estimate(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    training = {"steps": 400, "seconds": 350.0, "history": [{"step": 400, "dev_accuracy": 0.9}]}
    (ck / "config.json").write_text(json.dumps({"dynaprune": {"training": training}}))
    end = 1_000_000.0
    os.utime(ck / "config.json", (end, end))
    log = tmp_path / "train.log"
    log.write_text(LOG)
    load = tmp_path / "load.log"
    load.write_text("".join(f"{end - 400 + 30 * i} {1.0 + i} 1 1\n" for i in range(14)))
    out = tmp_path / "out.json"
    main(["--checkpoint", str(ck), "--log", str(log), "--load-log", str(load), "--start", str(end - 400),
          "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["wall_seconds_total"] == 400.0 and got["train_seconds"] == 350.0
    assert got["load1_max_during_run"] == 14.0
    assert got["load1_mean_during_run"] == pytest.approx(7.5)
    assert got["quiet_estimate_seconds"] == pytest.approx(400 / 4.0 + 15)  # fastest interval + one dev eval

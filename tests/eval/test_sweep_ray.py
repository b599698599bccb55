"""Sweeps on a local 2-CPU Ray: the same lines as the sequential sweep, a killed worker retried without
a line written twice, a failing point recorded as failed while the others finish, an unreachable
address refused quickly."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'dynaprune[ray]')")

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.eval.sweep import RunSpec, read_results, run_sweep  # noqa: E402
from dynaprune.eval.sweep_ray import check_reachable, run_point, run_sweep_ray  # noqa: E402

RECIPES = ["dense", "token=0.5", "token=0.3", "head=0.8"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def specs(data):
    return [RunSpec("minilm-l6", "sts", str(data), r, {"max_examples": 16}, line=i + 1) for i, r in enumerate(RECIPES)]


def stable(row):
    return {k: v for k, v in row.items() if k not in ("seconds", "finished", "command")}


def test_ray_lines_equal_sequential(local_ray, tmp_path, shared_data, minilm_path):
    grid = specs(shared_data / "stsb" / "dev.tsv")
    seq, par = tmp_path / "seq.jsonl", tmp_path / "ray.jsonl"
    run_sweep(grid, seq, lambda spec: run_point(spec))
    assert run_sweep_ray(grid, par) == 4
    by_id = {r["run_id"]: stable(r) for r in read_results(seq)}
    got = {r["run_id"]: stable(r) for r in read_results(par)}
    assert got.keys() == by_id.keys() and len(read_results(par)) == 4
    for run_id, row in by_id.items():
        assert got[run_id]["metric"] == row["metric"]
        assert got[run_id]["cost"]["flops_kept"] == row["cost"]["flops_kept"]
    assert run_sweep_ray(grid, par) == 0  # resumed: nothing left to run


def test_killed_worker_is_retried_and_written_once(local_ray, tmp_path):
    marker = tmp_path / "died-once"

    def point(spec, command=""):
        import os

        if spec.recipe == "token=0.5" and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies mid-point
        return {"model": spec.model, "task": spec.task, "metric": {"name": "m", "value": len(spec.recipe)}}

    grid = [RunSpec("m", "sts", None, r, {}, line=i) for i, r in enumerate(RECIPES)]
    out = tmp_path / "r.jsonl"
    assert run_sweep_ray(grid, out, point=point) == 4
    rows = read_results(out)
    assert marker.exists() and sorted(r["recipe"] if "recipe" in r else "" for r in rows) == [""] * 4
    assert sorted(r["metric"]["value"] for r in rows) == sorted(len(r) for r in RECIPES)
    assert len({r["run_id"] for r in rows}) == 4


def test_failing_point_is_a_failed_line_and_the_rest_run(local_ray, tmp_path):
    def point(spec, command=""):
        if spec.recipe == "token=0.3":
            raise DynapruneError("this point is broken")
        return {"model": spec.model, "task": spec.task, "metric": {"name": "m", "value": 1.0}}

    grid = [RunSpec("m", "sts", None, r, {}, line=i) for i, r in enumerate(RECIPES)]
    out = tmp_path / "r.jsonl"
    assert run_sweep_ray(grid, out, point=point, max_retries=0) == 4
    rows = read_results(out)
    failed = [r for r in rows if r.get("status") == "failed"]
    assert len(rows) == 4 and len(failed) == 1
    assert failed[0]["recipe"] == "token=0.3" and "this point is broken" in failed[0]["error"]


def test_sequential_failing_point_is_a_failed_line(tmp_path):
    def run(spec):
        if spec.recipe == "head=0.8":
            raise DynapruneError("bad point")
        return {"model": spec.model, "task": spec.task, "metric": {"name": "m", "value": 1.0}}

    grid = [RunSpec("m", "sts", None, r, {}, line=i) for i, r in enumerate(RECIPES)]
    out = tmp_path / "r.jsonl"
    assert run_sweep(grid, out, run) == 4
    assert [r.get("status") for r in read_results(out)] == [None, None, None, "failed"]


def test_unreachable_address_is_one_error_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DynapruneError, match="cannot reach a Ray cluster at 127.0.0.1:9"):
        check_reachable("127.0.0.1:9", timeout=2)
    assert time.perf_counter() - t0 < 5
    config = tmp_path / "c.yaml"
    config.write_text("runs:\n  - model: minilm-l6\n    task: sts\n    recipes: [dense]\n")
    proc = subprocess.run([sys.executable, "-m", "dynaprune.cli", "sweep", str(config), "--out",
                           str(tmp_path / "o.jsonl"), "--ray", "10.255.255.1:6379"],
                          capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "cannot reach" in errors[0]
    assert "Traceback" not in proc.stderr

"""Shared benchmark helpers: timing medians, machine description, JSON output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dynaprune.eval.result import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Median (and min/max) wall-clock seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def save(name: str, payload: dict, subdir: str = "") -> Path:
    path = RESULTS / subdir / f"{name}.json"
    write_json_atomic(path, {"benchmark": name, "machine": machine(), "versions": versions(), **payload})
    return path

"""Shared benchmark helpers: timing medians, machine description, JSON output."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval.result import versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every speed benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-compile", action="store_true", help="do not use torch.compile where it would be used")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/NAME.json)")
    return p


def setup_threads(threads: int | None) -> int:
    """Intra-op threads: ``threads`` when given; else one per core on a quiet machine, and a single
    thread when the machine is already busy (1-minute load >= cores). On a shared 2-core machine a
    second thread that is not scheduled makes every parallel op wait a time slice at its barrier:
    measured here, a decode step's small attention ops went from 0.5 ms to 20-60 ms with 2 threads
    under load. Both sides of every ratio run with the same setting."""
    cores = os.cpu_count() or 1
    if threads is None:
        busy = os.getloadavg()[0] >= cores if hasattr(os, "getloadavg") else False
        threads = 1 if busy else cores
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def pick_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; asking for CUDA where there is none stops before any work."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DynapruneError("--device cuda: no CUDA device is available here (torch "
                             f"{torch.__version__}); run on a GPU machine or use --device cpu")
    if name not in ("cpu", "cuda"):
        raise DynapruneError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures the work (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_memory_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(need_bytes: int, what: str, available: int | None = None) -> None:
    """Stop before any work when ``what`` needs more memory than the machine has available."""
    available = available_memory_bytes() if available is None else available
    if available is not None and need_bytes > available:
        raise DynapruneError(
            f"{what} needs about {need_bytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB is available; "
            "use smaller sizes (or --quick)"
        )


def load_average() -> str:
    """``uptime``'s load averages, for the record (timings on a shared machine are noisy)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Median seconds of each function, the variants run round-robin (dense, pruned, dense, ...) so
    that load changes on a shared machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}
            for name, ts in times.items()}


def wikitext_ids(tokenizer, n: int, split: str = "test", offset_chars: int = 0) -> list[int]:
    """The first ``n`` token ids of WikiText-2 (from ``offset_chars`` into the split)."""
    from dynaprune.paths import shared_data_dir

    text = (shared_data_dir() / "wikitext2" / f"{split}.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[offset_chars: offset_chars + n * 12], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise DynapruneError(f"WikiText-2 {split} has fewer than {n} tokens from character {offset_chars}")
    return ids[:n]


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


def save(name: str, payload: dict, subdir: str = "", path: Path | None = None) -> Path:
    path = path or RESULTS / subdir / f"{name}.json"
    write_json_atomic(path, {"benchmark": name, "machine": machine(), "versions": versions(),
                             "load": load_average(), **payload})
    return path


def token_flops_kept(shape, recipe, length: int) -> float:
    """FLOPs a ``token=`` recipe keeps on one sequence of ``length`` tokens, from its schedule (the
    same count ``runtime.cost`` makes from a run's work): every layer's projections, attention and FFN
    on the tokens entering it."""
    from dynaprune.runtime.cost import _flops

    def layer(n: int) -> int:
        pairs = n * (n + 1) // 2 if shape.causal else n * n
        return sum(_flops(shape, n, pairs * shape.heads, n * shape.heads, n * shape.kv_heads).values())

    counts = recipe.token_keep_counts(shape.layers, length)
    entering = [length, *counts[:-1]]
    return sum(layer(n) for n in entering) / (shape.layers * layer(length))


def token_recipe_for(shape, length: int, flops_kept: float, extra: str = ""):
    """The ``token=K`` recipe (K to 3 decimals, bisected) whose schedule keeps about ``flops_kept`` of
    the dense FLOPs at ``length`` tokens; the lowest K when even that keeps more."""
    from dynaprune.prune.recipe import Recipe

    def make(k: float) -> Recipe:
        return Recipe.parse(f"token={k:.3f}{extra}")

    lo, hi = 0.001, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if token_flops_kept(shape, make(mid), length) > flops_kept:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda k: abs(token_flops_kept(shape, make(k), length) - flops_kept))
    return make(best)

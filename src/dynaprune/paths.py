"""Where the shared benchmark data lives: $DYNAPRUNE_DATA, else ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    if env := os.environ.get("DYNAPRUNE_DATA"):
        return Path(env)
    repo_sibling = Path(__file__).resolve().parents[3] / "shared" / "data"  # editable install
    if repo_sibling.exists():
        return repo_sibling
    return Path.cwd().parent / "shared" / "data"


def default_data(task: str) -> dict[str, Path]:
    """The default data files of a task (what `dynaprune eval` uses without --data)."""
    root = shared_data_dir()
    return {
        "sts": {"data": root / "stsb" / "dev.tsv"},
        "sst2": {"data": root / "sst2" / "dev.tsv", "train_data": root / "sst2" / "train.tsv"},
        "classify": {"data": root / "sst2" / "dev.tsv", "train_data": root / "sst2" / "train.tsv"},
        "lm": {"data": root / "wikitext2" / "test.txt"},
        "generate": {"data": root / "mt-bench" / "questions.jsonl"},
    }.get(task, {})

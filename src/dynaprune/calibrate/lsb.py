"""Calibrating progressive quantization's threshold for a target LSB row rate (``quant=M+L@rateR``).

A run of the ``continue`` protocol on a validation text at threshold 1 (every row recomputed with MSB +
LSB, so the hidden states are those of the full-width quantization, close to the ones at a small LSB
rate) records the max MSB-only probability of every real (batch, head, query) row in a histogram of
``HISTOGRAM_BINS`` bins; the threshold for a rate R is the smallest bin edge below which a share R of
the rows lies (rows with max probability < T fetch their LSBs). The table (rates -> thresholds) is what
``lsb_thresholds.json`` ships and ``resolve_threshold`` interpolates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.io import write_text_atomic
from dynaprune.prune.techniques.progressive_quant import HISTOGRAM_BINS, QUANTIZER, shape_signature

# what identifies a table (with the default of a key older tables lack)
TABLE_KEY = (("shape", None), ("msb_bits", None), ("lsb_bits", None), ("group", None), ("rotate", ""),
             ("value_residual", False))
TABLE_RATES = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)


def thresholds_from_histogram(histogram: torch.Tensor, rates: tuple[float, ...] = TABLE_RATES) -> list[float]:
    """For each rate R the smallest bin edge T with a share >= R of the rows below it."""
    total = float(histogram.sum())
    if total <= 0:
        raise DynapruneError("no attention rows were recorded to calibrate on")
    below = torch.cumsum(histogram.double(), 0) / total  # share of rows below each bin's upper edge
    edges = torch.linspace(0, 1, len(histogram) + 1, dtype=torch.float64)[1:]
    return [float(edges[int(torch.searchsorted(below, torch.tensor(rate, dtype=torch.float64)))]) for rate in rates]


def calibrate_lsb(model: Any, data: str | Path, msb_bits: int, lsb_bits: int, group: int | None = None, *,
                  examples: int = 8, context: int = 1536, continuation: int = 512, rotate: str = "",
                  value_residual: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """The rate -> threshold table of ``quant=M+L`` (groups of ``group``; ``quant_rotate=rotate``,
    ``quant_value_residual``) on ``model`` over ``data``."""
    from dynaprune.eval.lm import evaluate_lm
    from dynaprune.runtime.pruning import make_context

    recipe = (f"quant={msb_bits}+{lsb_bits}@1" + (f",quant_group={group}" if group is not None else "")
              + (f",quant_rotate={rotate}" if rotate else "") + (",quant_value_residual=on" if value_residual else ""))
    contexts: list = []

    def new_context():
        ctx = make_context(recipe, model)
        ctx.max_prob_histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
        contexts.append(ctx)
        return ctx

    result = evaluate_lm(model, data, protocol="continue", context=context, continuation=continuation,
                         max_examples=examples, ctx_factory=new_context, progress=progress)
    histogram = sum(c.max_prob_histogram for c in contexts)
    stage_group = contexts[0].key_group
    return {
        "model": getattr(model, "name", type(model).__name__),
        "shape": shape_signature(contexts[0].shape),
        "msb_bits": msb_bits, "lsb_bits": lsb_bits, "group": stage_group, "rotate": rotate,
        "value_residual": value_residual, "quantizer": QUANTIZER,
        "data": str(data), "protocol": {"continue": True, "context": context, "continuation": continuation,
                                        "examples": result.n},
        "rows": int(histogram.sum()), "perplexity_all_lsb": result.metric["value"],
        "rates": list(TABLE_RATES), "thresholds": thresholds_from_histogram(histogram),
    }


def merge_table(path: Path, table: dict) -> Path:
    """Add ``table`` to the thresholds file at ``path`` (replacing one of the same shape and setting)."""
    data = json.loads(path.read_text()) if path.exists() else {"tables": []}
    kept = [t for t in data.get("tables", []) if any(t.get(k, d) != table.get(k, d) for k, d in TABLE_KEY)]
    data["tables"] = [*kept, table]
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    return path

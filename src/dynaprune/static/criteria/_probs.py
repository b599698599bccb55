"""Attention probabilities of the calibration batches, per layer, for the entropy / confidence criteria."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dynaprune.runtime.attention import RunContext


def per_head(model, calib, reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Mean over real queries of ``reduce(probs)`` (B, H, Lq) per head, per layer."""
    n = len(model.layers)
    total: list[torch.Tensor | None] = [None] * n
    count: list[float] = [0.0] * n
    with torch.no_grad():
        for batch in calib:
            ctx = RunContext(record_probs=True, count_work=False)
            calib.forward(model, batch, ctx)
            qmask = batch.mask.to(torch.float32)  # (B, L) real queries only
            for rec in ctx.records:
                v = reduce(rec.probs.float())  # (B, H, Lq)
                s = (v * qmask[:, None, :]).sum((0, 2))
                total[rec.layer] = s if total[rec.layer] is None else total[rec.layer] + s
                count[rec.layer] += float(qmask.sum())
    return [t / c for t, c in zip(total, count, strict=True)]

"""Activation magnitude of FFN neurons: mean |activation| on the calibration set (guide section 2, 'Activation-
Based Pruning')."""

from __future__ import annotations

import torch

from dynaprune.static.criteria.probe import magnitude


def scores(model, calib) -> list[torch.Tensor]:
    """Per layer, one score per neuron; higher = more important."""
    return magnitude(model, calib, "ffn")

"""Taylor importance of heads: |dL/d gate_h| on the calibration set (Michel et al. 2019; guide section 4,
'Gradient-Based Importance')."""

from __future__ import annotations

import torch

from dynaprune.static.criteria.probe import taylor


def scores(model, calib) -> list[torch.Tensor]:
    """Per layer, one score per head; higher = more important."""
    return taylor(model, calib, "heads")

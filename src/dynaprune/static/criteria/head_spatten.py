"""SpAtten's cumulative head importance (paper section 3.2: the magnitude of each head's output, accumulated)
used as a static prior: mean |head output| over the calibration set."""

from __future__ import annotations

import torch

from dynaprune.static.criteria.probe import magnitude


def scores(model, calib) -> list[torch.Tensor]:
    """Per layer, one score per head; higher = more important."""
    return magnitude(model, calib, "heads")

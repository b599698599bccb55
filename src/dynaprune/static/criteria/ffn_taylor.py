"""Taylor importance of FFN neurons: |sum of grad x activation| (Molchanov et al.; guide section 4)."""

from __future__ import annotations

import torch

from dynaprune.static.criteria.probe import taylor


def scores(model, calib) -> list[torch.Tensor]:
    """Per layer, one score per neuron; higher = more important."""
    return taylor(model, calib, "ffn")

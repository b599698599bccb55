"""Layer importance from the pruning guide's per-layer sensitivity analysis (section 3): the calibration
loss when the whole layer is skipped (``static/sensitivity.py``'s hook). The layers whose removal raises
the loss least are the first to drop."""

from __future__ import annotations

import torch


def scores(model, calib) -> torch.Tensor:
    from dynaprune.static.sensitivity import layer_losses

    return torch.tensor(layer_losses(model, calib))

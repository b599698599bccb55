"""Head confidence (guide section 4; Voita et al. 2019): the mean over real queries of the largest
attention probability; confident heads are important."""

from __future__ import annotations

import torch

from dynaprune.static.criteria._probs import per_head


def scores(model, calib) -> list[torch.Tensor]:
    return per_head(model, calib, lambda p: p.amax(-1))

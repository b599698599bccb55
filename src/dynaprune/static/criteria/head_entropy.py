"""Attention entropy of each head (guide section 4, 'Attention Entropy'): diffuse (high-entropy) heads
are likely prunable; the score is the negative mean entropy, so higher = more important."""

from __future__ import annotations

import torch

from dynaprune.static.criteria._probs import per_head


def scores(model, calib) -> list[torch.Tensor]:
    ent = per_head(model, calib, lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1))
    return [-e for e in ent]

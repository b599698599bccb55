"""Importance criteria, one file each (higher score = more important = kept)."""

from __future__ import annotations

from dynaprune.errors import DynapruneError
from dynaprune.static.criteria import (
    ffn_magnitude,
    ffn_taylor,
    head_confidence,
    head_entropy,
    head_spatten,
    head_taylor,
    layer_cosine,
    layer_sensitivity,
)

HEAD_CRITERIA = {"taylor": head_taylor.scores, "entropy": head_entropy.scores,
                 "confidence": head_confidence.scores, "spatten": head_spatten.scores,
                 "magnitude": head_spatten.scores}
FFN_CRITERIA = {"taylor": ffn_taylor.scores, "magnitude": ffn_magnitude.scores,
                "entropy": ffn_magnitude.scores, "confidence": ffn_magnitude.scores,
                "spatten": ffn_magnitude.scores}  # FFN has no attention: attention criteria use magnitude
LAYER_CRITERIA = {"cosine": layer_cosine.scores, "sensitivity": layer_sensitivity.scores}


def criterion(name: str) -> tuple:
    if name not in HEAD_CRITERIA:
        raise DynapruneError(f"unknown criterion {name!r} (known: {', '.join(HEAD_CRITERIA)})")
    return HEAD_CRITERIA[name], FFN_CRITERIA[name]

"""Per-layer head counts and FFN widths of a statically pruned checkpoint, read from its config.json.

``dynaprune prune`` writes ``dynaprune_layer_heads`` / ``dynaprune_layer_intermediate`` (one integer per
remaining layer) beside the usual HF keys; a plain checkpoint has neither and stays uniform. The record of
what was removed (``dynaprune_static``) travels on the model's config (``static_record``) so that a
fine-tune writes it again and an evaluation reports it (``static/record.py``)."""

from __future__ import annotations

from typing import Any

from dynaprune.errors import DynapruneError

HEADS_KEY = "dynaprune_layer_heads"
FFN_KEY = "dynaprune_layer_intermediate"
RECORD_KEY = "dynaprune_static"


def _int_list(d: dict[str, Any], key: str, n_layers: int, at_most: int) -> list[int] | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n_layers:
        raise DynapruneError(f"config.json: {key} must list one integer per layer ({n_layers}), got {value!r}")
    for i, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= at_most:
            raise DynapruneError(f"config.json: {key}[{i}] = {x!r} is not an integer in [1, {at_most}]")
    return value


def per_layer_shapes(d: dict[str, Any], n_layers: int, n_heads: int,
                     kv_heads: int | None = None) -> tuple[list[int] | None, list[int] | None]:
    """(heads per layer, FFN width per layer), each None when the checkpoint is uniform."""
    heads = _int_list(d, HEADS_KEY, n_layers, n_heads)
    ffn = _int_list(d, FFN_KEY, n_layers, 1 << 30)
    if heads is not None and kv_heads:
        for i, h in enumerate(heads):
            if h % kv_heads:  # grouped-query attention: every KV group keeps as many query heads
                raise DynapruneError(f"config.json: {HEADS_KEY}[{i}] = {h} is not a multiple of the "
                                     f"{kv_heads} KV heads")
    return heads, ffn


def read_static_record(d: dict[str, Any]) -> dict | None:
    """The ``dynaprune_static`` record of a pruned checkpoint's config.json (None when it has none)."""
    value = d.get(RECORD_KEY)
    if value is not None and not isinstance(value, dict):
        raise DynapruneError(f"config.json: {RECORD_KEY} must be an object, got {type(value).__name__}")
    return value

"""Sliding-window layers (Gemma 3's local layers) over a KV cache: the window a layer's attention gets (by
slot, or by original position once tokens were pruned), and the expired tokens its cache drops."""

from __future__ import annotations

import torch

from dynaprune.runtime.kvcache import KVCache
from dynaprune.runtime.masks import SlidingWindow

__all__ = ["defer_eviction", "sliding_window", "window_keep"]


def sliding_window(window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor | None) -> int | None:
    """The window a sliding layer passes to ``attention``: a plain int (slots) while the keys sit at
    consecutive positions, else a ``SlidingWindow`` by original position (after a prefill selection the
    survivors' slots are not their positions: query p must see keys p - window < pos <= p, not the latest
    ``window`` survivors). ``k_pos`` (B, Hkv, Lk) for a cache compacted per KV head: each head's own
    positions."""
    if window is None or k_pos is None or k_pos.shape[-1] < 2:
        return window
    if bool((k_pos[..., 1:] - k_pos[..., :-1] == 1).all()):
        return window
    return SlidingWindow(window, q_pos, k_pos)


def window_keep(cache: KVCache, layer: int, window: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(index, keep_mask) of the cached tokens of ``layer`` the next query (at ``next_position``) can
    still see, within ``window`` keys itself included; None when it sees every one. Cached tokens are in
    position order, so they are the last slots (rows needing fewer mask the rest out)."""
    length = cache.lengths[layer]  # fewer than the window may still hold an expired token (after a KV budget)
    if length == 0:
        return None
    per_head = cache.head_positions[layer] is not None
    pos = cache.head_cached_positions(layer) if per_head else cache.cached_positions(layer)
    first = cache.next_position.to(pos.device) - (window - 1)
    inside = pos >= (first[:, None, None] if per_head else first[:, None])
    n = int(inside.sum(-1).max())
    if n == length and bool(inside.all()):  # one head seeing all may hide another's expired tokens
        return None
    index = torch.arange(length - n, length, device=pos.device).expand(*pos.shape[:-1], n)
    keep = inside[..., length - n:]
    return index.contiguous(), None if bool(keep.all()) else keep


def defer_eviction(cache: KVCache, layer: int, found: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    """Whether a packed layer keeps its expired tokens until a whole key group of them has expired."""
    store = cache.packed[layer]
    if store is None:
        return False
    index, keep = found
    kept = index.shape[-1] if keep is None else int(keep.sum(-1).min())
    return cache.lengths[layer] - kept < store.spec.key_group

"""Which keys a query may see: causal and sliding-window masks, by slot or by original position, and
the (query, key) pairs they let through (what ``WorkCounter`` counts)."""

from __future__ import annotations

import torch

__all__ = ["SlidingWindow", "build_mask", "count_pairs", "heads_key_mask", "windowed_pairs"]


class SlidingWindow(int):
    """A sliding window of ``int(self)`` positions measured by ORIGINAL position: the query at position p
    sees the keys with p - window < pos <= p (Gemma 3's local layers). A plain int window counts slots,
    which is the same thing until tokens were pruned (a prefill selection keeps survivors at their
    positions, so the latest ``window`` survivors reach further back). An int, so every caller that only
    sizes things by the window keeps working; the masks read the positions. q_pos (B, Lq); k_pos (B, Lk),
    or (B, Hkv, Lk) for a cache compacted per KV head (each head keeps its own tokens, so its own positions)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor

    def __new__(cls, size: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> SlidingWindow:
        obj = super().__new__(cls, size)
        obj.q_pos, obj.k_pos = q_pos, k_pos
        return obj

    def visible(self, heads: int | None = None) -> torch.Tensor:
        """(B, 1 or Hkv, Lq, Lk) bool: causal by position, within the window. ``heads``: repeat a per-KV-head
        mask for the query heads of each group (B, heads, Lq, Lk)."""
        k_pos = self.k_pos.to(self.q_pos.device)
        k = k_pos[:, :, None, :] if k_pos.dim() == 3 else k_pos[:, None, None, :]
        q = self.q_pos[:, None, :, None]
        vis = (k <= q) & (k > q - int(self))
        if heads is not None and vis.shape[1] not in (1, heads):
            vis = vis.repeat_interleave(heads // vis.shape[1], dim=1)
        return vis


def windowed_pairs(n_keys: torch.Tensor, n_queries: torch.Tensor, window: int) -> torch.Tensor:
    """Causal pairs per row when the i-th of ``n_queries`` last queries sees ``n_keys - n_queries + 1 + i``
    keys, at most ``window`` of them (a sliding-window layer)."""
    first = n_keys - n_queries + 1  # keys the first query sees
    full = (window - first).clamp(min=0).minimum(n_queries)  # queries below the window: first .. first + full - 1
    return full * first + full * (full - 1) // 2 + (n_queries - full) * window


def count_pairs(lq: int, lk: int, key_padding_mask: torch.Tensor | None, causal: bool, batch: int,
                window: int | None = None) -> tuple[int, int]:
    """(real query tokens, real attended (query, key) pairs) of one call.

    With a padding mask the real keys of each row are counted; queries are the real tokens when queries
    and keys are the same tokens (encoder, prefill), else all ``lq`` new tokens (decode). ``window``: a
    causal query sees at most that many keys.
    """
    if key_padding_mask is None:
        n_keys = torch.full((batch,), lk)
    else:
        n_keys = key_padding_mask.sum(dim=-1).cpu()
        if n_keys.dim() == 2:  # per-KV-head key mask: the mean count over the heads
            n_keys = n_keys.float().mean(1).round().long()
    n_queries = n_keys if (lq == lk and key_padding_mask is not None) else torch.full((batch,), lq)
    pairs = n_queries * n_keys
    if causal and isinstance(window, SlidingWindow):  # by position: count what the mask lets through
        vis = window.visible()
        if key_padding_mask is not None and key_padding_mask.dim() == 2:
            m = key_padding_mask.to(torch.bool).to(vis.device)
            vis = vis & m[:, None, None, :] & (m[:, None, :, None] if lq == lk else True)
        elif key_padding_mask is not None:  # per KV head: the mean count over the heads, as above
            vis = vis & key_padding_mask.to(torch.bool).to(vis.device)[:, :, None, :]
        return int(n_queries.sum()), round(int(vis.sum()) / vis.shape[1])
    if causal:  # a query sees the cached keys and the new keys up to itself
        pairs = pairs - n_queries * (n_queries - 1) // 2
    if causal and window is not None:
        pairs = windowed_pairs(n_keys, n_queries, window)
    return int(n_queries.sum()), int(pairs.sum())


def build_mask(
    lq: int, lk: int, key_padding_mask: torch.Tensor | None, causal: bool, device: torch.device,
    window: int | None = None, heads: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (True = attend), broadcastable to (B, H, Lq, Lk); None when nothing is masked.
    ``key_padding_mask`` (B, Lk), or (B, H, Lk) per head (``heads_key_mask`` expands KV heads). ``heads``:
    the query heads H, which a per-KV-head ``SlidingWindow`` is expanded to."""
    mask = None
    if key_padding_mask is not None:
        m = key_padding_mask.to(torch.bool)
        mask = m[:, :, None, :] if m.dim() == 3 else m[:, None, None, :]
    if causal and isinstance(window, SlidingWindow):
        vis = window.visible(heads).to(device)
        return vis if mask is None else mask & vis
    if causal and (lq > 1 or (window is not None and lk > window)):
        tri = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
        if window is not None:  # sliding window: query i sees keys i + lk - lq - window + 1 .. i + lk - lq
            tri = tri.triu(diagonal=lk - lq - window + 1)
        mask = tri if mask is None else mask & tri
    return mask


def heads_key_mask(key_padding_mask: torch.Tensor | None, n_heads: int) -> torch.Tensor | None:
    """A per-KV-head key mask (B, Hkv, Lk) repeated for the query heads of each group (B, H, Lk);
    a (B, Lk) mask or None as it is."""
    if key_padding_mask is None or key_padding_mask.dim() == 2 or key_padding_mask.shape[1] == n_heads:
        return key_padding_mask
    return key_padding_mask.repeat_interleave(n_heads // key_padding_mask.shape[1], dim=1)

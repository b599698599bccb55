"""Observation-window attention (SnapKV, Li et al. 2024, Sec. 4): the attention the last ``w`` prompt
queries give every key, the cheap importance of a prefill.

Only a (w x L) slice of probabilities is materialised, so it can run next to SDPA's fused kernel (which
never exposes its probabilities) at about w / L of one layer's attention work. Pure functions over
q / k; the callers (a prefill selection, a KV scorer) decide what to keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the last ``window`` queries, summed over those queries, per query head.

    q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), Hq a multiple of Hkv (GQA: each K head serves its group
    through a reshape, no copy); the last query is aligned with the last key (causal, as in a prefill or
    a decode step over a cache). key_padding_mask: (B, Lk) bool, True = real key. Returns (B, Hq, Lk)
    float32: entry [b, h, j] = sum over the window's queries i of softmax_j(q_i k_j * scale), causal
    (query i sees keys up to its own position), padding keys 0. ``sliding`` (a sliding-window layer,
    Gemma 3): query i sees only the keys within ``sliding`` positions, itself included, as the layer does;
    ``positions`` (B, Lk): the keys' original positions (after token pruning), else their slots.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not 1 <= window <= Lq:
        raise ValueError(f"window must be in 1..{Lq} (the queries given), got {window}")
    scale = D**-0.5 if scale is None else scale
    G = Hq // Hkv
    qw = q[:, :, Lq - window:].reshape(B, Hkv, G * window, D)
    scores = (qw @ k.transpose(-1, -2)).view(B, Hkv, G, window, Lk).float().mul_(scale)
    # window query i (0-based in the window) sits at key position Lk - window + i
    pos = torch.arange(Lk, device=q.device)[None] if positions is None else positions.to(q.device)
    key, query = pos[:, None, :], pos[:, Lk - window:, None]  # (1 or B, window, Lk)
    visible = (key <= query) & ((key > query - sliding) if sliding is not None else True)
    visible = visible[:, None, None]  # (1 or B, 1, 1, window, Lk)
    if key_padding_mask is not None:  # (B, Lk), or (B, Hkv, Lk) for a cache compacted per KV head
        m = key_padding_mask.to(torch.bool)
        visible = visible & (m[:, :, None, None, :] if m.dim() == 3 else m[:, None, None, None, :])
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # a query that sees no real key: a row of 0
    return probs.sum(dim=3).reshape(B, Hq, Lk)


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool scores (..., L) along the last dim with an odd ``kernel`` (same length; SnapKV's
    clustering: a token next to an important one is kept with it). kernel 1 returns ``scores``."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be an odd positive number, got {kernel}")
    if kernel == 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(shape)

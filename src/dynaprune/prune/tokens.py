"""Cascade token pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-A and Algorithm 2).

The cumulative importance of a token is the sum of the attention probabilities it receives, over heads
and queries, then over layers and, in generation, over decode steps. After a layer the tokens with the
smallest cumulative importance are dropped from every later layer ("cascade"): their hidden states,
Q, K and V all disappear, so FFN work shrinks too.

How the runtime uses these functions, per layer:

1. ``cumulative = accumulate_token_importance(cumulative, probs, key_mask, query_mask=...)``;
   ``cumulative`` stays aligned with the current (already compacted) key axis. In generation a newly
   appended key simply starts at zero (a shorter ``cumulative`` is zero-extended on the right).
2. ``keep = select_tokens_to_keep(cumulative, n_keep, protected, valid)`` with ``n_keep`` from
   ``Recipe.token_keep_counts`` (per row for batches of different lengths) and ``protected`` from
   :func:`edge_token_mask` ([CLS], the last prompt token, sinks, the recent window).
3. ``gather_tokens`` the hidden states, position ids, the cumulative importance itself, and the K/V
   cache (``dim=2``) with ``keep.index``; the new padding mask is ``keep.mask``.

Selections are deterministic: ties in importance go to the earlier token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynaprune.errors import DynapruneError


class TokenKeep(NamedTuple):
    """Which tokens survive, right-padded to the longest row of the batch.

    index: (..., Lkeep) LongTensor. The first ``n`` entries of a row are its kept tokens in their
    original order; the rest (only when rows keep different numbers) are filler positions of pruned
    tokens, in original order, so gathering with them is always in range.
    mask: (..., Lkeep) bool, True for the kept entries: the new padding mask.
    """

    index: torch.Tensor
    mask: torch.Tensor


def accumulate_token_importance(
    cumulative: torch.Tensor | None,
    probs: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the attention each key token receives to its cumulative importance (Alg. 2, first loop).

    cumulative: (B, L0) with L0 <= L, aligned with the first L0 keys (None = start from zero).
    probs: (B, H, Lq, L) attention probabilities (only the heads still alive).
    key_mask: (B, L) bool, True for real keys; padding keys get no importance.
    query_mask: (B, Lq) bool, True for real queries; padding queries' rows are not counted.
    Returns (B, L) in at least float32 (sums of many small probabilities).
    """
    acc_dtype = torch.promote_types(probs.dtype, torch.float32)
    if query_mask is not None:
        probs = probs.masked_fill(~query_mask[:, None, :, None].to(torch.bool), 0.0)
    received = probs.sum(dim=(1, 2), dtype=acc_dtype)
    if key_mask is not None:
        received = received.masked_fill(~key_mask.to(torch.bool), 0.0)
    if cumulative is None:
        return received
    missing = received.shape[-1] - cumulative.shape[-1]
    if missing < 0:
        raise ValueError(f"cumulative has {cumulative.shape[-1]} tokens but probs only {received.shape[-1]}")
    if missing:  # decode step: the newly appended keys start with no history
        cumulative = torch.nn.functional.pad(cumulative, (0, missing))
    return cumulative.to(acc_dtype) + received


def received_per_kv_head(probs: torch.Tensor, n_kv_heads: int, heads: torch.Tensor | None,
                         key_mask: torch.Tensor | None, query_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention each key received per KV head (B, Hkv, L): ``probs`` (B, H, Lq, L) of every query
    head summed over the real queries and over the query heads of each KV group. ``key_mask`` (B, L) or
    (B, H or Hkv, L). Needs every head (``heads`` None): a pruned head's group is unknown."""
    if heads is not None:
        raise DynapruneError("per-KV-head scores need every attention head; they cannot run with head pruning")
    acc_dtype = torch.promote_types(probs.dtype, torch.float32)
    if query_mask is not None:
        probs = probs.masked_fill(~query_mask[:, None, :, None].to(torch.bool), 0.0)
    b, h, _, length = probs.shape
    received = probs.sum(dim=2, dtype=acc_dtype).view(b, n_kv_heads, h // n_kv_heads, length).sum(2)
    if key_mask is not None:
        m = key_mask.to(torch.bool)
        if m.dim() == 3 and m.shape[1] != n_kv_heads:  # repeated for the query heads: one per group
            m = m[:, :: h // n_kv_heads]
        received = received.masked_fill(~(m if m.dim() == 3 else m[:, None]), 0.0)
    return received


def select_tokens_to_keep(
    cumulative_importance: torch.Tensor,
    n_keep: int | torch.Tensor,
    protected: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> TokenKeep:
    """Top-``n_keep`` tokens per row by cumulative importance, returned in original order (Alg. 2).

    cumulative_importance: (..., L), typically (B, L); per-head (B, H, L) works the same way.
    n_keep: int, or a tensor of shape (...) with one count per row.
    protected: (..., L) bool, tokens kept whatever their score ([CLS], last prompt token, sinks, recent).
    valid: (..., L) bool, real tokens; padding is never selected over a real token and never counts
    as kept.
    Per row the count actually kept is ``clamp(n_keep, n_protected, n_valid)``: protected tokens always
    survive (so a row may keep more than asked) and a row never keeps more than its real tokens.
    Ranking: protected first, then by importance (NaN lowest), ties to the earlier token.
    """
    scores = cumulative_importance
    length = scores.shape[-1]
    lead = scores.shape[:-1]
    device = scores.device
    valid = torch.ones(scores.shape, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    valid = valid.expand(scores.shape)
    if protected is None:
        protected = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    protected = protected.to(torch.bool).expand(scores.shape) & valid
    counts = torch.as_tensor(n_keep, dtype=torch.long, device=device).expand(lead)
    counts = torch.maximum(torch.minimum(counts, valid.sum(-1)), protected.sum(-1))
    width = int(counts.max()) if counts.numel() else 0
    positions = torch.arange(length, device=device)
    if width == length and bool((counts == length).all()):
        # keep everything: the identity, so the pruned path is bit-identical to dense
        index = positions.expand(*lead, length).clone()
        return TokenKeep(index, torch.ones(index.shape, dtype=torch.bool, device=device))

    # rank = protected, then valid, then importance (descending), then position (ascending)
    priority = protected.to(torch.int8) * 2 + valid.to(torch.int8)
    ranking = _rank_descending(scores.nan_to_num(nan=float("-inf")), priority)
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    selected.scatter_(-1, ranking, positions < counts.unsqueeze(-1))
    # kept tokens in original order first, then the pruned ones as filler (stable sort keeps order)
    index = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[..., :width]
    mask = positions[:width] < counts.unsqueeze(-1)
    return TokenKeep(index, mask)


def last_real_token(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, ...) each row's last real token. Left padding puts it in the last column; after token pruning
    a row's survivors are packed in original order with padding after them (``select_tokens_to_keep``),
    so a row that keeps fewer than the widest one ends before the last column."""
    if mask is None:
        return hidden[:, -1:]
    columns = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, columns, -1).amax(-1).clamp_min(0)
    return gather_tokens(hidden, last[:, None])


def gather_tokens(tensor: torch.Tensor, keep_index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather the kept tokens along ``dim``.

    tensor: (B, L, ...) for ``dim=1`` (hidden states, masks, position ids, cumulative importance), or
    e.g. (B, H, L, D) K/V with ``dim=2``. keep_index: (B, Lkeep), or with more leading dims that match
    the tensor's first dims (e.g. (B, H, Lkeep) per head); it broadcasts over the dims it lacks before
    ``dim``. Returns the tensor with ``dim`` of size Lkeep.
    """
    dim = dim % tensor.ndim
    n_lead = keep_index.ndim - 1
    if n_lead > dim:
        raise ValueError(f"keep_index has {n_lead} leading dims but tokens are on dim {dim}")
    width = keep_index.shape[-1]
    view = [*keep_index.shape[:-1], *([1] * (dim - n_lead)), width, *([1] * (tensor.ndim - dim - 1))]
    target = [*tensor.shape[:dim], width, *tensor.shape[dim + 1 :]]
    return torch.gather(tensor, dim, keep_index.reshape(view).expand(target))


def edge_token_mask(valid: torch.Tensor, first: int = 0, last: int = 0) -> torch.Tensor:
    """Mark the first ``first`` and the last ``last`` real tokens of each row (valid: (..., L) bool).

    For [CLS] (``first=1``), the last prompt token of a decoder (``last=1``), attention sinks and the
    recent window. Works for right- and left-padded rows, and on compacted rows (kept in order).
    """
    valid = valid.to(torch.bool)
    rank = valid.long().cumsum(-1) - 1  # position among the row's real tokens
    n_valid = valid.sum(-1, keepdim=True)
    return valid & ((rank < first) | (rank >= n_valid - last))


def _rank_descending(scores: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Positions of each row ordered by (priority desc, score desc, position asc).

    The one place that ranks; the Alg. 3 top-k engine (prune/topk.py) can replace it for a scalar k.
    Two stable sorts: by score, then by priority, so earlier positions win every tie.
    """
    by_score = torch.argsort(scores, dim=-1, descending=True, stable=True)
    by_priority = torch.argsort(priority.gather(-1, by_score), dim=-1, descending=True, stable=True)
    return by_score.gather(-1, by_priority)

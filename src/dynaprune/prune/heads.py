"""Cascade head pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-B and Algorithm 2).

A head's importance is the sum of the magnitudes of its attention output, |attention_out|, over its
queries and features, accumulated across layers: the output projection mixes the concatenated heads,
so a head with small outputs barely moves the block's output. The heads with the smallest cumulative
importance are pruned, and a pruned head never comes back in later layers.

Grouped-query attention: ``group_size`` query heads share one KV head. With ``group_size=1`` query
heads are pruned one by one (``head_unit=query``); with ``group_size = n_heads // n_kv_heads`` whole
KV groups are pruned, ranked by the summed importance of their query heads (``head_unit=kv``), which
is what removes K/V projection work and KV-cache bytes.

As for tokens, the cumulative importance stays aligned with the heads still alive: after a selection,
gather it with the same index (:func:`gather_heads`) so a pruned head can never be picked again.
"""

from __future__ import annotations

import torch

from dynaprune.prune.tokens import gather_tokens


def accumulate_head_importance(
    cumulative: torch.Tensor | None,
    head_outputs: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add sum |attention_out| per head (Alg. 2, second loop) to the cumulative head importance.

    cumulative: (B, H) per input, or (H,) one score shared by the whole batch (then the batch is
    summed too, for a batch-wide head choice); None starts a (B, H) score from zero.
    head_outputs: (B, H, L, D) per-head attention outputs before the output projection.
    token_mask: (B, L) bool, True for real query tokens; padding rows are not counted.
    """
    magnitude = head_outputs.abs()
    if token_mask is not None:
        magnitude = magnitude.masked_fill(~token_mask[:, None, :, None].to(torch.bool), 0.0)
    acc_dtype = torch.promote_types(head_outputs.dtype, torch.float32)
    per_input = magnitude.sum(dim=(2, 3), dtype=acc_dtype)
    if cumulative is None:
        return per_input
    if cumulative.ndim == 1:
        return cumulative.to(acc_dtype) + per_input.sum(0)
    return cumulative.to(acc_dtype) + per_input


def select_heads_to_keep(importance: torch.Tensor, n_keep: int, group_size: int = 1) -> torch.Tensor:
    """Indices of the query heads to keep, increasing, for each input (Alg. 2, ``top-k(s_h, ...)``).

    importance: (..., H) cumulative head importance, (H,) or (B, H).
    n_keep: units to keep: query heads if ``group_size == 1``, else KV groups of ``group_size``
    consecutive query heads (query head h belongs to group h // group_size).
    Returns (..., n_keep * group_size) LongTensor of query-head indices; ties go to the earlier head.
    """
    n_heads = importance.shape[-1]
    if group_size < 1 or n_heads % group_size:
        raise ValueError(f"{n_heads} heads cannot be split into groups of {group_size}")
    n_units = n_heads // group_size
    if not 1 <= n_keep <= n_units:
        raise ValueError(f"n_keep={n_keep} must be in 1..{n_units}")
    lead = importance.shape[:-1]
    if n_keep == n_units:
        return torch.arange(n_heads, device=importance.device).expand(*lead, n_heads).clone()
    unit_importance = importance.unflatten(-1, (n_units, group_size)).sum(-1)
    order = torch.argsort(unit_importance.nan_to_num(nan=float("-inf")), dim=-1, descending=True, stable=True)
    kept_units = order[..., :n_keep].sort(dim=-1).values
    offsets = torch.arange(group_size, device=importance.device)
    return (kept_units.unsqueeze(-1) * group_size + offsets).flatten(-2)


def gather_heads(tensor: torch.Tensor, head_index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Keep the selected heads of ``tensor`` along ``dim`` (e.g. Q, K, V or outputs (B, H, L, D),
    or the cumulative importance (B, H) / (H,)); ``head_index`` is (Hk,) or (B, Hk)."""
    if head_index.ndim == 1:
        return tensor.index_select(dim, head_index)
    return gather_tokens(tensor, head_index, dim=dim)


def kv_groups_needed(query_heads: torch.Tensor, n_kv_heads: int, group_size: int) -> torch.Tensor:
    """(..., n_kv_heads) bool: which KV groups still serve at least one kept query head.

    After query-head pruning a KV group's K and V must still be fetched while any of its query heads
    is alive; only groups marked False here save KV bytes.
    """
    needed = torch.zeros(*query_heads.shape[:-1], n_kv_heads, dtype=torch.bool, device=query_heads.device)
    return needed.scatter(-1, query_heads // group_size, True)

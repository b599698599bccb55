"""Local value pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-C).

After the softmax, each head and query keeps only the V rows with the largest attention probabilities:
"a pre-defined ratio of V vectors with the smallest attention probabilities are pruned and will not be
fetched for the attention_prob x V computation". The decision uses the current head's probabilities
only, and nothing is removed for other heads or layers (unlike cascade token pruning).

Following the paper, the kept probabilities are NOT renormalized: the small products are just skipped,
so the output is ``sum over kept rows of p_i * v_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynaprune.prune.keys import keep_counts


class LocalValueResult(NamedTuple):
    """Output of local value pruning with its work counts (Python ints), over the real query rows."""

    output: torch.Tensor  # (B, H, Lq, D)
    v_rows_used: int  # (head, query, V row) products computed: PV work in rows of D MACs
    v_rows_fetched: int  # distinct V rows each head fetches: kept by at least one query (the union)
    v_rows_dense: int  # (head, query, V row) products of dense attention over the visible keys
    v_rows_fetched_dense: int  # distinct V rows each head fetches dense: visible to at least one query
    fetched: torch.Tensor  # (B, H, Lk) bool: the V rows fetched


def local_value_mask(probs: torch.Tensor, keep_fraction: float, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: True for the V rows each head and query keeps.

    probs: (B, H, Lq, Lk) attention probabilities. key_mask: bool, broadcastable to probs, True for
    the keys a query can see (padding and causal masks); default all visible. Each row keeps
    ``keep_count(keep_fraction, n_visible)`` of its visible keys, the most probable ones, ties to the
    earlier key; a row with no visible key keeps nothing.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    visible = (
        torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
        if key_mask is None
        else key_mask.to(torch.bool).expand(probs.shape)
    )
    if keep_fraction == 1.0:
        return visible.clone()
    counts = keep_counts(keep_fraction, visible.sum(-1))
    scores = probs.masked_fill(~visible, float("-inf")).nan_to_num(nan=float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    return torch.zeros_like(visible).scatter(-1, order, positions < counts.unsqueeze(-1))


def local_value_attention(
    probs: torch.Tensor,
    v: torch.Tensor,
    keep_fraction: float,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> LocalValueResult:
    """``probs @ v`` with only the kept V rows of each head and query, not renormalized.

    probs: (B, H, Lq, Lk); v: (B, Hkv, Lk, D) with H a multiple of Hkv (GQA groups are repeated,
    and counted per query head). ``keep_fraction == 1`` is exactly ``probs @ v``. query_mask (B, Lq):
    True for the real queries, the only rows counted (padding rows are computed but need no fetch).
    A V row is fetched once per head for all the queries of the call (they share the fetch), so the
    bytes a head reads are the union of its queries' kept rows, not their sum.
    """
    n_heads, n_kv_heads = probs.shape[1], v.shape[1]
    if n_heads != n_kv_heads:
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    keep = local_value_mask(probs, keep_fraction, key_mask)
    if keep_fraction == 1.0:
        output = probs @ v
    else:
        output = probs.masked_fill(~keep, 0.0) @ v
    visible = (torch.ones(probs.shape, dtype=torch.bool, device=probs.device) if key_mask is None
               else key_mask.to(torch.bool).expand(probs.shape))
    if query_mask is not None:
        real = query_mask.to(device=probs.device, dtype=torch.bool)[:, None, :, None]
        keep, visible = keep & real, visible & real
    fetched = keep.any(dim=-2)
    return LocalValueResult(
        output=output,
        v_rows_used=int(keep.sum()),
        v_rows_fetched=int(fetched.sum()),
        v_rows_dense=int(visible.sum()),
        v_rows_fetched_dense=int(visible.any(dim=-2).sum()),
        fetched=fetched,
    )

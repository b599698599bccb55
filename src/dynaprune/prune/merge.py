"""Token merging: the math of ``token_policy=merge`` (ToMe, Bolya et al., "Token Merging: Your ViT but
Faster", ICLR 2023, Sec. 3), applied to the tokens cascade token pruning removes.

ToMe's ingredients, as we use them:

- similarity: the cosine similarity of the tokens' keys averaged over heads (Sec. 3, "Token
  similarity": the keys already summarise what each token contains);
- merging: a merged state is the size-weighted mean of the tokens it stands for, and sizes add up
  (sizes start at 1, so a size counts original tokens);
- proportional attention: ``softmax(q k^T / sqrt(d) + log s)`` with ``s`` the size of each key (Sec. 3,
  "Tracking token size"), so a merged token of size s gets the attention s identical copies would.

With ``token_policy=merge`` which tokens disappear is decided elsewhere (SpAtten's cumulative
importance, ``prune/tokens.py``), so the kept set is exactly the one token dropping keeps. With
``token_policy=tome`` they are chosen by ToMe's bipartite soft matching (Sec. 3, "Bipartite Soft
Matching", :func:`bipartite_importance`): the most redundant tokens go, not the least attended (which
in a BERT are the content words: attention piles up on [CLS], [SEP] and punctuation). Either way each
pruned token is merged into its most similar *kept* token. Pure functions on tensors; the run-time
wiring is ``prune/techniques/token_cascade.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Merged(NamedTuple):
    """The result of one merge step, aligned with the kept tokens (width of the selection's index).

    hidden: (B, Lkeep, d) size-weighted means; a kept token nothing merged into is its state, untouched.
    sizes: (B, Lkeep) original tokens each kept entry stands for (0 at filler entries of the selection).
    dest: (B, L) for every token before the step, the kept entry that now holds it (padding: any entry).
    pruned: (B, L) the real tokens merged away in this step.
    """

    hidden: torch.Tensor
    sizes: torch.Tensor
    dest: torch.Tensor
    pruned: torch.Tensor


def key_metric(keys: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, L, D) -> (B, L, D): averaged over heads and scaled to unit length (ToMe's metric)."""
    metric = keys.mean(dim=1)
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` (B, L, d) at ``index`` (B, K) -> (B, K, d): the same numbers as ``torch.gather`` along dim 1,
    as one ``index_select`` of whole rows of the flattened (B L, d) tensor (a row copy, not an index per
    number: several times faster for hidden states)."""
    B, L, d = t.shape
    flat = (index + torch.arange(B, device=index.device)[:, None] * L).reshape(-1)
    return t.reshape(B * L, d).index_select(0, flat).view(B, index.shape[1], d)


def _first(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) indices: each row's True entries of ``mask`` (B, L) first, in order, then its False ones
    in order (so the entries of a row are distinct)."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]


def merge_into_kept(hidden: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, keep_index: torch.Tensor,
                    keep_mask: torch.Tensor, valid: torch.Tensor) -> Merged:
    """Merge every real token the selection drops into its most similar kept token.

    hidden (B, L, d), sizes (B, L), metric (B, L, D) unit keys (:func:`key_metric`), valid (B, L) real
    tokens; ``keep_index`` / ``keep_mask`` (B, Lkeep) as ``select_tokens_to_keep`` returns them (kept
    tokens first, in order; filler entries masked). Most similar = the largest cosine similarity among
    the row's kept tokens, ties to the earlier kept token. A kept token's new state is
    ``sum(s_i h_i) / sum(s_i)`` over itself and the tokens merged into it.

    Cost: the kept states are copied once (as dropping copies them); only the pruned tokens (P per row)
    and the kept tokens they join (at most P) are compared, weighted and divided, then written back.
    """
    B, L, d = hidden.shape
    valid = valid.to(torch.bool)
    slots = torch.arange(keep_index.shape[1], device=hidden.device).expand_as(keep_index)
    kept = torch.zeros_like(valid).scatter(1, keep_index, keep_mask)
    pruned = valid & ~kept
    # Only the pruned rows are compared and scattered (the kept ones stay in their own slot): each row's
    # pruned tokens first, in order, padded to the widest row; ``pruned_real`` marks the real entries.
    pruned_index = _first(pruned, int(pruned.sum(-1).max()))
    pruned_real = torch.gather(pruned, 1, pruned_index)
    # own slot of each kept token (the inverse of keep_index on its kept entries)
    own = torch.zeros(B, L, dtype=torch.long, device=hidden.device).scatter(1, keep_index, slots)
    similarity = _rows(metric, pruned_index) @ _rows(metric, keep_index).transpose(1, 2)  # (B, P, Lkeep)
    if not bool(keep_mask.all()):
        similarity = similarity.masked_fill(~keep_mask[:, None, :], float("-inf"))
    nearest = similarity.argmax(dim=-1)  # the first of equal maxima: ties to the earlier kept token
    nearest = torch.where(pruned_real, nearest, torch.gather(own, 1, pruned_index))  # padding entries: as is
    dest = own.scatter(1, pruned_index, nearest)
    weight = sizes.to(hidden.dtype) * valid.to(hidden.dtype)
    merged = _rows(hidden, keep_index)  # untouched kept tokens stay bit-identical (s h / s need not be h)
    kept_sizes = torch.gather(weight, 1, keep_index) * keep_mask.to(weight.dtype)
    pruned_weight = torch.gather(weight, 1, pruned_index) * pruned_real.to(weight.dtype)
    new_sizes = kept_sizes.scatter_add(1, nearest, pruned_weight)
    grown = torch.zeros(B, keep_index.shape[1], dtype=torch.long, device=hidden.device)
    grown = grown.scatter_add_(1, nearest, pruned_real.long()) > 0
    n_grown = int(grown.sum(-1).max())
    if n_grown == 0:
        return Merged(merged, new_sizes * keep_mask, dest, pruned)
    # The kept tokens something joined, compacted (B, G): grown slots first; a row's spare entries hold
    # untouched slots (distinct ones), written back as they are. Each pruned token adds into its
    # destination's compact entry; padding entries into a spare last column that is thrown away.
    grown_index = _first(grown, n_grown)
    grown_real = torch.gather(grown, 1, grown_index)
    compact = grown.long().cumsum(-1) - 1
    target = torch.where(pruned_real, torch.gather(compact, 1, nearest), n_grown)
    before = _rows(merged, grown_index)
    total = torch.empty(B, n_grown + 1, d, dtype=hidden.dtype, device=hidden.device)
    torch.mul(before, torch.gather(kept_sizes, 1, grown_index)[..., None], out=total[:, :n_grown])
    total[:, n_grown] = 0
    total.scatter_add_(1, target[..., None].expand(-1, -1, d),
                       _rows(hidden, pruned_index) * pruned_weight[..., None])
    after = total[:, :n_grown] / torch.gather(new_sizes, 1, grown_index).clamp_min(1e-12)[..., None]
    after = torch.where(grown_real[..., None], after, before)
    flat = (grown_index + torch.arange(B, device=hidden.device)[:, None] * merged.shape[1]).reshape(-1)
    merged.view(-1, d).index_copy_(0, flat, after.reshape(-1, d))
    return Merged(merged, new_sizes * keep_mask, dest, pruned)


def merge_flops(pruned: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor, heads: int, head_dim: int,
                hidden: int) -> int:
    """FLOPs of one merge step, per row summed (multiply-add = 2): the metric (head mean and
    normalisation of every real token, ``L D (H + 3)``), the similarity of each pruned token with each
    kept one and its argmax (``P K (2 D + 1)``) and the size-weighted merge (scale, add, divide:
    ``2 d (P + K)``). ``pruned`` / ``kept`` / ``valid``: (B, L) bool, or counts per row."""
    n_pruned, n_kept, n_valid = (t.sum(-1).long() if t.dtype == torch.bool else t.long()
                                 for t in (pruned, kept, valid))
    flops = (n_valid * head_dim * (heads + 3) + n_pruned * n_kept * (2 * head_dim + 1)
             + 2 * hidden * (n_pruned + n_kept))
    return int(flops.sum())


def bipartite_importance(metric: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """ToMe's bipartite soft matching as an importance for ``select_tokens_to_keep`` (keep the highest).

    metric (B, L, D) unit keys (:func:`key_metric`), valid / protected (B, L) bool. The real tokens that
    are not protected alternate between set A (even rank) and set B (odd rank); protected tokens
    ([CLS], [SEP]) join B. Each A token scores ``-max cos(a, b)`` over the row's B tokens, so keeping the
    top-n drops the A tokens with the closest match first (ToMe merges the r most similar edges);
    B tokens score 2 (above any A token: at most |A| tokens leave per step unless more are asked for).
    Padding scores -inf.
    """
    valid = valid.to(torch.bool)
    free = valid & ~protected.to(torch.bool)
    rank = free.long().cumsum(-1) - 1
    in_a = free & (rank % 2 == 0)
    in_b = valid & ~in_a
    similarity = metric @ metric.transpose(1, 2)  # (B, L, L)
    similarity = similarity.masked_fill(~in_b[:, None, :], float("-inf"))
    best = similarity.max(dim=-1).values  # -inf for a row without any B token
    scores = torch.where(in_a, -best, torch.full_like(best, 2.0))
    return scores.masked_fill(~valid, float("-inf"))


def bipartite_flops(valid: torch.Tensor, protected: torch.Tensor, head_dim: int) -> int:
    """FLOPs of :func:`bipartite_importance`: every A x B cosine and its max, ``|A| |B| (2 D + 1)`` per row."""
    free = valid.to(torch.bool) & ~protected.to(torch.bool)
    n_a = (free.long().sum(-1) + 1) // 2
    n_b = valid.long().sum(-1) - n_a
    return int((n_a * n_b * (2 * head_dim + 1)).sum())


def proportional_probs(probs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``softmax(x + log s)`` from ``p = softmax(x)`` (B, H, Lq, Lk) and key sizes (B, Lk): ``p s / sum(p s)``
    (the same function; for paths that produce probabilities rather than logits). Rows of 0 stay 0."""
    weighted = probs * sizes[:, None, None, :].to(probs.dtype)
    return weighted / weighted.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log s`` per key (B, Lk) for the attention logits; entries of size 0 (filler, masked anyway) get 0."""
    return sizes.clamp_min(1).log().to(dtype)

"""Baselines to compare SpAtten's cascade token ranking against (``score=...`` in the recipe).

- streaming (StreamingLLM, Xiao et al. 2023): keep the first ``sink`` tokens and a recent window;
  no scores at all.
- h2o (Heavy-Hitter Oracle, Zhang et al. 2023): attention received, accumulated per layer and per head
  over decode steps, no cascade across layers; keep heavy hitters plus the recent window.
- random: uniform choice among the unprotected tokens, a floor any scorer should beat. One draw says
  little, so an evaluation runs it once per seed in ``RANDOM_SEEDS`` and reports mean and spread.
- instant (PoWER-BERT style, Goyal et al. 2020): one layer's probabilities only, no accumulation.
- static heads (Michel et al. 2019, the paper's [5]): head importance measured once on calibration
  data and the same heads pruned for every input, against SpAtten's per-input head choice.

All selections go through :func:`dynaprune.prune.tokens.select_tokens_to_keep`, so protection, padding
and tie rules are the same as SpAtten's. The SpAtten KV budget itself (``score=spatten`` with ``kv``)
is :func:`budget_keep` on the cascade's cumulative importance.
"""

from __future__ import annotations

import torch

from dynaprune.prune.keys import keep_count
from dynaprune.prune.tokens import (
    TokenKeep,
    accumulate_token_importance,
    edge_token_mask,
    select_tokens_to_keep,
)

RANDOM_SEEDS = (0, 1, 2)  # the seeds a random baseline is evaluated under (issue 12 item 10)


def budget_keep(
    importance: torch.Tensor,
    budget: int,
    sink: int = 0,
    recent: int = 0,
    valid: torch.Tensor | None = None,
) -> TokenKeep:
    """Keep ``budget`` tokens per row: the first ``sink`` and last ``recent`` real tokens, then the
    most important (importance: (..., L); e.g. (B, L) SpAtten/instant, (B, H, L) H2O per head)."""
    if sink + recent > budget:
        raise ValueError(f"sink + recent = {sink + recent} exceed the budget of {budget}")
    if valid is None:
        valid = torch.ones(importance.shape, dtype=torch.bool, device=importance.device)
    protected = edge_token_mask(valid.expand(importance.shape), first=sink, last=recent)
    return select_tokens_to_keep(importance, budget, protected, valid)


def streaming_keep(seq_len: int, budget: int, sink: int, recent: int | None = None) -> torch.Tensor:
    """Indices kept by StreamingLLM: the first ``sink`` tokens and the last ``budget - sink``.

    The recent window is whatever the budget leaves after the sinks; ``recent``, when given, is the
    window the caller asked for and must fit. Returns (min(budget, seq_len),) increasing.
    """
    if not 0 <= sink <= budget:
        raise ValueError(f"sink={sink} must be in 0..budget={budget}")
    if recent is not None and sink + recent > budget:
        raise ValueError(f"sink + recent = {sink + recent} exceed the budget of {budget}")
    if seq_len <= budget:
        return torch.arange(seq_len)
    window = budget - sink
    return torch.cat([torch.arange(sink), torch.arange(seq_len - window, seq_len)])


def h2o_accumulate(
    cumulative: torch.Tensor | None,
    probs: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """H2O scores of ONE layer: attention each key receives, summed over queries (and decode steps),
    kept per head; (B, H, L). Keep one such score per layer (no cascade across layers) and pass it
    to :func:`budget_keep`, whose selection is then per head (index (B, H, budget), K/V ``dim=2``)."""
    acc_dtype = torch.promote_types(probs.dtype, torch.float32)
    if query_mask is not None:
        probs = probs.masked_fill(~query_mask[:, None, :, None].to(torch.bool), 0.0)
    received = probs.sum(dim=2, dtype=acc_dtype)
    if key_mask is not None:
        received = received.masked_fill(~key_mask[:, None, :].to(torch.bool), 0.0)
    if cumulative is None:
        return received
    missing = received.shape[-1] - cumulative.shape[-1]
    if missing < 0:
        raise ValueError(f"cumulative has {cumulative.shape[-1]} tokens but probs only {received.shape[-1]}")
    # decode step: newly appended keys start with no history
    return torch.nn.functional.pad(cumulative.to(acc_dtype), (0, missing)) + received


def instant_importance(
    probs: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PoWER-BERT style significance: attention received in this layer only, over heads and queries."""
    return accumulate_token_importance(None, probs, key_mask, query_mask=query_mask)


def random_keep(
    seq_len: int,
    budget: int,
    generator: torch.Generator | None = None,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """``budget`` token indices drawn uniformly without replacement, protected tokens always in
    (so more are kept if they outnumber the budget); (min(..), ) increasing."""
    scores = torch.rand(seq_len, generator=generator)
    return select_tokens_to_keep(scores, budget, protected).index


def static_heads_to_keep(calibration_importance: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Heads kept in every layer for every input, chosen once from calibration data.

    calibration_importance: (n_layers, H), e.g. :func:`dynaprune.prune.heads.accumulate_head_importance`
    with a shared (H,) score per layer summed over a calibration set. Keeps ``keep_count(keep_fraction,
    H)`` heads per layer, the most important, ties to the earlier head. Returns (n_layers, Hkeep)
    increasing.
    """
    n_keep = keep_count(keep_fraction, calibration_importance.shape[-1])
    return select_tokens_to_keep(calibration_importance, n_keep).index

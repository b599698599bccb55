"""GemFilter (Shi et al. 2024, Sec. 3, Algorithm 1): an early layer's attention picks the prompt tokens,
then the whole model runs on those tokens only.

Pass 1 runs layers 0 .. s-1 on the whole prompt (SDPA's fused kernel) and, in layer s, only the
attention of the last ``window`` queries (``prune/window.py``, max-pooled as SnapKV does); it stops
there. The ``keep`` share of the prompt with the highest window attention survives, with the first
``sinks`` tokens and the window itself. Pass 2 is a plain forward of the survivors at their original
positions into the KV cache, so every layer's cache holds the selected tokens only (the tokens that
layer computed). It drives the model twice, so it lives here, above the models, not in a recipe stage.
A sliding-window selection layer (Gemma 3) scores each observation query over its own window only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune import keys as K
from dynaprune.prune.tokens import edge_token_mask, select_tokens_to_keep
from dynaprune.prune.window import pool_scores, window_attention
from dynaprune.runtime.attention import RunContext


@dataclass(frozen=True)
class GemFilter:
    """Selection layer ``layer``, share of the prompt kept ``keep``, observation ``window``, ``sinks``
    always kept, max-pool ``pool`` (odd)."""

    layer: int
    keep: float
    window: int = 32
    sinks: int = 4
    pool: int = 7

    def check(self, n_layers: int, prompt_len: int) -> None:
        if not 0 <= self.layer < n_layers:
            raise DynapruneError(f"gemfilter layer: selection layer {self.layer} is outside the model "
                                 f"(layers 0..{n_layers - 1})")
        if not 0.0 < self.keep <= 1.0:
            raise DynapruneError(f"gemfilter keep: must be in (0, 1], got {self.keep}")
        if not 1 <= self.window <= prompt_len:
            raise DynapruneError(f"gemfilter window: {self.window} must be in 1..{prompt_len} (the prompt)")
        if self.sinks < 0 or self.sinks + self.window > prompt_len:
            raise DynapruneError(f"gemfilter sinks: the prompt ({prompt_len} tokens) is shorter than sinks + "
                                 f"window ({self.sinks} + {self.window})")


class _Selected(Exception):  # noqa: N818 - control flow: pass 1 stops at the selection layer
    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores


class SelectionPass(RunContext):
    """Dense layers before the selection layer; at it, the window attention only, then stop."""

    def __init__(self, g: GemFilter) -> None:
        super().__init__()
        self.g = g

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        if layer == self.g.layer:
            scores = observation_attention(q, k, self.g.window, scale, window).sum(1)
            raise _Selected(pool_scores(scores, self.g.pool))
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window=window)


def observation_attention(q: torch.Tensor, k: torch.Tensor, n: int, scale: float | None,
                          sliding: int | None) -> torch.Tensor:
    """(B, Hq, Lk): the attention of the last ``n`` queries, summed over them (``prune/window.py``); in a
    sliding-window layer (Gemma 3) each of those queries sees only its ``sliding`` latest keys, as the
    layer itself does, so each is one call of ``window_attention`` with the older keys masked."""
    if sliding is None:
        return window_attention(q, k, n, scale=scale)
    B, _, lq, _ = q.shape
    lk = k.shape[2]
    out = torch.zeros(B, q.shape[1], lk, dtype=torch.float32, device=q.device)
    for i in range(n):  # query lq - 1 - i sits at key lk - 1 - i
        end = lk - i
        inside = (torch.arange(end, device=q.device) > end - 1 - sliding).expand(B, end)
        out[..., :end] += window_attention(q[:, :, :lq - i], k[:, :, :end], 1, scale=scale, key_padding_mask=inside)
    return out


def gemfilter_select(model: Any, input_ids: torch.Tensor, g: GemFilter,
                     pass_ctx: SelectionPass | None = None) -> torch.Tensor:
    """(B, n_keep) original positions of the tokens GemFilter keeps, ascending (pass 1; ``pass_ctx``
    runs it, e.g. to read its work counter afterwards)."""
    B, L = input_ids.shape
    g.check(model.config.layers, L)
    try:
        model(input_ids, ctx=pass_ctx or SelectionPass(g), last_only=True)
    except _Selected as found:
        scores = found.scores
    else:  # pragma: no cover - the selection layer always runs
        raise AssertionError("selection layer not reached")
    valid = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
    protected = edge_token_mask(valid, first=g.sinks, last=g.window)
    return select_tokens_to_keep(scores, K.keep_count(g.keep, L), protected, valid).index


def gemfilter_prefill(model: Any, input_ids: torch.Tensor, cache: Any, g: GemFilter,
                      ctx: RunContext | None = None) -> torch.Tensor:
    """Prefill ``input_ids`` (B, L), no padding, into ``cache`` the GemFilter way; the logits (B, 1, V)
    of the last prompt token (always kept). ``ctx`` runs pass 2 (e.g. to count its work)."""
    index = gemfilter_select(model, input_ids, g)
    return model(torch.gather(input_ids, 1, index), positions=index, cache=cache, ctx=ctx, last_only=True)


class GemFilterModel:
    """``model`` whose prompt forwards (into a fresh cache, ``last_only``) are GemFilter prefills; every
    other call (decode steps, teacher-forced continuations) goes to the model as it is. For evaluation
    protocols that only call ``model(...)`` (``eval.lm``'s ``continue``)."""

    def __init__(self, model: Any, g: GemFilter) -> None:
        self.model, self.g = model, g

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, input_ids, *, cache=None, ctx=None, last_only=False, **kwargs):
        fresh = cache is not None and not kwargs and bool((cache.next_position == 0).all())
        if fresh and last_only:
            return gemfilter_prefill(self.model, input_ids, cache, self.g, ctx)
        return self.model(input_ids, cache=cache, ctx=ctx, last_only=last_only, **kwargs)

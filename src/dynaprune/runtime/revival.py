"""Revival of pruned prompt tokens after the first token (LazyLLM, Fu et al. 2024, Sec. 3.3-3.4).

A prefill selection with ``prefill_revive=R`` (``prune/techniques/prefill_window.py``) keeps, in an aux
cache, the hidden states that the next R of the prompt (by the selection's window score) had when they
were pruned at selection layer s. LazyLLM keeps pruned tokens revivable so that later steps can use them
without recomputing layers 0 .. s; here the revival runs once, after the first token: the revived tokens
go through layers s+1 .. end as one chunk, each query causal by ORIGINAL position (it sees the cached
survivors and revived tokens at positions <= its own, never a later prompt token), and their K/V are
appended to every later layer's cache. The continuation then reads them as if they had been computed.

The time to first token is the pruned prefill's; the revival is deferred work, counted by its own
``RunContext`` (``revive`` returns it) and reported apart. Llama-family blocks only (the block call
signature of ``models/llama.py``); a sliding-window model is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.masks import SlidingWindow

_NO_WINDOW = 1 << 62  # a "window" wider than any prompt: only the causal-by-position half of the mask


class PositionCausal(RunContext):
    """Dense attention where each query sees the cached keys at original positions <= its own."""

    def __init__(self, positions: torch.Tensor, cache: Any) -> None:
        super().__init__()
        self.q_pos, self.kv_cache = positions, cache

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        k_pos = self.kv_cache.cached_positions(layer)
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale,
                              window=SlidingWindow(_NO_WINDOW, self.q_pos, k_pos))


def pending_revival(ctx: Any):
    """The prefill stage of ``ctx`` holding an aux cache (or None)."""
    for stage in getattr(ctx, "stages", ()):
        if getattr(stage, "revival", None) is not None:
            return stage
    return None


def revive(model: Any, cache: Any, ctx: Any) -> RunContext | None:
    """Run the aux cache of ``ctx``'s prefill stage through the later layers into ``cache``; the
    revival's own work counter (None: nothing to revive)."""
    stage = pending_revival(ctx)
    if stage is None:
        return None
    if getattr(model.config, "sliding_window", None) is not None:
        raise DynapruneError("recipe key 'prefill_revive': revival supports full-attention decoders only")
    aux = stage.take_revival()
    if aux.positions.shape[1] == 0:
        return None
    return run_later_layers(model, cache, aux.layer, aux.hidden, aux.positions)


def run_later_layers(model: Any, cache: Any, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                     run: PositionCausal | None = None) -> PositionCausal:
    """Hidden states (B, R, d) of pruned tokens after ``layer``, at original ``positions`` (B, R), through
    layers ``layer + 1 ..`` into ``cache`` (each query causal by original position); the work counter
    (``run``'s, when given: its counts accumulate)."""
    x, pos = hidden, positions
    cos_t, sin_t = model.rope_tables(int(pos.max()) + 1, x.device)
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
    if run is None:
        run = PositionCausal(pos, cache)
    else:
        run.q_pos, run.kv_cache = pos, cache
    for i in range(layer + 1, model.config.layers):
        x = model.layers[i](x, cos, sin, i, pos, None, cache, run)
    return run


class RevivalModel:
    """``model`` whose prompt forwards (into a fresh cache, ``last_only``) revive the aux cache right
    after the first token's logits; every other call goes to the model as it is. ``last_revival`` holds
    the work counter of the latest revival. For protocols that only call ``model(...)`` (``eval.lm``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.last_revival: RunContext | None = None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, input_ids, *, cache=None, ctx=None, last_only=False, **kwargs):
        out = self.model(input_ids, cache=cache, ctx=ctx, last_only=last_only, **kwargs)
        if cache is not None and ctx is not None and pending_revival(ctx) is not None:
            self.last_revival = revive(self.model, cache, ctx)
        return out

"""On-demand revival of pruned prompt tokens during decoding (LazyLLM, Fu et al. 2024, Sec. 3.3-3.4).

A prefill selection at layer s (``prefill_keep``, ``prune/techniques/prefill_window.py``) with
``prefill_revive = 1 - prefill_keep`` keeps every pruned token's hidden state after layer s in an aux
cache. ``runtime/revival.py`` revives a fixed share of them once, after the first token. Here they come
back ON DEMAND, as LazyLLM does: layers 0 .. s hold every prompt token's K/V, so at each decode step the
new token's attention at layer s scores the pruned tokens; the (at most ``per_step``) highest not yet
revived, whose attention (mean over the query heads) reaches ``threshold``, run from their aux-cache
state through layers s+1 .. end (``run_later_layers``: causal by ORIGINAL position, so a revived token
sees the survivors and the tokens revived so far at positions <= its own, never a continuation token)
and their K/V join the later layers' caches BEFORE the step's own later layers run, so the token that
asked for them reads them. ``budget`` caps the share of the pruned tokens ever revived.

Every token is computed at most once per layer (survivors in the prefill, a revived token once), so
prefill + revival work stays <= the dense prefill's; the time to first token is the pruned prefill's,
the revival is deferred work spread over the decode steps (its own work counter, ``revival_work``).

Decode steps run one token at a time (a multi-token forward after the prompt is refused: the score of
one query decides what the next reads), dense, batch 1, Llama-family full-attention decoders only.
``pool`` (odd) max-pools the layer-s attention along the prompt before ranking (SnapKV's clustering,
as the prefill selection's window score does): a pruned neighbour of an attended token comes back too.

Revived out of position order, a token misses the pruned tokens at earlier positions that come back
after it (each is computed once): its later-layer K/V saw less than the one-shot revival's.
``order="position"`` drops the score and revives the earliest ``per_step`` not yet revived each step:
a one-shot revival spread over the first decode steps, which ends with the one-shot revival's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.window import pool_scores
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.revival import PositionCausal, pending_revival, run_later_layers
from dynaprune.runtime.work import WorkCounter

ORDERS = ("score", "position")


@dataclass(frozen=True)
class OnDemand:
    """Knobs of the on-demand revival: at most ``per_step`` tokens a decode step, those whose layer-s
    attention (mean over query heads, after a max-pool of ``pool`` tokens) is >= ``threshold``, and at
    most ``budget`` of the pruned tokens in all. ``order="position"``: no score, the earliest ``per_step``
    not yet revived each step (a one-shot revival spread over the first decode steps: once done, every
    revived token saw what the one-shot revival shows it)."""

    per_step: int = 16
    threshold: float = 0.0
    budget: float = 1.0
    pool: int = 1
    order: str = "score"

    def __post_init__(self) -> None:
        if self.per_step < 0:
            raise DynapruneError(f"on-demand revival: per_step must be >= 0 (got {self.per_step})")
        if not 0.0 <= self.budget <= 1.0:
            raise DynapruneError(f"on-demand revival: budget must be in [0, 1] (got {self.budget})")
        if not 0.0 <= self.threshold <= 1.0:
            raise DynapruneError(f"on-demand revival: threshold must be in [0, 1] (got {self.threshold})")
        if self.order not in ORDERS:
            raise DynapruneError(f"on-demand revival: order must be one of {', '.join(ORDERS)} (got {self.order!r})")
        if self.pool < 1 or self.pool % 2 == 0:
            raise DynapruneError(f"on-demand revival: pool must be an odd number >= 1 (got {self.pool})")

    @property
    def label(self) -> str:
        return f"ondemand:r{self.per_step}/t{self.threshold:g}/b{self.budget:g}/p{self.pool}/{self.order}"


class OnDemandState:
    """The aux cache of one prompt and what was revived of it: hidden states (1, R, d) after ``layer``,
    original positions (1, R) ascending, ``alive`` (R,) = not yet revived."""

    def __init__(self, model: Any, cache: Any, aux: Any, knobs: OnDemand) -> None:
        """``aux``: the ``Revival`` a prefill stage handed over (``take_revival``), ``cache`` its prompt's."""
        if getattr(model.config, "sliding_window", None) is not None:
            raise DynapruneError("on-demand revival supports full-attention decoders only")
        if aux.hidden.shape[0] != 1:
            raise DynapruneError(f"on-demand revival decodes one sequence (batch 1), got {aux.hidden.shape[0]}")
        self.model, self.cache, self.knobs = model, cache, knobs
        self.layer, self.hidden, self.positions = aux.layer, aux.hidden, aux.positions
        self.alive = torch.ones(self.positions.shape[1], dtype=torch.bool, device=self.hidden.device)
        held = cache.cached_positions(self.layer)[0]  # every prompt token: layer s pruned nothing before it
        slot = torch.full((int(held.max()) + 1,), -1, dtype=torch.long, device=held.device)
        slot[held] = torch.arange(held.numel(), device=held.device)
        self.prompt_slots = held.numel()
        self.slot = slot[self.positions[0]]  # (R,) the layer-s cache slot of each pruned token
        self.cap = int(knobs.budget * self.positions.shape[1] + 1e-9)  # tokens that may ever come back
        self.revived = 0
        self.history: list[list[int]] = []  # original positions revived at each decode step
        self.run = PositionCausal(self.positions[:, :0], cache)
        self.revival_work: WorkCounter = self.run.work

    def choose(self, probs: torch.Tensor) -> torch.Tensor:
        """Indices into the aux cache (ascending) to revive, from the new token's layer-s attention
        probabilities (1, H, 1, Lk)."""
        k = self.knobs
        n = min(k.per_step, self.cap - self.revived, int(self.alive.sum()))
        if n <= 0:
            return self.slot[:0]
        if k.order == "position":  # the aux cache is in position order
            return self.alive.nonzero()[:n, 0]
        score = probs[0, :, 0, : self.prompt_slots].float().mean(0)  # (prompt slots,)
        score = pool_scores(score[None], k.pool)[0][self.slot]
        ok = self.alive & (score >= k.threshold)
        n = min(n, int(ok.sum()))
        if n <= 0:
            return self.slot[:0]
        return score.masked_fill(~ok, float("-inf")).topk(n).indices.sort().values

    def revive(self, index: torch.Tensor) -> None:
        """Run the aux tokens at ``index`` through the later layers into the cache (once each)."""
        self.history.append(self.positions[0, index].tolist())
        if index.numel() == 0:
            return
        if not bool(self.alive[index].all()):
            raise DynapruneError("on-demand revival: a token cannot be revived twice")
        self.alive[index] = False
        self.revived += int(index.numel())
        run_later_layers(self.model, self.cache, self.layer, self.hidden[:, index], self.positions[:, index],
                         self.run)


class OnDemandStep(RunContext):
    """One dense decode step that, after layer s, revives what its layer-s attention asks for."""

    def __init__(self, state: OnDemandState, work: WorkCounter | None = None) -> None:
        super().__init__()
        self.state = state
        if work is not None:
            self.work = work
        self.probs: torch.Tensor | None = None

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        if layer != self.state.layer:
            return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window)
        self.record_probs = True  # one query: the explicit softmax row is what the score needs
        try:
            out = super().attend(layer, q, k, v, key_padding_mask, causal, scale, window)
        finally:
            self.record_probs = False
        self.probs = self.records.pop().probs
        return out

    def between_layers(self, layer, hidden, keep):
        if layer == self.state.layer:
            self.state.revive(self.state.choose(self.probs))
        return hidden, keep


class OnDemandModel:
    """``model`` whose prompt forward with a pending aux cache (``prefill_revive``) starts an on-demand
    revival on that cache; every later one-token forward on the same cache is an ``OnDemandStep``
    (the ``ctx`` it is given is not used: decode steps are dense). ``state`` holds the latest prompt's
    revival, ``revivals`` every prompt's (tokens pruned, revived, revival work); ``decode_work`` the decode
    steps' work. For protocols that only call ``model(...)``
    (``eval.lm``'s ``continue`` with ``stepwise=True``)."""

    def __init__(self, model: Any, knobs: OnDemand) -> None:
        self.model, self.knobs = model, knobs
        self.state: OnDemandState | None = None
        self.decode_work = WorkCounter()
        self.revivals: list[tuple[int, int, WorkCounter]] = []  # per prompt: (pruned, revived, revival work)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, input_ids, *, cache=None, ctx=None, last_only=False, **kwargs):
        if self.state is not None and cache is not None and cache is self.state.cache:
            if input_ids.shape != (1, 1):
                raise DynapruneError("on-demand revival decodes one token at a time (batch 1); got input "
                                     f"{tuple(input_ids.shape)}")
            out = self.model(input_ids, cache=cache, ctx=OnDemandStep(self.state, self.decode_work),
                             last_only=last_only, **kwargs)
            pruned, _, work = self.revivals[-1]
            self.revivals[-1] = (pruned, self.state.revived, work)
            return out
        out = self.model(input_ids, cache=cache, ctx=ctx, last_only=last_only, **kwargs)
        if cache is not None and ctx is not None and pending_revival(ctx) is not None:
            self.state = OnDemandState(self.model, cache, pending_revival(ctx).take_revival(), self.knobs)
            self.revivals.append((int(self.state.positions.shape[1]), 0, self.state.revival_work))
        return out

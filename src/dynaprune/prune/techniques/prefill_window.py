"""Prefill token selection from one layer's observation window: ``prefill_keep`` / ``prefill_layer`` /
``prefill_window`` / ``prefill_sinks`` / ``prefill_pool``, or ``prefill=F`` (a shipped choice), or a
cascade of such selections, ``prefill_schedule=I:F/J:G`` (after layer I, F of the prompt is alive).

Layers ``0 .. s`` (s = ``prefill_layer``) run on the whole prompt with SDPA's fused kernel; layer s also
computes the attention of the last ``w`` prompt queries (SnapKV's observation window, Li et al. 2024,
Sec. 4: a (w x L) slice, ``prune/window.py``), max-pooled along the tokens (SnapKV's clustering). The
``prefill_keep`` share of the prompt with the highest window attention survives, plus the first
``prefill_sinks`` tokens and the window itself (GemFilter, Shi et al. 2024, Sec. 3, reads an early
layer's last-query attention the same way); layers s+1 .. end run on the survivors only (their hidden
states carried all context through layers 0 .. s). The KV cache holds, per layer, the tokens that layer
computed: every prompt token up to layer s (LazyLLM, Fu et al. 2024: early layers keep pruned tokens'
K/V), the survivors after it. Decode steps are never pruned.

A schedule repeats the selection at several layers, each from its own window attention over the
survivors (SpAtten's cascade, Sec. 3.1, with a window score: a token leaves every later layer), so the
deep layers, whose K/V the continuation reads least, run on the fewest tokens.

``prefill_revive=R`` (LazyLLM, Fu et al. 2024, Sec. 3.3: pruned tokens are revivable, their hidden states
kept in an aux cache): the next R of the prompt by the same window score, pruned at the selection layer,
keep their hidden state there; after the first token, ``runtime/revival.py`` runs them through the later
layers (causal by original position) into the cache, so the continuation reads their K/V. The time to
first token is the pruned prefill's; the revival is deferred work (reported apart).

``prefill=F`` means "the best prefill selection we ship at about F of the dense prefill FLOPs": the
point of ``prefill_choices.json`` (chosen on WikiText-2 valid, ``benchmarks/prefill.py``) with the
largest FLOPs kept not above F.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune import keys as K
from dynaprune.prune.technique import Stage, Technique
from dynaprune.prune.tokens import edge_token_mask, gather_tokens, select_tokens_to_keep
from dynaprune.prune.window import pool_scores, window_attention

CHOICES_FILE = Path(__file__).with_name("prefill_choices.json")
DEFAULT_WINDOW = 32
DEFAULT_SINKS = 4
DEFAULT_POOL = 7  # SnapKV's kernel


@cache
def prefill_choices() -> tuple[dict, ...]:
    """The shipped ``prefill=F`` points, by FLOPs kept ascending (see ``prefill_choices.json``)."""
    data = json.loads(CHOICES_FILE.read_text())
    return tuple(sorted(data["choices"], key=lambda c: c["flops_kept"]))


def resolve_prefill(flops: float) -> dict:
    """The shipped point with the largest FLOPs kept <= ``flops`` (+0.005 for rounding)."""
    choices = prefill_choices()
    fitting = [c for c in choices if c["flops_kept"] <= flops + 0.005]
    if not fitting:
        raise K.err("prefill", f"no shipped prefill choice keeps <= {flops:g} of the FLOPs "
                               f"(the smallest keeps {choices[0]['flops_kept']:.2f})")
    return fitting[-1]


def _window_size(key: str, value) -> int:
    return K.check_min(key, K.as_int(key, value), 1)


def _pool(key: str, value) -> int:
    value = K.check_min(key, K.as_int(key, value), 1)
    if value % 2 == 0:
        raise K.err(key, f"must be an odd number (a centred max-pool), got {value}")
    return value


def _cascade(key: str, points) -> K.Schedule:
    """A schedule whose layers increase and whose shares alive do not grow (tokens never come back)."""
    points = K.schedule(key, points)
    for (l0, f0), (l1, f1) in zip(points, points[1:], strict=False):
        if l1 <= l0:
            raise K.err(key, f"layers must increase, got {l0} then {l1}")
        if f1 > f0:
            raise K.err(key, f"the share alive cannot grow (a pruned token is gone), got {f0:g} then {f1:g}")
    return points


@dataclass(frozen=True)
class PrefillSelection(Technique):
    """``prefill=F``, or ``prefill_keep`` (share of the prompt kept after layer ``prefill_layer``) with
    ``prefill_layer`` (default: a third of the depth), ``prefill_window`` (default 32 queries),
    ``prefill_sinks`` (default 4) and ``prefill_pool`` (default 7)."""

    prefill: float | None = None
    prefill_keep: float | None = None
    prefill_layer: int | None = None
    prefill_window: int | None = None
    prefill_sinks: int | None = None
    prefill_pool: int | None = None
    prefill_schedule: K.Schedule | None = None
    prefill_revive: float | None = None

    role = "tokens"
    keys = (
        K.Key("prefill", K.parse_float, K.ratio),
        K.Key("prefill_keep", K.parse_float, K.ratio),
        K.Key("prefill_layer", K.parse_int, K.at_least(0, integer=True)),
        K.Key("prefill_window", K.parse_int, _window_size),
        K.Key("prefill_sinks", K.parse_int, K.at_least(0, integer=True)),
        K.Key("prefill_pool", K.parse_int, _pool),
        K.Key("prefill_schedule", K.parse_schedule, _cascade, json="schedule"),
        K.Key("prefill_revive", K.parse_float, K.ratio),
    )

    def check(self) -> None:
        knobs = ("prefill_keep", "prefill_layer", "prefill_window", "prefill_sinks", "prefill_pool",
                 "prefill_schedule")
        given = next((n for n in knobs if getattr(self, n) is not None), None)
        if self.prefill is not None:
            if given is not None:
                raise K.err(given, "prefill=F picks every knob itself; set either prefill or the prefill_* keys")
            resolve_prefill(self.prefill)
        elif self.prefill_schedule is not None:
            if self.prefill_keep is not None or self.prefill_layer is not None:
                raise K.err("prefill_schedule", "set either prefill_schedule or prefill_keep/prefill_layer")
        elif self.prefill_keep is None and given is not None:
            raise K.err(given, "tunes the prefill selection; it needs prefill_keep (or use prefill=F)")
        if self.prefill_revive is not None:
            if self.prefill_keep is None:
                raise K.err("prefill_revive", "revives tokens of one selection; it needs prefill_keep")
            if self.prefill_keep + self.prefill_revive > 1.0 + 1e-9:
                raise K.err("prefill_revive", f"kept + revived shares exceed the prompt "
                                              f"({self.prefill_keep:g} + {self.prefill_revive:g} > 1)")

    def settings(self, n_layers: int) -> dict:
        """The knobs this run uses: schedule ((layer, share alive after it), ...), window, sinks, pool;
        ``layer`` and ``keep`` are the schedule's first point (``prefill=F`` resolved)."""
        if self.prefill is not None:
            c = resolve_prefill(self.prefill)
            schedule = tuple(map(tuple, c["schedule"])) if "schedule" in c else ((c["layer"], c["keep"]),)
            s = {k: c[k] for k in ("window", "sinks", "pool")}
        else:
            if self.prefill_schedule is not None:
                schedule = self.prefill_schedule
            else:
                layer = self.prefill_layer if self.prefill_layer is not None else n_layers // 3
                schedule = ((layer, self.prefill_keep),)
            s = {"window": self.prefill_window or DEFAULT_WINDOW,
                 "sinks": DEFAULT_SINKS if self.prefill_sinks is None else self.prefill_sinks,
                 "pool": self.prefill_pool or DEFAULT_POOL}
        revive = (c.get("revive") if self.prefill is not None else self.prefill_revive) or 0.0
        if revive > 0:  # LazyLLM's aux cache (runtime/revival.py)
            s["revive"] = revive
        return {"layer": schedule[0][0], "keep": schedule[0][1], "schedule": schedule, **s}

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        layer = self.settings(n_layers)["schedule"][-1][0]
        if layer >= n_layers:
            key = "prefill" if self.prefill is not None else (
                "prefill_schedule" if self.prefill_schedule is not None else "prefill_layer")
            raise K.err(key, f"selection layer {layer} is outside the model (layers 0..{n_layers - 1})")
        if context_len is not None:
            _check_prompt(self, self.settings(n_layers), context_len)

    def stage(self, run) -> Stage | None:
        return PrefillSelectionStage(self, run) if self.enabled else None


def _check_prompt(technique: PrefillSelection, s: dict, length: int) -> None:
    """Bad input that needs the prompt length: a window longer than the prompt, sinks + window longer."""
    fixed = technique.prefill is not None
    if s["window"] > length:
        raise K.err("prefill" if fixed else "prefill_window",
                    f"the observation window of {s['window']} queries is longer than the prompt ({length} tokens)")
    if s["sinks"] + s["window"] > length:
        raise K.err("prefill" if fixed else "prefill_sinks",
                    f"the prompt ({length} tokens) is shorter than sinks + window ({s['sinks']} + {s['window']})")


class PrefillSelectionStage(Stage):
    name = "prefill"

    def __init__(self, technique: PrefillSelection, run) -> None:
        super().__init__(technique, run)
        self.settings = technique.settings(run.shape.layers)
        self.share_alive = dict(self.settings["schedule"])  # selection layer -> share of the prompt alive
        self.window_scores: torch.Tensor | None = None  # (B, L) of the selection layer, until it is used
        self.prompt_real: torch.Tensor | None = None  # (B,) real prompt tokens, at the first selection
        self.prompt_tokens = 0
        self.tokens_kept = 0
        self.positions: torch.Tensor | None = None  # (B, L) original positions once tokens were pruned
        self.revival: Revival | None = None  # pruned tokens to revive after the first token (aux cache)
        self.tokens_revived = 0

    def begin_forward(self, cache) -> None:
        if self.revival is not None and self.run.prefilled:
            raise DynapruneError("recipe key 'prefill_revive': the pruned tokens were not revived; run the "
                                 "model through runtime.revival.RevivalModel (or revive() after the prefill)")

    def take_revival(self) -> Revival | None:
        """The pending aux cache (once): who revives it owns it."""
        revival, self.revival = self.revival, None
        if revival is not None:
            self.tokens_revived = int(revival.positions.numel())
        return revival

    def queries_keys(self, layer, q, k, key_padding_mask, scale) -> None:
        s = self.settings
        if self.run.prefilled or layer not in self.share_alive or q.shape[2] != k.shape[2]:
            return  # only the prompt's forward, only the selection layers
        length = q.shape[2] if key_padding_mask is None else int(key_padding_mask.sum(-1).min())
        _check_prompt(self.technique, s, length)
        mask = key_padding_mask if key_padding_mask is not None and key_padding_mask.dim() == 2 else None
        # a sliding-window selection layer (Gemma 3) scores each window query over its own window only, by
        # original position once a cascade pruned tokens (``self.positions``)
        scores = window_attention(q, k, s["window"], scale=scale, key_padding_mask=mask,
                                  sliding=self.run.shape.window_of(layer), positions=self.positions).sum(1)
        self.window_scores = pool_scores(scores, s["pool"])
        c = self.run.counts(layer, self.name)  # the window's extra QK^T and softmax, for the report
        c["window_pairs"] = c.get("window_pairs", 0) + q.shape[0] * q.shape[1] * s["window"] * k.shape[2]

    def between_layers(self, layer, hidden, keep):
        if self.window_scores is None or layer not in self.share_alive:
            return hidden, keep
        scores, self.window_scores = self.window_scores, None
        valid = keep.get("mask")
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        real = valid.sum(-1)
        if self.prompt_real is None:
            self.prompt_real = real.cpu()
        # shares are of the whole prompt; a later point never asks for more than is alive
        target = torch.minimum(K.keep_counts(self.share_alive[layer], self.prompt_real), real.cpu())
        target = target.to(hidden.device)
        protected = edge_token_mask(valid, first=self.settings["sinks"], last=self.settings["window"])
        selection = select_tokens_to_keep(scores, target, protected, valid)
        self.prompt_tokens, self.tokens_kept = int(self.prompt_real.sum()), int(selection.mask.sum())
        if self.run.trace_calls:
            self.run.trace_calls[-1]["topk"] = int(selection.mask[0].sum())
        if self.settings.get("revive", 0) > 0:
            self.revival = _aux_cache(layer, hidden, keep["positions"], scores, selection, valid,
                                      K.keep_counts(self.settings["revive"], self.prompt_real))
        hidden = gather_tokens(hidden, selection.index)
        keep = {name: gather_tokens(t, selection.index) for name, t in keep.items()}
        keep["mask"] = selection.mask & gather_tokens(valid, selection.index)
        if "positions" in keep and keep["positions"].shape == selection.mask.shape:
            self.positions = keep["positions"]
        return hidden, keep

    def summary(self, out: dict, layers: list[int]) -> None:
        out["prefill"] = {**self.settings, "prompt_tokens": self.prompt_tokens, "tokens_kept": self.tokens_kept,
                          "tokens_revived": self.tokens_revived, "window_pairs": self.total(layers, "window_pairs")}


@dataclass(frozen=True)
class Revival:
    """LazyLLM's aux cache: pruned tokens' hidden states (B, R, d) after selection layer ``layer`` and
    their original positions (B, R), ascending; layers ``layer + 1 ..`` never saw them."""

    layer: int
    hidden: torch.Tensor
    positions: torch.Tensor


def _aux_cache(layer, hidden, positions, scores, selection, valid, wanted: torch.Tensor) -> Revival:
    """The ``wanted`` (per row; the smallest row's count for all) pruned real tokens with the highest window
    scores, in original order."""
    kept = torch.zeros_like(valid)
    kept.scatter_(1, selection.index, selection.mask)
    candidates = valid & ~kept
    n = int(torch.minimum(wanted.to(candidates.device), candidates.sum(-1)).min())
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    index = ranked.topk(n, dim=-1).indices.sort(dim=-1).values
    return Revival(layer, gather_tokens(hidden, index), gather_tokens(positions, index))

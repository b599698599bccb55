"""Prefill token selection from one layer's observation window: ``prefill_keep`` / ``prefill_layer`` /
``prefill_window`` / ``prefill_sinks`` / ``prefill_pool``, or ``prefill=F`` (a shipped choice).

Layers ``0 .. s`` (s = ``prefill_layer``) run on the whole prompt with SDPA's fused kernel; layer s also
computes the attention of the last ``w`` prompt queries (SnapKV's observation window, Li et al. 2024,
Sec. 4: a (w x L) slice, ``prune/window.py``), max-pooled along the tokens (SnapKV's clustering). The
``prefill_keep`` share of the prompt with the highest window attention survives, plus the first
``prefill_sinks`` tokens and the window itself (GemFilter, Shi et al. 2024, Sec. 3, reads an early
layer's last-query attention the same way); layers s+1 .. end run on the survivors only (their hidden
states carried all context through layers 0 .. s). The KV cache holds, per layer, the tokens that layer
computed: every prompt token up to layer s (LazyLLM, Fu et al. 2024: early layers keep pruned tokens'
K/V), the survivors after it. Decode steps are never pruned.

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

    role = "tokens"
    keys = (
        K.Key("prefill", K.parse_float, K.ratio),
        K.Key("prefill_keep", K.parse_float, K.ratio),
        K.Key("prefill_layer", K.parse_int, K.at_least(0, integer=True)),
        K.Key("prefill_window", K.parse_int, _window_size),
        K.Key("prefill_sinks", K.parse_int, K.at_least(0, integer=True)),
        K.Key("prefill_pool", K.parse_int, _pool),
    )

    def check(self) -> None:
        knobs = ("prefill_keep", "prefill_layer", "prefill_window", "prefill_sinks", "prefill_pool")
        if self.prefill is not None:
            given = next((n for n in knobs if getattr(self, n) is not None), None)
            if given is not None:
                raise K.err(given, "prefill=F picks every knob itself; set either prefill or the prefill_* keys")
            resolve_prefill(self.prefill)
        elif self.prefill_keep is None:
            given = next((n for n in knobs if getattr(self, n) is not None), None)
            if given is not None:
                raise K.err(given, "tunes the prefill selection; it needs prefill_keep (or use prefill=F)")

    def settings(self, n_layers: int) -> dict:
        """The knobs this run uses: layer, keep, window, sinks, pool (``prefill=F`` resolved)."""
        if self.prefill is not None:
            c = resolve_prefill(self.prefill)
            return {k: c[k] for k in ("layer", "keep", "window", "sinks", "pool")}
        layer = self.prefill_layer if self.prefill_layer is not None else n_layers // 3
        return {"layer": layer, "keep": self.prefill_keep,
                "window": self.prefill_window or DEFAULT_WINDOW,
                "sinks": DEFAULT_SINKS if self.prefill_sinks is None else self.prefill_sinks,
                "pool": self.prefill_pool or DEFAULT_POOL}

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        layer = self.settings(n_layers)["layer"]
        if layer >= n_layers:
            raise K.err("prefill_layer" if self.prefill is None else "prefill",
                        f"selection layer {layer} is outside the model (layers 0..{n_layers - 1})")
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
        self.window_scores: torch.Tensor | None = None  # (B, L) of the selection layer, until it is used
        self.prompt_tokens = 0
        self.tokens_kept = 0

    def queries_keys(self, layer, q, k, key_padding_mask, scale) -> None:
        s = self.settings
        if self.run.prefilled or layer != s["layer"] or q.shape[2] != k.shape[2]:
            return  # only the prompt's forward, only the selection layer
        length = q.shape[2] if key_padding_mask is None else int(key_padding_mask.sum(-1).min())
        _check_prompt(self.technique, s, length)
        mask = key_padding_mask if key_padding_mask is not None and key_padding_mask.dim() == 2 else None
        scores = window_attention(q, k, s["window"], scale=scale, key_padding_mask=mask).sum(1)
        self.window_scores = pool_scores(scores, s["pool"])
        c = self.run.counts(layer, self.name)  # the window's extra QK^T and softmax, for the report
        c["window_pairs"] = c.get("window_pairs", 0) + q.shape[0] * q.shape[1] * s["window"] * k.shape[2]

    def between_layers(self, layer, hidden, keep):
        if self.window_scores is None or layer != self.settings["layer"]:
            return hidden, keep
        scores, self.window_scores = self.window_scores, None
        valid = keep.get("mask")
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        real = valid.sum(-1)
        target = K.keep_counts(self.settings["keep"], real.cpu()).to(hidden.device)
        protected = edge_token_mask(valid, first=self.settings["sinks"], last=self.settings["window"])
        selection = select_tokens_to_keep(scores, target, protected, valid)
        self.prompt_tokens, self.tokens_kept = int(real.sum()), int(selection.mask.sum())
        if self.run.trace_calls:
            self.run.trace_calls[-1]["topk"] = int(selection.mask[0].sum())
        hidden = gather_tokens(hidden, selection.index)
        keep = {name: gather_tokens(t, selection.index) for name, t in keep.items()}
        keep["mask"] = selection.mask & gather_tokens(valid, selection.index)
        return hidden, keep

    def summary(self, out: dict, layers: list[int]) -> None:
        out["prefill"] = {**self.settings, "prompt_tokens": self.prompt_tokens, "tokens_kept": self.tokens_kept,
                          "window_pairs": self.total(layers, "window_pairs")}

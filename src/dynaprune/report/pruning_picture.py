"""Pictures of which tokens survive cascade token pruning (SpAtten paper, Fig. 22 and 23).

``trace_survival(model, text, recipe)`` runs one input under the recipe's pruning context and records,
after every layer, which ORIGINAL tokens were alive in it and the cumulative importance of every token
(the attention probability it received, summed over alive heads, queries and layers: SpAtten's score).
A pruned token keeps the importance it had when it left. ``render_terminal`` prints it with rich (one
line per layer); ``plot_survival`` draws the tokens x layers picture as a PNG.

The context is wrapped, not changed: its ``between_layers`` is replaced on the instance by a recorder
that reads the per-token tensors the model carries (BERT: ``keep["pos"]``, the original token index;
Llama / GPT-2: ``keep["positions"]``, the original position ids) before the pruning of that layer.
Importance is accumulated here from the probabilities the context records (``record_probs``), so the
picture also works for recipes whose context keeps no token importance (dense, head-only, ``random``).
For ``score=instant`` the pruner ranks by one layer's attention, so its order can differ from the
cumulative shading; under HDP without token pruning no probabilities are computed (importance is 0).

This module traces (``Survival``, ``SurvivalRecorder``, ``trace_survival``, ``readable_tokens``); the
terminal and PNG renderings are in ``survival_render.py`` and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynaprune.errors import DynapruneError
from dynaprune.report.survival_render import plot_survival, render_terminal

__all__ = ["Survival", "SurvivalRecorder", "plot_survival", "readable_tokens", "render_terminal", "trace_survival"]

_MAX_TOKENS = 2048  # a picture of more tokens is unreadable, and the run would be slow on CPU


@dataclass
class Survival:
    """Which original tokens were alive in each layer of one pruned forward pass, and their importance.

    alive: (n_layers, n_tokens) bool, row i = the tokens layer i computed (row 0: every token).
    importance: (n_layers, n_tokens) float, cumulative importance after layer i; a pruned token keeps
    the value it had in the last layer it was alive in.
    """

    tokens: list[str]
    alive: torch.Tensor
    importance: torch.Tensor
    recipe: str
    model: str
    heads_per_layer: list[int]
    token_ids: list[int] = field(default_factory=list)
    chat: bool = False  # the text went through the chat template
    summary: dict = field(default_factory=dict)  # the pruning context's summary() (empty when dense)

    @property
    def n_layers(self) -> int:
        return int(self.alive.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.alive.shape[1])

    @property
    def kept_per_layer(self) -> list[int]:
        return [int(n) for n in self.alive.sum(dim=1)]

    @property
    def survivors(self) -> list[int]:
        """Original indices of the tokens the last layer computed."""
        return [int(i) for i in self.alive[-1].nonzero().flatten()]


class SurvivalRecorder:
    """Wraps a run context (dense or pruning) and records token survival and importance per layer.

    Install it before the forward pass; the model keeps calling ``ctx.between_layers`` as usual.
    """

    def __init__(self, ctx, n_tokens: int) -> None:
        self.ctx = ctx
        self.n_tokens = n_tokens
        self.alive: list[torch.Tensor] = []
        self.importance: list[torch.Tensor] = []
        self._cumulative = torch.zeros(n_tokens, dtype=torch.float64)  # in original token order
        self._first_positions: torch.Tensor | None = None
        self._inner = ctx.between_layers  # the bound method of the context: super() for an instance
        ctx.record_probs = True  # probabilities of the alive heads, exactly what the pruner sees
        ctx.between_layers = self.between_layers

    def between_layers(self, layer: int, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        index = self._original_index(keep)
        valid = keep["mask"][0].cpu().bool() if "mask" in keep else torch.ones(index.shape[0], dtype=torch.bool)
        self._accumulate(layer, index, valid)
        alive = torch.zeros(self.n_tokens, dtype=torch.bool)
        alive[index[valid]] = True
        self.alive.append(alive)
        self.importance.append(self._cumulative.float().clone())
        return self._inner(layer, hidden, keep)

    def _original_index(self, keep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Original token index of every current token of row 0."""
        if "pos" in keep:  # BERT carries the original index itself
            return keep["pos"][0].cpu().long()
        if "positions" in keep:  # decoders carry position ids: map them back through the first layer's
            positions = keep["positions"][0].cpu().long()
            if self._first_positions is None:
                self._first_positions = positions
            return torch.searchsorted(self._first_positions, positions)
        raise DynapruneError("this model carries no token positions between layers; cannot trace survival")

    def _accumulate(self, layer: int, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Add what each alive token received in this layer (Alg. 2: summed over heads and queries)."""
        records = [r for r in self.ctx.records if r.layer == layer and r.probs is not None]
        self.ctx.records.clear()  # consumed: do not hold every layer's probabilities
        for record in records:
            probs = record.probs[0].double().cpu()  # (H, Lq, Lk)
            if probs.shape[-2] == valid.shape[0]:  # padding queries contribute nothing
                probs = probs * valid[None, :, None]
            received = probs.sum(dim=(0, 1))
            self._cumulative.index_add_(0, index[valid], received[valid])

    def result(self, tokens: list[str], token_ids: list[int], recipe: str, model: str, chat: bool = False
               ) -> Survival:
        summary = self.ctx.summary() if hasattr(self.ctx, "summary") else {}
        heads = summary.get("heads_per_layer") or [_n_heads(self.ctx)] * len(self.alive)
        return Survival(
            tokens=tokens,
            alive=torch.stack(self.alive),
            importance=torch.stack(self.importance),
            recipe=recipe,
            model=model,
            heads_per_layer=[int(h) for h in heads],
            token_ids=token_ids,
            summary=summary,
            chat=chat,
        )


def trace_survival(
    model, text: str | None, recipe: str, *, ids: list[int] | None = None, chat: bool = False,
    trace: str | Path | None = None,
) -> Survival:
    """Run ONE input under ``recipe`` and record which original tokens survive each layer.

    ``text`` is tokenized the model's way (encoder: with [CLS]/[SEP] and its truncation; decoder: plain,
    or with the chat template when ``chat``); or pass token ``ids`` instead (text must then be None).
    A decoder runs one prefill forward, where token pruning protects the last prompt token.
    ``trace``: also write that forward's SpAtten-schema workload trace there (``dynaprune hw simulate``).
    """
    from dynaprune.prune.recipe import Recipe
    from dynaprune.runtime.pruning import make_context

    parsed = Recipe.parse(recipe or "")
    token_ids = _token_ids(model, text, ids, chat)
    ctx = make_context(parsed, model, **({"trace": True} if trace is not None else {}))  # validates the recipe
    recorder = SurvivalRecorder(ctx, len(token_ids))
    device = _device(model)
    batch = torch.tensor([token_ids], device=device)
    with torch.inference_mode():
        if _is_encoder(model):
            model(batch, torch.ones_like(batch, dtype=torch.bool), ctx=ctx)
        else:
            model(batch, ctx=ctx, last_only=True)  # prefill; only the last logits are needed
    tokens = readable_tokens(getattr(model, "tokenizer", None), token_ids)
    name = getattr(model, "name", type(model).__name__)
    if trace is not None:
        from dynaprune.runtime.trace import write_run_trace

        write_run_trace(trace, ctx, config=f"dynaprune {name} run {parsed}")
    return recorder.result(tokens, token_ids, str(parsed) or "dense", name, chat=chat and text is not None)


def readable_tokens(tokenizer, ids: list[int]) -> list[str]:
    """One short label per token: BPE space markers (Ġ, ▁) dropped and bytes decoded, WordPiece "##"
    shown as a leading "·", newlines as ↵, a bare space as ␣; raw ids when there is no tokenizer."""
    if tokenizer is None:
        return [str(i) for i in ids]
    labels = []
    for piece in tokenizer.convert_ids_to_tokens(list(ids)):
        piece = str(piece)
        if piece.startswith("##") and len(piece) > 2:
            label = "·" + piece[2:]  # WordPiece continuation: "offbeat" reads "off ·beat", not two words
        else:
            try:  # byte-level BPE: "Ġthe" -> " the", "Ċ" -> "\n", "âĢĻ" -> "’"
                label = tokenizer.convert_tokens_to_string([piece])
            except (KeyError, TypeError, ValueError):
                label = piece
        label = label.replace("\n", "↵").replace("\t", "⇥").strip()
        labels.append(label or "␣")
    return labels


def _is_encoder(model) -> bool:
    return hasattr(model, "embed")  # Bert; decoders (Llama, GPT-2) have generate instead


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _vocab_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("vocab_size", "vocab"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def _n_heads(ctx) -> int:
    work = getattr(ctx, "work", None)
    return int(getattr(work, "heads", 0) or 0)


def _token_ids(model, text: str | None, ids: list[int] | None, chat: bool) -> list[int]:
    if (text is None) == (ids is None):
        raise DynapruneError("give either a text or token ids, not both or neither")
    if ids is not None:
        ids = [int(i) for i in ids]
        if not ids:
            raise DynapruneError("no token ids given")
        vocab = _vocab_size(model)
        if vocab is not None and not all(0 <= i < vocab for i in ids):
            raise DynapruneError(f"token ids must lie in [0, {vocab}) for this model")
    else:
        if not isinstance(text, str) or not text.strip():
            raise DynapruneError("empty text: give a sentence to trace")
        if _is_encoder(model):
            if chat:
                raise DynapruneError("--chat applies to decoders; this model is an encoder")
            ids = model.tokenize([text])[0]
        else:
            from dynaprune.runtime.generate import encode_prompts

            ids = encode_prompts(model, text, chat)[0][0]
    if len(ids) > _MAX_TOKENS:
        raise DynapruneError(f"{len(ids)} tokens: the survival picture takes at most {_MAX_TOKENS}")
    return ids

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
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynaprune.errors import DynapruneError

# Low to high importance, dark to bright (viridis stops): readable on dark and light terminals alike.
_PALETTE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_PRUNED_STYLE = "dim strike grey50"
_PRUNED_GREY = "#d0d0d0"
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
    model, text: str | None, recipe: str, *, ids: list[int] | None = None, chat: bool = False
) -> Survival:
    """Run ONE input under ``recipe`` and record which original tokens survive each layer.

    ``text`` is tokenized the model's way (encoder: with [CLS]/[SEP] and its truncation; decoder: plain,
    or with the chat template when ``chat``); or pass token ``ids`` instead (text must then be None).
    A decoder runs one prefill forward, where token pruning protects the last prompt token.
    """
    from dynaprune.prune.recipe import Recipe
    from dynaprune.runtime.pruning import make_context

    parsed = Recipe.parse(recipe or "")
    token_ids = _token_ids(model, text, ids, chat)
    ctx = make_context(parsed, model)  # validates the recipe against the model
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


# ---------------------------------------------------------------------------------------- terminal


def render_terminal(survival: Survival, console: Console) -> None:
    """One line per layer (tokens coloured by importance, brighter = more important; pruned ones dim
    and struck through), then the surviving tokens."""
    n = survival.n_tokens
    title = f"{survival.model} · {survival.recipe} · {n} tokens" + (" (chat template)" if survival.chat else "")
    table = Table.grid(padding=(0, 1))
    table.add_column(justify="right", style="bold")
    table.add_column(justify="right")
    table.add_column(overflow="fold")
    shade, _ = _normalised(survival)
    for layer in range(survival.n_layers):
        line = Text()
        for j, token in enumerate(survival.tokens):
            if j:
                line.append(" ")
            if survival.alive[layer, j]:
                line.append(token, style=_colour(float(shade[layer, j])))
            else:
                line.append(token, style=_PRUNED_STYLE)
        kept = survival.kept_per_layer[layer]
        heads = survival.heads_per_layer[layer] if layer < len(survival.heads_per_layer) else None
        count = f"{kept}/{n}" + (f" h{heads}" if heads is not None else "")
        table.add_row(f"L{layer}", count, line)
    console.print(Text(title, style="bold"))
    console.print(table)
    kept = " ".join(survival.tokens[i] for i in survival.survivors)
    console.print(Text.assemble(("survivors ", "bold"), (f"({len(survival.survivors)}/{n}): ", ""), kept))


def _colour(value: float) -> str:
    """Linear interpolation through the palette for a value in [0, 1]."""
    value = min(1.0, max(0.0, value))
    pos = value * (len(_PALETTE) - 1)
    i = min(int(pos), len(_PALETTE) - 2)
    t = pos - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_PALETTE[i], _PALETTE[i + 1], strict=True))
    return f"rgb({r},{g},{b})"


def _normalised(survival: Survival) -> tuple[torch.Tensor, int]:
    """Importance as a share of its layer's most important alive token, on a log scale mapped to [0, 1]:
    1 = the layer's top token, 0 = ``10 ** -decades`` of it or less. Returns (values, decades).

    Cumulative attention is heavy-tailed ([CLS], [SEP], a decoder's first token take most of it), so a
    linear scale would leave every word the same dark colour. ``decades`` is the span of the alive
    cells, rounded up (1 to 6), so one picture uses the whole palette and its colour bar stays exact."""
    imp = survival.importance.double().clamp(min=0)
    top = imp.masked_fill(~survival.alive, 0).amax(dim=1, keepdim=True)
    share = (imp / top.clamp(min=1e-30)).clamp(min=1e-6, max=1).log10()
    span = float(-share[survival.alive].min()) if bool(survival.alive.any()) else 1.0
    decades = min(6, max(1, math.ceil(span - 1e-9)))
    return (1 + share / decades).clamp(0, 1), decades


# ---------------------------------------------------------------------------------------- PNG


def plot_survival(survival: Survival, path: str | Path) -> Path:
    """Tokens (x) by layers (y, layer 0 on top) like SpAtten Fig. 22/23: alive cells coloured by
    cumulative importance (normalised per layer), pruned cells grey. Written atomically; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DynapruneError(f"{path}: the picture is a PNG; give a path ending in .png")
    n, n_layers = survival.n_tokens, survival.n_layers
    shade, decades = _normalised(survival)
    shade = shade.numpy()
    cells = np.ma.masked_array(shade, mask=~survival.alive.numpy())
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_PRUNED_GREY)  # masked cells = pruned

    # Size: about a quarter inch per token and per layer, within what a page or screen shows.
    width = min(26.0, max(7.0, 0.24 * n + 2.5))
    height = min(14.0, max(3.2, 0.3 * n_layers + 2.6))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    image = ax.imshow(cells, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    # Thin cell borders show single tokens when they are wide enough to see.
    if n <= 120:
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_layers, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)

    step = max(1, math.ceil(n / (width * 6)))  # at most ~6 labels per inch: thin them for long texts
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    labels = [_mpl_escape(_shorten(survival.tokens[j])) for j in ticks]
    ax.set_xticklabels(labels, rotation=70 if step == 1 else 90, ha="right" if step == 1 else "center",
                       rotation_mode="anchor" if step == 1 else "default", fontsize=9 if n <= 80 else 7)
    # Survivors of the last layer in bold, so the final selection reads off the axis.
    last = survival.alive[-1]
    for tick, j in zip(ax.get_xticklabels(), ticks, strict=True):
        if last[j]:
            tick.set_fontweight("bold")
    ylabel_step = max(1, math.ceil(n_layers / 32))
    ax.set_yticks(range(0, n_layers, ylabel_step))
    ax.set_yticklabels([f"L{i}" for i in range(0, n_layers, ylabel_step)], fontsize=8)
    ax.set_ylabel("layer")
    if step > 1:
        ax.set_xlabel(f"token (one in {step} labelled)")

    # Right edge: how many tokens each layer computed.
    kept = survival.kept_per_layer
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(0, n_layers, ylabel_step))
    right.set_yticklabels([f"{kept[i]}/{n}" for i in range(0, n_layers, ylabel_step)], fontsize=8)
    right.set_ylabel("tokens kept")

    counts = _run_lengths(kept)
    prompt = " (chat template)" if survival.chat else ""
    title = f"{survival.model} · recipe {survival.recipe} · {n} tokens{prompt}"
    subtitle = textwrap.fill(f"tokens kept per layer: {counts}", width=max(60, int(width * 14)))
    ax.set_title(_mpl_escape(f"{title}\n{subtitle}"), fontsize=10, loc="left")
    pad = 1.1 / (0.8 * width)  # about an inch, in axes widths: clear of the "tokens kept" labels
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=pad)
    bar.set_ticks([1 - k / decades for k in range(decades + 1)])
    bar.set_ticklabels(["1"] + [f"$10^{{-{k}}}$" for k in range(1, decades + 1)])
    bar.set_label("cumulative importance as a share of\nthe layer's most important token", fontsize=8)
    bar.ax.legend(handles=[Patch(color=_PRUNED_GREY, label="pruned")], loc="lower center", bbox_to_anchor=(0.5, 1.01),
                  frameon=False, fontsize=8, borderaxespad=0, handlelength=1.2)
    fig.tight_layout()
    _save_atomic(fig, path)
    plt.close(fig)
    return path


def _run_lengths(counts: list[int]) -> str:
    """"12 ×2, 10, 8 ×3": repeated counts collapsed so 30 layers fit on a line or two."""
    parts: list[str] = []
    i = 0
    while i < len(counts):
        j = i
        while j + 1 < len(counts) and counts[j + 1] == counts[i]:
            j += 1
        parts.append(f"{counts[i]}" + (f" ×{j - i + 1}" if j > i else ""))
        i = j + 1
    return ", ".join(parts)


def _shorten(label: str, limit: int = 14) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _mpl_escape(text: str) -> str:
    """matplotlib reads $...$ as mathtext: a "$" token must stay a dollar sign."""
    return text.replace("$", r"\$")


def _save_atomic(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a picture is for everyone to read
        os.replace(tmp, path)  # readers never see a half-written PNG
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- helpers


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


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

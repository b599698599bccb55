"""Renderings of a token-survival trace (``report/pruning_picture.py``'s ``Survival``), like SpAtten
Fig. 22/23: ``render_terminal`` prints one line per layer with rich (tokens coloured by cumulative
importance, pruned ones struck through); ``plot_survival`` draws the tokens x layers picture as a PNG,
written atomically."""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynaprune.errors import DynapruneError

if TYPE_CHECKING:
    from dynaprune.report.pruning_picture import Survival

# Low to high importance, dark to bright (viridis stops): readable on dark and light terminals alike.
_PALETTE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_PRUNED_STYLE = "dim strike grey50"
_PRUNED_GREY = "#d0d0d0"


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


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


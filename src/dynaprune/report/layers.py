"""Per-layer tokens and heads alive (the shape of SpAtten's Fig. 1): for a few recipes of one group,
the fraction of tokens each layer computed and the number of heads it computed, with dense as the
reference. Read from the pruning summary a run keeps in ``cost.pruning`` (tokens summed over the
run's calls, heads of its last call: head pruning keeps the same count per layer on every input)."""

from __future__ import annotations

from dataclasses import dataclass

from dynaprune.report.figures import png_bytes, pyplot
from dynaprune.report.labels import short_recipe
from dynaprune.report.results import Group

MAX_PROFILES = 8


@dataclass
class Profile:
    recipes: list[str]
    tokens: list[float]  # fraction of the layer-0 tokens alive in each layer
    heads: list[int]

    @property
    def label(self) -> str:
        first, *others = dict.fromkeys(short_recipe(r) for r in sorted(self.recipes, key=len))
        return first + (f" (= {', '.join(others)})" if others else "")


def profiles(group: Group) -> tuple[list[Profile], int]:
    """The distinct per-layer profiles that differ from dense (at most MAX_PROFILES, spread over how
    much they keep) and the model's head count; ([], 0) when no run of the group prunes per layer."""
    found: dict[tuple, Profile] = {}
    n_heads = 0
    for row in group.rows:
        cost = row.get("cost") or {}
        pruning = cost.get("pruning") or {}
        tokens = pruning.get("tokens_per_layer") or []
        heads = pruning.get("heads_per_layer_last_call") or pruning.get("heads_per_layer") or []
        n_heads = max(n_heads, int((cost.get("shape") or {}).get("heads") or 0), *heads, 0)
        if not tokens or not tokens[0]:
            continue
        fractions = [t / tokens[0] for t in tokens]
        key = (tuple(round(f, 4) for f in fractions), tuple(heads))
        if key in found:
            found[key].recipes.append(row.get("recipe") or "dense")
        else:
            found[key] = Profile([row.get("recipe") or "dense"], fractions, list(heads))
    pruned = [p for p in found.values()
              if any(f < 0.9999 for f in p.tokens) or any(h < n_heads for h in p.heads)]
    pruned.sort(key=lambda p: -(sum(p.tokens) + sum(p.heads) / max(1, n_heads)))
    if len(pruned) > MAX_PROFILES:
        step = (len(pruned) - 1) / (MAX_PROFILES - 1)
        pruned = [pruned[round(i * step)] for i in range(MAX_PROFILES)]
    return pruned, n_heads


def layers_png(group: Group) -> bytes | None:
    """Two panels (tokens alive, heads alive per layer), or None when no run prunes per layer."""
    found, n_heads = profiles(group)
    if not found:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    n_layers = max(len(p.tokens) for p in found)
    layers = list(range(n_layers))
    left.plot(layers, [1.0] * n_layers, "k--", lw=1, label="dense")
    right.plot(layers, [n_heads] * n_layers, "k--", lw=1, label="dense")
    for p in found:
        line = left.plot(range(len(p.tokens)), p.tokens, marker="o", ms=4, alpha=0.85, label=p.label)[0]
        if p.heads:
            right.plot(range(len(p.heads)), p.heads, marker="o", ms=4, alpha=0.85, color=line.get_color())
    left.set_ylabel("fraction of tokens alive")
    left.set_ylim(0, 1.05)
    right.set_ylabel("heads computed")
    right.set_ylim(0, n_heads + 0.5)
    for ax in (left, right):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if n_layers <= 32:
            ax.set_xticks(layers[:: max(1, n_layers // 12)])
    fig.suptitle(f"{group.title}: tokens and heads alive per layer")
    fig.tight_layout()
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    return png_bytes(fig)

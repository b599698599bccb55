"""Which heads / FFN neurons / layers to remove, from importance scores, and doing it.

Heads are ranked globally (scores normalized per layer by their L2 norm, as Michel et al. do), at least
one head kept per layer; Llama removes query heads in units of one head per KV group (the group's
r-th least important), so every group keeps as many. FFN neurons: the same fraction in every layer (equal
widths run best). Layers: the ones whose output differs least from their input (cosine criterion).
"""

from __future__ import annotations

import torch

from dynaprune.errors import DynapruneError
from dynaprune.static.structured import adapter, remove_ffn_neurons, remove_heads, remove_layers


def check_ratio(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise DynapruneError(f"{name} must lie in [0, 1), got {value}")


def heads_to_remove(model, scores: list[torch.Tensor], ratio: float) -> dict[int, list[int]]:
    check_ratio("--heads", ratio)
    arch = adapter(model)
    units = []  # (normalized score, layer, heads this unit removes)
    for layer, s in enumerate(scores):
        s = s.float() / s.float().norm().clamp_min(1e-12)
        if arch.kind == "llama":
            kv = arch.kv_heads
            group = s.numel() // kv
            order = s.view(kv, group).argsort(dim=1)  # per group, least important first
            for r in range(group):
                heads = [g * group + int(order[g, r]) for g in range(kv)]
                units.append((float(s[heads].sum()), layer, heads))
        else:
            units.extend((float(s[h]), layer, [h]) for h in range(s.numel()))
    total = sum(s.numel() for s in scores)
    want = round(ratio * total)
    removed: dict[int, list[int]] = {}
    done = 0
    for _score, layer, heads in sorted(units, key=lambda u: u[0]):
        if done >= want:
            break
        if len(removed.get(layer, [])) + len(heads) >= scores[layer].numel():
            continue  # never a whole layer's heads
        removed.setdefault(layer, []).extend(heads)
        done += len(heads)
    return {k: sorted(v) for k, v in removed.items()}


def apply_heads(model, removed: dict[int, list[int]]) -> None:
    arch = adapter(model)
    for layer, heads in removed.items():
        n = arch.heads(layer)
        if len(set(heads)) >= n:
            raise DynapruneError(f"removing every head of layer {layer} is not allowed")
        remove_heads(model, layer, [h for h in range(n) if h not in set(heads)])


def ffn_to_remove(scores: list[torch.Tensor], ratio: float) -> dict[int, list[int]]:
    check_ratio("--ffn", ratio)
    out = {}
    for layer, s in enumerate(scores):
        k = round(ratio * s.numel())
        if k:
            out[layer] = sorted(int(i) for i in s.float().argsort(stable=True)[:k])
    return out


def ffn_to_remove_global(scores: list[torch.Tensor], ratio: float, max_layer: float = 0.6) -> dict[int, list[int]]:
    """``ratio`` of all FFN neurons, ranked across layers (each layer's scores normalized by their L2 norm,
    as the head ranking; Michel et al. 2019), at most ``max_layer`` of any one layer: non-uniform widths
    with the same total as ``ffn_to_remove`` (pruning guide section 3, per-layer sensitivity)."""
    check_ratio("--ffn", ratio)
    if not 0 < max_layer < 1:
        raise DynapruneError(f"the per-layer FFN removal cap must lie in (0, 1), got {max_layer}")
    units = sorted((float(v), layer, i) for layer, s in enumerate(scores)
                   for i, v in enumerate((s.float() / s.float().norm().clamp_min(1e-12)).tolist()))
    want = round(ratio * sum(s.numel() for s in scores))
    cap = {layer: int(max_layer * s.numel()) for layer, s in enumerate(scores)}
    out: dict[int, list[int]] = {}
    done = 0
    for _v, layer, i in units:
        if done >= want:
            break
        if len(out.get(layer, [])) < cap[layer]:
            out.setdefault(layer, []).append(i)
            done += 1
    return {k: sorted(v) for k, v in sorted(out.items())}


def apply_ffn(model, removed: dict[int, list[int]]) -> None:
    arch = adapter(model)
    for layer, neurons in removed.items():
        drop = set(neurons)
        remove_ffn_neurons(model, layer, [i for i in range(arch.ffn_width(layer)) if i not in drop])


def layers_to_remove(scores: torch.Tensor, count: int) -> list[int]:
    if not 0 <= count < scores.numel():
        raise DynapruneError(f"--layers must lie in [0, {scores.numel()}) (the model has {scores.numel()} layers), "
                             f"got {count}")
    return sorted(int(i) for i in scores.argsort(stable=True)[:count])


def apply_layers(model, layers: list[int]) -> None:
    if layers:
        remove_layers(model, layers)

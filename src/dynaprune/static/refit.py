"""Least-squares refit of the FFN down-projection after FFN neurons are removed (FLAP's bias compensation,
An et al. 2024, generalised; the reconstruction step of layer-wise pruning such as OBS / SparseGPT, here
for whole neurons and in closed form).

Removing neuron j of a layer drops the term ``W2[:, j] * h_j`` from the FFN output. The kept neurons'
activations are correlated with the removed ones, so the best new down-projection over the kept
neurons (plus a bias) is the least-squares solution, on calibration tokens, of

    min_{W', b'}  sum_t || target_t - (W' h_t[kept] + b') ||^2  (+ ridge * mean diag * ||W'||^2)

with the normal equations ``(G_SS + lambda I) A = C_S`` where G = sum h~ h~^T over tokens (h~ = h with a
trailing 1 for the bias), C = sum h~ target^T and S = kept + bias. The layers are refit in order
(sequentially, as SparseGPT): each layer's activations come from the model whose earlier layers are
already pruned and refit, so the refit also absorbs the error of the layers before it.

Targets (``RefitConfig.target``):
  * ``"output"``: the parent's FFN output at that layer (on the parent's own tokens);
  * ``"residual"`` (BERT, post-LN): the parent's sum entering the FFN's LayerNorm minus the pruned
    model's residual there, so LN(x + FFN(x)) matches the parent's block output as well as possible
    (earlier errors included). Llama (pre-LN) supports ``"output"`` only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.static.structured import adapter, remove_ffn_neurons

TARGETS = ("output", "residual")


@dataclass(frozen=True)
class RefitConfig:
    target: str = "residual"
    ridge: float = 1e-4  # lambda = ridge x mean diagonal of G_SS (numerical safety; 0 = plain least squares)

    def check(self, kind: str) -> None:
        if self.target not in TARGETS:
            raise DynapruneError(f"unknown FFN refit target {self.target!r} (known: {', '.join(TARGETS)})")
        if self.target == "residual" and kind != "bert":
            raise DynapruneError("the 'residual' FFN refit needs a post-LN BERT block; use 'output'")
        if not self.ridge >= 0:
            raise DynapruneError(f"the refit ridge must be >= 0, got {self.ridge}")


def solve(gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The least-squares weights over ``keep`` (indices into G's rows, the bias row included):
    A = (G_SS + lambda I)^-1 C_S, shape (|S|, d_out), in float64."""
    g = gram.index_select(0, keep).index_select(1, keep).double()
    c = cross.index_select(0, keep).double()
    if ridge:
        g = g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.lstsq(g, c).solution if not ridge else torch.linalg.solve(g, c)


class _Tap:
    """Forward hooks on one block: the FFN down-projection's input and output, and the residual."""

    def __init__(self, model, layer: int):
        arch = adapter(model)
        self.down = arch.ffn_down(layer)
        blk = model.layers[layer]
        self.got: dict[str, torch.Tensor] = {}
        self.handles = [self.down.register_forward_pre_hook(self._save("h", pre=True)),
                        self.down.register_forward_hook(self._save("y"))]
        if arch.kind == "bert":  # post-LN: the residual added to the FFN output is fc1's input
            self.handles.append(blk.fc1.register_forward_pre_hook(self._save("r", pre=True)))

    def _save(self, key: str, pre: bool = False):
        def hook(module, args, out=None):
            self.got[key] = (args[0] if pre else out).detach()
        if pre:
            return lambda module, args: hook(module, args)
        return lambda module, args, out: hook(module, args, out)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model, calib, batch, layer: int) -> dict[str, torch.Tensor]:
    tap = _Tap(model, layer)
    try:
        with torch.no_grad():
            calib.forward(model, batch)
    finally:
        tap.close()
    return tap.got


def layer_statistics(model, parent, calib, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """G (n+1, n+1), C (n+1, d) and sum ||target||^2 of ``layer`` over the calibration's real tokens: the
    activations are the (partly pruned) ``model``'s, the targets the ``parent``'s."""
    n = adapter(model).ffn_width(layer)
    gram = cross = None
    tokens, energy = 0, 0.0
    for batch in calib:
        s, p = _run(model, calib, batch, layer), _run(parent, calib, batch, layer)
        m = batch.mask.reshape(-1)
        h = s["h"].reshape(-1, n)[m].float()  # float32 products (the cost), summed in float64
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
        d = p["y"].shape[-1]
        t = p["y"].reshape(-1, d)[m].double()
        if target == "residual":
            t = t + p["r"].reshape(-1, d)[m].double() - s["r"].reshape(-1, d)[m].double()
        energy += float(t.pow(2).sum())
        t = t.float()
        g, c = (h.T @ h).double(), (h.T @ t).double()
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
        tokens += h.shape[0]
    if gram is None:
        raise DynapruneError("the FFN refit needs calibration data (none given)")
    return gram, cross, energy, tokens


def _mse(gram: torch.Tensor, cross: torch.Tensor, tt: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> float:
    """sum_t ||t - w^T h~_S||^2 from the statistics (tt = sum ||t||^2), without the tokens."""
    g = gram.index_select(0, keep).index_select(1, keep)
    c = cross.index_select(0, keep)
    return float(tt - 2 * (w * c).sum() + (w * (g @ w)).sum())


def prune_ffn_refit(model, calib, removed: dict[int, list[int]], cfg: RefitConfig = RefitConfig()) -> dict:
    """Remove the FFN neurons ``removed`` (layer -> neuron indices) from ``model`` in place, refitting each
    pruned layer's down-projection by least squares; returns per layer the relative reconstruction error
    of plain removal and of the refit (sum ||target - output||^2 / sum ||target||^2 on calibration)."""
    arch = adapter(model)
    cfg.check(arch.kind)
    parent = copy.deepcopy(model).eval()
    report: dict[str, dict] = {}
    for layer in sorted(removed):
        n = arch.ffn_width(layer)
        drop = set(int(i) for i in removed[layer])
        keep = torch.tensor([i for i in range(n) if i not in drop] + [n])  # + the bias row
        gram, cross, tt, tokens = layer_statistics(model, parent, calib, layer, cfg.target)
        down = arch.ffn_down(layer)
        w = solve(gram, cross, keep, cfg.ridge)  # (|S|, d)
        old = torch.cat([down.weight.detach().double().T, down.bias.detach().double()[None]]).index_select(0, keep)
        remove_ffn_neurons(model, layer, keep[:-1].tolist())
        new = arch.ffn_down(layer)
        if new.bias is None:
            raise DynapruneError("the FFN refit needs a down-projection with a bias")
        with torch.no_grad():
            new.weight.copy_(w[:-1].T.to(new.weight.dtype))
            new.bias.copy_(w[-1].to(new.bias.dtype))
        report[str(layer)] = {"tokens": tokens, "removed": len(drop),
                              "error_slice": _mse(gram, cross, tt, old, keep) / max(tt, 1e-30),
                              "error_refit": _mse(gram, cross, tt, w, keep) / max(tt, 1e-30)}
    return report

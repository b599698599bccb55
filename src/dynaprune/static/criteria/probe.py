"""Gates on per-head outputs and FFN activations, for the criteria that need them.

A forward pre-hook multiplies the input of each layer's output projection (the concatenated per-head
outputs) by a gate of ones per head, and the input of the FFN down-projection by a gate per neuron.
The gates change nothing numerically; their gradients are the Taylor importance (dL/dgate_h =
sum over positions of grad . activation of head h), and the hooks also sum |activation| per unit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dynaprune.static.structured import adapter


class Gates:
    def __init__(self, model, unit: str):
        self.arch = adapter(model)
        self.unit = unit  # "heads" | "ffn"
        n = self.arch.n_layers
        sizes = [self.arch.heads(i) if unit == "heads" else self.arch.ffn_width(i) for i in range(n)]
        dev = next(model.parameters()).device
        self.gates = [torch.ones(s, device=dev, requires_grad=True) for s in sizes]
        self.grad_abs = [torch.zeros(s, device=dev) for s in sizes]  # |dL/dgate| summed over batches
        self.act_abs = [torch.zeros(s, device=dev) for s in sizes]  # sum of |activation| per unit
        self.count = [0] * n
        self.handles = []

    def _hook(self, layer: int):
        def pre(module, args):
            (x,) = args
            g = self.gates[layer]
            parts = x.unflatten(-1, (g.numel(), -1))  # (..., units, per-unit width)
            with torch.no_grad():
                a = parts.detach().abs().sum(-1)  # (..., units)
                self.act_abs[layer] += a.reshape(-1, g.numel()).sum(0)
                self.count[layer] += a.reshape(-1, g.numel()).shape[0]
            return ((parts * g[:, None]).flatten(-2),)
        return pre

    def __enter__(self) -> Gates:
        for i in range(self.arch.n_layers):
            lin = self.arch.out_proj(i) if self.unit == "heads" else self.arch.ffn_down(i)
            self.handles.append(lin.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def collect_grad(self) -> None:
        for i, g in enumerate(self.gates):
            if g.grad is not None:
                self.grad_abs[i] += g.grad.abs()
                g.grad = None

    def mean_activation(self) -> list[torch.Tensor]:
        return [a / max(c, 1) for a, c in zip(self.act_abs, self.count, strict=True)]


@contextmanager
def frozen(model):
    """Parameters stop requiring grad while a criterion differentiates only its gates."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def taylor(model, calib, unit: str) -> list[torch.Tensor]:
    """|sum over calibration batches of dL/dgate| per head or FFN neuron (Michel et al. 2019; Molchanov)."""
    with frozen(model), Gates(model, unit) as gates:
        for batch in calib:
            calib.loss(model, batch).backward()
            gates.collect_grad()
    return [g.detach().cpu() for g in gates.grad_abs]


def magnitude(model, calib, unit: str) -> list[torch.Tensor]:
    """Mean |activation| per head output (SpAtten's cumulative head magnitude) or FFN neuron."""
    with torch.no_grad(), Gates(model, unit) as gates:
        for batch in calib:
            calib.forward(model, batch)
    return [a.cpu() for a in gates.mean_activation()]

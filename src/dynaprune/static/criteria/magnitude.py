"""Unstructured magnitude pruning with the guide's iterative schedule (section 2, 'Iterative Pruning').

Each step zeroes the smallest |w| of every linear layer of the blocks until the step's sparsity is
reached. The schedule is exponential: step i of k reaches 1 - (1 - target)^((i+1)/k), i.e. every step
removes the same fraction of the weights still alive (few early, when the model is fragile). Shapes
stay the same."""

from __future__ import annotations

import torch

from dynaprune.errors import DynapruneError


def exponential_schedule(target: float, steps: int) -> list[float]:
    if not 0 <= target < 1:
        raise DynapruneError(f"sparsity must lie in [0, 1), got {target}")
    if steps < 1:
        raise DynapruneError(f"steps must be a positive integer, got {steps}")
    return [1 - (1 - target) ** ((i + 1) / steps) for i in range(steps)]


def magnitude_step(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask keeping the largest |w| so that round(sparsity * numel) weights are zero (ties by index)."""
    k = round(sparsity * weight.numel())
    mask = torch.ones_like(weight, dtype=torch.bool)
    if k:
        drop = weight.detach().abs().flatten().argsort(stable=True)[:k]
        mask.view(-1)[drop] = False
    return mask


def magnitude_prune(model, target: float, steps: int = 1, between=None) -> list[float]:
    """Prune every block linear to ``target`` sparsity over ``steps`` steps; ``between(step)`` (e.g.
    recovery fine-tuning) runs after each step. Returns the schedule."""
    schedule = exponential_schedule(target, steps)
    linears = [mod for blk in model.layers for mod in blk.modules() if isinstance(mod, torch.nn.Linear)]
    for i, s in enumerate(schedule):
        with torch.no_grad():
            for lin in linears:
                lin.weight.mul_(magnitude_step(lin.weight, s))  # already-zero weights are the smallest
        if between is not None:
            between(i)
    return schedule

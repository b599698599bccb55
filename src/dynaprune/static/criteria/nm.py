"""N:M semi-structured sparsity (guide section 5): in every group of M consecutive weights along a
linear layer's input dimension keep the N largest |w| (2:4 is what sparse tensor cores run). Shapes stay
the same; only zeros are written, so without sparse kernels nothing gets faster."""

from __future__ import annotations

import torch

from dynaprune.errors import DynapruneError


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise DynapruneError(f"--nm must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 1 <= n < m:
        raise DynapruneError(f"--nm {text}: need 1 <= N < M")
    return n, m


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask (same shape) keeping the n largest |w| of every m consecutive inputs of each row."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise DynapruneError(f"N:M with M={m} needs the input width to be a multiple of M, got {in_f}")
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out_f, in_f)


def apply_nm(model, n: int, m: int) -> int:
    """Zero all but N of every M weights in each block's linear layers; returns how many were zeroed."""
    zeroed = 0
    linears = [mod for blk in model.layers for mod in blk.modules() if isinstance(mod, torch.nn.Linear)]
    masks = [nm_mask(lin.weight, n, m) for lin in linears]  # check every width before changing any
    with torch.no_grad():
        for lin, mask in zip(linears, masks, strict=True):
            lin.weight.mul_(mask)
            zeroed += int((~mask).sum())
    return zeroed

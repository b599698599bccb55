"""Pruned heads are not computed at all: their rows of the QKV projection and their columns of the
output projection are skipped too (SpAtten, Wang et al. HPCA 2021, Sec. III-B: "the pruned heads
are not fetched and computed"; Fig. 3 prunes a head's Q/K/V and its slice of the output).

A ``HeadPlan`` says which heads of each input row the next attention computes. Models ask the run
context for it (``ctx.head_plan()``, None = every head) and then project through it:

- ``HeadPlan.qkv`` runs the fused QKV projection on the weight rows of the heads alive in any row of
  the batch (one GEMM on a weight slice) and returns full-size (B, H, L, D) tensors with zeros for the
  other heads, so the KV cache layout, RoPE and the attention entry point stay as they are (a pruned
  head never comes back, so its zero K/V in the cache is never read);
- ``HeadPlan.output`` runs the output projection on the same heads' columns only: the attention
  already returned zeros for the heads a row pruned, so this equals the full projection.

Rows of a batch may keep different heads; the projections then run on the union of their heads. (A
per-row weight slice through ``bmm`` computes exactly each row's heads, but gathering B weight slices
cost more than it saved on short inputs: 2.4x slower than projecting every head for MiniLM at
64 x 13 tokens.) The weight slices are kept on the plan, which lives as long as the set of alive
heads: decode steps reuse them instead of slicing the weights again each step.

Fused QKV layout of every model here: rows [Q heads (Hq D) | K heads (Hkv D) | V heads (Hkv D)].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """(B, Hk) head indices -> (B, Hk * head_dim) feature indices of those heads, starting at ``offset``."""
    within = torch.arange(head_dim, device=heads.device)
    return (offset + heads[..., None] * head_dim + within).flatten(-2)


@dataclass
class HeadPlan:
    """The heads one attention computes, per input row (see the module docstring)."""

    query: torch.Tensor  # (B, Hk) query heads each row keeps, increasing
    projected: torch.Tensor  # (U,) query heads whose projections run: those alive in any row
    kv: torch.Tensor  # (G,) KV heads whose K and V are computed
    heads: int  # query heads of the model
    kv_heads: int
    head_dim: int
    qkv_rows: torch.Tensor  # rows of the fused QKV weight that run: Q of ``projected``, K and V of ``kv``
    out_columns: torch.Tensor  # columns of the output weight that run: those of ``projected``
    _weights: dict = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, query: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> HeadPlan:
        """Plan for the alive query heads ``query`` (B, Hk). A KV head's K and V are skipped only when
        every query head of its group is pruned in every row (always the case for a pruned group under
        ``head_unit=kv`` or MHA; query-head pruning under GQA mostly keeps every KV head)."""
        group, D = heads // kv_heads, head_dim
        alive = torch.zeros(heads, dtype=torch.bool, device=query.device)
        alive[query.flatten()] = True
        projected = alive.nonzero().flatten()
        kv = alive.view(kv_heads, group).any(-1).nonzero().flatten()
        k_rows, v_rows = head_rows(kv, D, heads * D), head_rows(kv, D, (heads + kv_heads) * D)
        qkv_rows = torch.cat([head_rows(projected, D), k_rows, v_rows])
        return cls(query, projected, kv, heads, kv_heads, head_dim, qkv_rows, head_rows(projected, D))

    @property
    def kv_computed(self) -> int:
        return self.kv.numel()

    def _slice(self, linear: nn.Linear, index: torch.Tensor, dim: int) -> tuple:
        """The weight (and bias) restricted to ``index`` along ``dim`` (0: output rows, 1: input columns),
        cached for the life of the plan."""
        if id(linear) not in self._weights:
            weight, bias = linear.weight, linear.bias
            w = weight.index_select(dim, index)
            b = bias.index_select(0, index) if (bias is not None and dim == 0) else bias
            self._weights[id(linear)] = (w, b)
        return self._weights[id(linear)]

    def qkv(self, x: torch.Tensor, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V (B, H, L, D) of a fused QKV projection, computed for the projected heads only."""
        B, L, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        w, b = self._slice(linear, self.qkv_rows, 0)
        hq, hk = self.projected.numel(), self.kv.numel()
        q_part, k_part, v_part = F.linear(x, w, b).split([hq * D, hk * D, hk * D], dim=-1)

        def full(part: torch.Tensor, index: torch.Tensor, n_heads: int) -> torch.Tensor:
            part = part.view(B, L, -1, D).transpose(1, 2)
            if part.shape[1] == n_heads:
                return part
            out = part.new_zeros(B, n_heads, L, D)
            out[:, index] = part
            return out

        return full(q_part, self.projected, H), full(k_part, self.kv, Hkv), full(v_part, self.kv, Hkv)

    def output(self, y: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The output projection of per-head outputs y (B, H, L, D) (zero for the heads a row pruned),
        over the projected heads' columns only."""
        B, _, L, D = y.shape
        alive = y.index_select(1, self.projected).transpose(1, 2).reshape(B, L, -1)
        w, b = self._slice(linear, self.out_columns, 1)
        return F.linear(alive, w, b)

"""Pruned heads are not computed at all: their rows of the QKV projection and their columns of the
output projection are skipped too (SpAtten, Wang et al. HPCA 2021, Sec. III-B: "the pruned heads
are not fetched and computed"; Fig. 3 prunes a head's Q/K/V and its slice of the output).

A ``HeadPlan`` says which heads of each input row the next attention computes. Models ask the run
context for it (``ctx.head_plan()``, None = every head) and then project through it:

- ``HeadPlan.qkv`` runs the fused QKV projection on the weight rows of the alive heads only (one GEMM
  on a gathered weight slice; per-row slices through ``bmm`` when rows keep different heads) and
  returns full-size (B, H, L, D) tensors with zeros for the pruned heads, so the KV cache layout, RoPE
  and the attention entry point stay as they are (a pruned head never comes back, so its zero K/V
  in the cache is never read);
- ``HeadPlan.output`` runs the output projection on the columns of the alive heads only.

The gathered weight slices are kept on the plan, which lives as long as the set of alive heads: decode
steps reuse them instead of gathering the weights again each step.

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

    query: torch.Tensor  # (B, Hk) query heads, increasing
    kv: torch.Tensor | None  # (B, Gk) KV heads whose K and V are computed; None = all of them
    heads: int  # query heads of the model
    kv_heads: int
    head_dim: int
    uniform: bool  # every row keeps the same heads: one weight slice serves the whole batch
    _weights: dict = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, query: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> HeadPlan:
        """Plan for the alive query heads ``query`` (B, Hk). K/V are skipped for a KV head only when
        its whole group of query heads is pruned and the alive heads come in whole groups (MHA, or
        ``head_unit=kv``); query-head pruning under GQA keeps every K/V head."""
        group = heads // kv_heads
        kv = None
        if query.shape[1] % group == 0:
            grouped = query.unflatten(1, (-1, group))
            if bool((grouped // group == grouped[..., :1] // group).all()):  # whole groups
                kv = grouped[..., 0] // group
                if kv.shape[1] == kv_heads:
                    kv = None
        uniform = query.shape[0] == 1 or bool((query == query[:1]).all())
        return cls(query, kv, heads, kv_heads, head_dim, uniform)

    @property
    def kv_computed(self) -> int:
        return self.kv_heads if self.kv is None else self.kv.shape[1]

    def _slice(self, key: str, linear: nn.Linear, index: torch.Tensor, dim: int) -> tuple:
        """The weight (and bias) restricted to ``index`` along ``dim`` (0: output rows, 1: input columns),
        one slice for a uniform batch or one per row, cached for the life of the plan."""
        cache_key = (key, id(linear))
        if cache_key not in self._weights:
            weight, bias = linear.weight, linear.bias
            if self.uniform:
                w = weight.index_select(dim, index[0])
                b = bias.index_select(0, index[0]) if (bias is not None and dim == 0) else bias
            elif dim == 0:
                w = weight[index].transpose(1, 2)  # (B, in, k): ready for bmm
                b = bias[index][:, None, :] if bias is not None else None
            else:
                w = weight.t()[index]  # (B, k, out)
                b = bias
            self._weights[cache_key] = (w, b)
        return self._weights[cache_key]

    def qkv(self, x: torch.Tensor, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V (B, H, L, D) of a fused QKV projection, computed for the alive heads only."""
        B, L, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        kv = self.kv if self.kv is not None else torch.arange(Hkv, device=x.device).expand(B, Hkv)
        rows = torch.cat([head_rows(self.query, D), head_rows(kv, D, H * D), head_rows(kv, D, (H + Hkv) * D)], 1)
        w, b = self._slice("qkv", linear, rows, 0)
        if self.uniform:
            y = F.linear(x, w, b)
        else:
            y = torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)
        hq, hk = self.query.shape[1], kv.shape[1]
        q_alive, k_alive, v_alive = y.split([hq * D, hk * D, hk * D], dim=-1)

        def full(alive: torch.Tensor, index: torch.Tensor, n_heads: int) -> torch.Tensor:
            alive = alive.view(B, L, -1, D).transpose(1, 2)
            if alive.shape[1] == n_heads:
                return alive
            out = alive.new_zeros(B, n_heads, L, D)
            return out.scatter(1, index[:, :, None, None].expand(-1, -1, L, D), alive)

        return full(q_alive, self.query, H), full(k_alive, kv, Hkv), full(v_alive, kv, Hkv)

    def output(self, y: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The output projection of per-head outputs y (B, H, L, D), over the alive heads' columns only."""
        B, _, L, D = y.shape
        alive = y.gather(1, self.query[:, :, None, None].expand(-1, -1, L, D))
        alive = alive.transpose(1, 2).reshape(B, L, -1)
        w, b = self._slice("out", linear, head_rows(self.query, D), 1)
        if self.uniform:
            return F.linear(alive, w, b)
        return torch.bmm(alive, w) if b is None else torch.baddbmm(b, alive, w)

"""Physical structured removal (pruning guide section 4): attention heads, FFN neurons, whole layers.

The projections are sliced so the model is really smaller (fewer rows/columns, fewer blocks) and the
config records the per-layer shapes, which our BERT and Llama code read back. Removing a head is exactly
the same as zeroing that head's output before the output projection (tests/static check it); removing
an FFN neuron is exactly zeroing its activation.

Llama (grouped-query attention): only query heads are removed and every KV group must keep as many
query heads as the others, so K/V projections and the KV cache keep their shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynaprune.errors import DynapruneError


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, rows.numel(), bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight.index_select(0, rows))
        if linear.bias is not None:
            out.bias.copy_(linear.bias.index_select(0, rows))
    return out.to(linear.weight.device, linear.weight.dtype)


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    out = nn.Linear(cols.numel(), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight.index_select(1, cols))
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out.to(linear.weight.device, linear.weight.dtype)


def _head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@dataclass
class Architecture:
    """Where one model family keeps its per-layer pieces (BERT: fused qkv/proj/fc1/fc2; Llama: wqkv/wo/w13/w2)."""

    model: nn.Module
    kind: str  # "bert" | "llama"

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    @property
    def head_dim(self) -> int:
        return self.model.config.head_dim

    @property
    def kv_heads(self) -> int | None:
        return self.model.config.kv_heads if self.kind == "llama" else None

    def heads(self, layer: int) -> int:
        blk = self.model.layers[layer]
        return blk.n_head if self.kind == "bert" else blk.attention.n_head

    def ffn_width(self, layer: int) -> int:
        blk = self.model.layers[layer]
        return blk.fc1.out_features if self.kind == "bert" else blk.feed_forward.w2.in_features

    def out_proj(self, layer: int) -> nn.Linear:
        """The linear whose input is the concatenated per-head outputs."""
        blk = self.model.layers[layer]
        return blk.proj if self.kind == "bert" else blk.attention.wo

    def ffn_down(self, layer: int) -> nn.Linear:
        """The linear whose input is the FFN's hidden activations (one column per neuron)."""
        blk = self.model.layers[layer]
        return blk.fc2 if self.kind == "bert" else blk.feed_forward.w2

    def sync_config(self) -> None:
        """Record the per-layer shapes the modules now have in the model's config."""
        cfg = self.model.config
        heads = [self.heads(i) for i in range(self.n_layers)]
        ffn = [self.ffn_width(i) for i in range(self.n_layers)]
        if self.kind == "bert":
            cfg.num_layers = self.n_layers
            cfg.layer_heads = None if all(h == cfg.num_heads for h in heads) else heads
            cfg.layer_intermediate = None if all(f == cfg.intermediate_size for f in ffn) else ffn
        else:
            cfg.layers = self.n_layers
            cfg.layer_heads = None if all(h == cfg.heads for h in heads) else heads
            cfg.layer_intermediate = None if all(f == cfg.intermediate for f in ffn) else ffn


def adapter(model: nn.Module) -> Architecture:
    from dynaprune.models.bert import Bert
    from dynaprune.models.llama import Llama

    if isinstance(model, Bert):
        return Architecture(model, "bert")
    if isinstance(model, Llama):
        return Architecture(model, "llama")
    raise DynapruneError(f"static pruning supports BERT and Llama-family models, not {type(model).__name__}")


def _index(keep: Sequence[int], n: int, what: str) -> torch.Tensor:
    idx = sorted(set(int(i) for i in keep))
    if any(not 0 <= i < n for i in idx):
        raise DynapruneError(f"{what}: indices must lie in [0, {n}), got {idx}")
    if not idx:
        raise DynapruneError(f"{what}: removing every one is not allowed (keep at least one)")
    return torch.tensor(idx, dtype=torch.long)


def remove_heads(model: nn.Module, layer: int, keep: Sequence[int]) -> None:
    """Keep only the attention heads ``keep`` of ``layer`` (indices in the layer's current heads)."""
    arch = adapter(model)
    n, D = arch.heads(layer), arch.head_dim
    idx = _index(keep, n, f"layer {layer} heads")
    blk = model.layers[layer]
    if arch.kind == "bert":
        width = n * D
        rows = torch.cat([_head_rows(idx, D, j * width) for j in range(3)])
        blk.qkv = _keep_rows(blk.qkv, rows)
        blk.proj = _keep_columns(blk.proj, _head_rows(idx, D))
        blk.n_head = idx.numel()
    else:
        att, kv = blk.attention, arch.kv_heads
        group = n // kv
        per_group = torch.bincount(idx // group, minlength=kv)
        if bool((per_group != per_group[0]).any()):
            raise DynapruneError(f"layer {layer}: every KV group must keep as many query heads "
                                 f"(kept per group: {per_group.tolist()})")
        q_width, kv_width = n * D, kv * D
        rows = torch.cat([_head_rows(idx, D), torch.arange(q_width, q_width + 2 * kv_width)])
        att.wqkv = _keep_rows(att.wqkv, rows)
        att.wo = _keep_columns(att.wo, _head_rows(idx, D))
        att.n_head = idx.numel()
        att.sizes = [idx.numel() * D, kv_width, kv_width]
    arch.sync_config()


def remove_ffn_neurons(model: nn.Module, layer: int, keep: Sequence[int]) -> None:
    """Keep only the FFN hidden neurons ``keep`` of ``layer``."""
    arch = adapter(model)
    width = arch.ffn_width(layer)
    idx = _index(keep, width, f"layer {layer} FFN neurons")
    blk = model.layers[layer]
    if arch.kind == "bert":
        blk.fc1 = _keep_rows(blk.fc1, idx)
        blk.fc2 = _keep_columns(blk.fc2, idx)
    else:
        ff = blk.feed_forward
        ff.w13 = _keep_rows(ff.w13, torch.cat([idx, idx + width]))  # gate rows, then up rows
        ff.w2 = _keep_columns(ff.w2, idx)
    arch.sync_config()


def remove_layers(model: nn.Module, layers: Sequence[int]) -> None:
    """Drop whole blocks (the residual stream passes them by)."""
    arch = adapter(model)
    drop = set(int(i) for i in layers)
    if any(not 0 <= i < arch.n_layers for i in drop):
        raise DynapruneError(f"layers to remove must lie in [0, {arch.n_layers}), got {sorted(drop)}")
    if len(drop) >= arch.n_layers:
        raise DynapruneError(f"removing {len(drop)} of {arch.n_layers} layers leaves none")
    model.layers = nn.ModuleList(b for i, b in enumerate(model.layers) if i not in drop)
    arch.sync_config()
    if arch.kind == "llama":
        model._rope = None

"""Preallocated per-layer KV cache for the decoders, ready for token pruning.

Each layer owns (B, Hkv, max_len, D) K and V buffers and its own length: once token pruning drops
tokens in some layers only, layers hold different numbers of tokens. K is stored AFTER RoPE, next to
the original position id of every cached token, so ``compact`` can drop pruned tokens with a plain
gather and the survivors keep their rotation. ``next_position`` (B,) counts the positions consumed by
the sequence so far and is independent of how many tokens a layer still holds.

Slots are not positions: ``max_len`` is the capacity in tokens held at once, and a sequence may run to
any position (the model's limit) as long as compaction keeps each layer within it. Decoding under a KV
budget therefore allocates budget + step slots (``generate.cache_capacity``), not the whole length.
"""

from __future__ import annotations

import torch

from dynaprune.errors import DynapruneError
from dynaprune.runtime import kvquant


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if max_len < 1 or batch < 1:
            raise DynapruneError(f"KV cache needs batch >= 1 and max_len >= 1 (got {batch}, {max_len})")
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.positions = [torch.zeros(batch, max_len, dtype=torch.long, device=device) for _ in range(n_layers)]
        # True for real tokens; left padding of a batch is stored as False and masked in attention.
        self.valid = [torch.ones(batch, max_len, dtype=torch.bool, device=device) for _ in range(n_layers)]
        self.has_padding = [False] * n_layers
        self.lengths = [0] * n_layers
        self.packed: list[kvquant.PackedLayer | None] = [None] * n_layers  # packed prefix per layer (kvquant.py)
        self.appended = [0] * n_layers  # slots ever appended: what a cache without eviction would hold
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def capacity(self) -> int:
        """Tokens each layer can hold at once (``max_len``), whatever the positions they carry."""
        return self.max_len

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.next_position.shape[0]

    def update(
        self,
        layer: int,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, L, D) keys/values; return views of everything layer ``layer`` holds.

        ``positions`` (B, L) are the original position ids of the new tokens (default: continue from
        ``next_position``); ``mask`` (B, L) bool marks real tokens (default all real).
        """
        n, start = k_new.shape[2], self.lengths[layer]
        end = start + n
        if end > self.max_len:
            raise DynapruneError(
                f"KV cache full: layer {layer} holds {start} tokens, {n} more would exceed max_len={self.max_len}"
            )
        self.k[layer][:, :, start:end] = k_new
        self.v[layer][:, :, start:end] = v_new
        if positions is None:
            positions = self.next_position[:, None] + torch.arange(n, device=k_new.device)
        self.positions[layer][:, start:end] = positions
        if mask is not None:
            self.valid[layer][:, start:end] = mask
            self.has_padding[layer] = self.has_padding[layer] or not bool(mask.all())
        else:
            self.valid[layer][:, start:end] = True
        self.lengths[layer] = end
        self.appended[layer] += n
        if self.packed[layer] is not None:  # a packed prefix is read back dequantized
            return kvquant.read_layer(self, layer, end)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def key_mask(self, layer: int) -> torch.Tensor | None:
        """(B, Lk) bool mask of the real cached tokens, or None when nothing is padding (faster SDPA)."""
        return self.valid[layer][:, : self.lengths[layer]] if self.has_padding[layer] else None

    def cached_positions(self, layer: int) -> torch.Tensor:
        return self.positions[layer][:, : self.lengths[layer]]

    def compact(self, layer: int, keep_index: torch.Tensor) -> None:
        """Keep only the tokens at ``keep_index`` (B, Lkeep) of ``layer``, gathered to the front in the
        given order (pass them sorted to keep the causal order). No re-rotation: K is stored post-RoPE."""
        kvquant.unpack_layer(self, layer)  # a packed prefix goes back to fp first: eviction regroups tokens
        length = self.lengths[layer]
        if keep_index.dim() != 2 or keep_index.shape[0] != self.batch:
            raise DynapruneError(f"keep_index must be (batch={self.batch}, Lkeep), got {tuple(keep_index.shape)}")
        if keep_index.numel() and (int(keep_index.min()) < 0 or int(keep_index.max()) >= length):
            raise DynapruneError(f"keep_index out of range for layer {layer} holding {length} tokens")
        n = keep_index.shape[1]
        idx = keep_index.to(self.k[layer].device)
        kv_idx = idx[:, None, :, None].expand(-1, self.k[layer].shape[1], -1, self.k[layer].shape[3])
        # gather into fresh tensors first: source and destination overlap in the buffer
        k = self.k[layer][:, :, :length].gather(2, kv_idx)
        v = self.v[layer][:, :, :length].gather(2, kv_idx)
        pos = self.positions[layer][:, :length].gather(1, idx)
        valid = self.valid[layer][:, :length].gather(1, idx)
        self.k[layer][:, :, :n] = k
        self.v[layer][:, :, :n] = v
        self.positions[layer][:, :n] = pos
        self.valid[layer][:, :n] = valid
        self.has_padding[layer] = not bool(valid.all())
        self.lengths[layer] = n

    def bytes_held(self, fp_bytes: int | None = None) -> int:
        """Bytes of K and V actually in use (the tokens held), not the preallocated capacity: a packed
        prefix counts its codes, scales and zero-points; ``fp_bytes`` counts the unpacked tokens at that
        width per element instead of the buffer's (2: the fp16 axis of ``runtime/cost.py``)."""
        return sum(kvquant.layer_bytes(self, layer, fp_bytes) for layer in range(self.n_layers))

    def pack_prefix(self, layer: int, n: int, spec) -> None:
        """Hold the first ``n`` tokens of ``layer`` packed (``spec``: a ``groupquant.KVQuantSpec``)."""
        kvquant.pack_layer(self, layer, n, spec)

    def dense_fp16_bytes(self) -> int:
        """Bytes a fp16 cache of every slot ever appended (nothing evicted or packed) would hold."""
        k = self.k[0]
        return sum(2 * k.shape[0] * k.shape[1] * n * k.shape[3] * 2 for n in self.appended)

    def bytes_allocated(self) -> int:
        """Bytes of the preallocated K and V buffers (capacity, not use)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def default_positions(
    input_ids: torch.Tensor, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Position ids (B, L) of new tokens: continue from ``cache.next_position`` (0 without a cache) and
    count real tokens only, so a left-padded row gets the same positions as the unpadded sequence."""
    b, n = input_ids.shape
    base = cache.next_position[:, None] if cache is not None else torch.zeros(b, 1, dtype=torch.long)
    base = base.to(input_ids.device)
    if attention_mask is None:
        return base + torch.arange(n, device=input_ids.device)
    return base + (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def advance_positions(cache: KVCache, positions: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """After a forward, move ``cache.next_position`` past the last real position each row used."""
    last = positions if attention_mask is None else positions.masked_fill(~attention_mask, -1)
    cache.next_position = torch.maximum(cache.next_position, last.max(dim=1).values + 1)

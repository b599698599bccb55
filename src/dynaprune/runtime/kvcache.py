"""Preallocated per-layer KV cache for the decoders, ready for token pruning.

Each layer owns (B, Hkv, max_len, D) K and V buffers and its own length: once token pruning drops
tokens in some layers only, layers hold different numbers of tokens. K is stored AFTER RoPE, next to
the original position id of every cached token, so ``compact`` can drop pruned tokens with a plain
gather and the survivors keep their rotation. ``next_position`` (B,) counts the positions consumed by
the sequence so far and is independent of how many tokens a layer still holds.

Per-KV-head eviction (``compact`` with a (B, Hkv, Lkeep) index) lets each KV head keep its own
tokens: the layer then also holds per-head positions and validity (``head_positions``/``head_valid``),
and ``key_mask`` becomes (B, Hkv, Lk) when heads keep different counts (padded with invalid slots).

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
        # per-KV-head state, only for layers compacted per head (None: every head holds the same tokens)
        self.head_positions: list[torch.Tensor | None] = [None] * n_layers  # (B, Hkv, max_len)
        self.head_valid: list[torch.Tensor | None] = [None] * n_layers  # (B, Hkv, max_len)
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
        if self.head_positions[layer] is not None:  # new tokens enter every head of a per-head layer
            self.head_positions[layer][:, :, start:end] = self.positions[layer][:, None, start:end]
            self.head_valid[layer][:, :, start:end] = self.valid[layer][:, None, start:end]
        self.lengths[layer] = end
        self.appended[layer] += n
        if self.packed[layer] is not None:  # a packed prefix is read back dequantized
            return kvquant.read_layer(self, layer, end)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def key_mask(self, layer: int) -> torch.Tensor | None:
        """(B, Lk) bool mask of the real cached tokens, or None when nothing is padding (faster SDPA);
        (B, Hkv, Lk) in a layer whose KV heads hold different numbers of tokens."""
        if not self.has_padding[layer]:
            return None
        if self.head_valid[layer] is not None:
            return self.head_valid[layer][:, :, : self.lengths[layer]]
        return self.valid[layer][:, : self.lengths[layer]]

    def cached_positions(self, layer: int) -> torch.Tensor:
        """(B, Lk) original positions of the cached tokens (head 0's in a layer compacted per head)."""
        return self.positions[layer][:, : self.lengths[layer]]

    def head_cached_positions(self, layer: int) -> torch.Tensor:
        """(B, Hkv, Lk) original positions of every KV head's cached tokens."""
        if self.head_positions[layer] is not None:
            return self.head_positions[layer][:, :, : self.lengths[layer]]
        return self.cached_positions(layer)[:, None, :].expand(-1, self.k[layer].shape[1], -1)

    def head_valid_mask(self, layer: int) -> torch.Tensor:
        """(B, Hkv, Lk) bool: the real tokens of every KV head."""
        if self.head_valid[layer] is not None:
            return self.head_valid[layer][:, :, : self.lengths[layer]]
        return self.valid[layer][:, None, : self.lengths[layer]].expand(-1, self.k[layer].shape[1], -1)

    def padding_slots(self, layer: int, start: int = 0) -> int:
        """Slots of ``layer`` (over batch and KV heads, from slot ``start``) that hold no real token of a
        per-head layer."""
        if self.head_valid[layer] is None:
            return 0
        return int((~self.head_valid[layer][:, :, start: self.lengths[layer]]).sum())

    def compact(self, layer: int, keep_index: torch.Tensor, keep_mask: torch.Tensor | None = None) -> None:
        """Keep only the tokens at ``keep_index`` of ``layer``, gathered to the front in the given order
        (pass them sorted to keep the causal order). No re-rotation: K is stored post-RoPE.

        ``keep_index`` (B, Lkeep): one token set for the layer; (B, Hkv, Lkeep): each KV head keeps its
        own tokens (the query heads of a GQA group share them). ``keep_mask`` (same shape, bool) marks
        the real kept entries when rows or heads keep different counts: the others become invalid slots,
        masked in attention and not counted by ``bytes_held``."""
        kvquant.unpack_layer(self, layer)  # a packed prefix goes back to fp first: eviction regroups tokens
        length, n_kv = self.lengths[layer], self.k[layer].shape[1]
        per_head = keep_index.dim() == 3
        shape_ok = keep_index.dim() in (2, 3) and keep_index.shape[0] == self.batch
        if not shape_ok or (per_head and keep_index.shape[1] != n_kv):
            raise DynapruneError(
                f"keep_index must be (batch={self.batch}, Lkeep) or (batch, kv_heads={n_kv}, Lkeep), "
                f"got {tuple(keep_index.shape)}")
        if keep_mask is not None and keep_mask.shape != keep_index.shape:
            raise DynapruneError(f"keep_mask {tuple(keep_mask.shape)} must match keep_index {tuple(keep_index.shape)}")
        if keep_index.numel() and (int(keep_index.min()) < 0 or int(keep_index.max()) >= length):
            raise DynapruneError(f"keep_index out of range for layer {layer} holding {length} tokens")
        n = keep_index.shape[-1]
        idx = keep_index.to(self.k[layer].device)
        head_idx = idx if per_head else idx[:, None, :].expand(-1, n_kv, -1)
        kv_idx = head_idx[..., None].expand(-1, -1, -1, self.k[layer].shape[3])
        # gather into fresh tensors first: source and destination overlap in the buffer
        k = self.k[layer][:, :, :length].gather(2, kv_idx)
        v = self.v[layer][:, :, :length].gather(2, kv_idx)
        self.k[layer][:, :, :n] = k
        self.v[layer][:, :, :n] = v
        if per_head or self.head_positions[layer] is not None:
            head_pos = self.head_cached_positions(layer).gather(2, head_idx)
            head_valid = self.head_valid_mask(layer).gather(2, head_idx)
            if keep_mask is not None:
                head_valid = head_valid & keep_mask.to(head_valid.device).expand(head_valid.shape)
            if self.head_positions[layer] is None:
                self.head_positions[layer] = torch.zeros_like(self.k[layer][..., 0], dtype=torch.long)
                self.head_valid[layer] = torch.ones_like(self.k[layer][..., 0], dtype=torch.bool)
            self.head_positions[layer][:, :, :n] = head_pos
            self.head_valid[layer][:, :, :n] = head_valid
            pos, valid = head_pos[:, 0], head_valid.any(dim=1)  # the layer view: head 0's positions
        else:
            pos = self.positions[layer][:, :length].gather(1, idx)
            valid = self.valid[layer][:, :length].gather(1, idx)
            if keep_mask is not None:
                valid = valid & keep_mask.to(valid.device)
            head_valid = valid
        self.positions[layer][:, :n] = pos
        self.valid[layer][:, :n] = valid
        self.has_padding[layer] = not bool(head_valid.all())
        self.lengths[layer] = n

    def bytes_held(self, fp_bytes: int | None = None) -> int:
        """Bytes of K and V actually in use (the tokens held), not the preallocated capacity: a packed
        prefix counts its codes, scales and zero-points; ``fp_bytes`` counts the unpacked tokens at that
        width per element instead of the buffer's (2: the fp16 axis of ``runtime/cost.py``)."""
        total = sum(kvquant.layer_bytes(self, layer, fp_bytes) for layer in range(self.n_layers))
        width = self.k[0].element_size() if fp_bytes is None else fp_bytes
        # slots padding a per-head layer (heads keeping fewer tokens) hold nothing real in the fp part; inside a
        # packed prefix their codes are stored (counted in the store's bytes), so nothing is taken off there
        return total - sum(2 * self.padding_slots(layer, kvquant.packed_tokens(self, layer)) * self.k[layer].shape[3]
                           * width for layer in range(self.n_layers))

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

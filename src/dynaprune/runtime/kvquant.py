"""The packed part of a KV cache layer: its first tokens group-quantized (``prune/groupquant.py``).

A layer of :class:`~dynaprune.runtime.kvcache.KVCache` may hold a packed prefix (``cache.packed[layer]``,
a :class:`PackedLayer`): its first ``tokens`` tokens as packed codes, scales and zero-points (fp16 or
8-bit, ``prune/scalequant.py``; Hadamard-rotated first if the spec says so), and only those. The fp
buffer slots of those tokens are overwritten with NaN when they are packed, so a read that bypassed
the packed form could not go unnoticed. The tokens after the prefix stay in the fp buffer (new
tokens, and a KIVI-style full-precision window of the newest ones).

- ``pack_layer``: quantize and pack tokens [packed, n) of a layer (n - packed a multiple of the key
  group, since a key group spans G consecutive tokens of a channel);
- ``read_layer``: what attention reads: the dequantized prefix followed by the fp tokens;
- ``unpack_layer``: back to fp before a compaction (eviction regroups the tokens; the survivors are
  packed again afterwards: the keys of a regrouped block are quantized a second time, from their
  dequantized values, so an evicting run's error can exceed one quantization's);
- ``layer_bytes``: the bytes one layer holds, packed prefix (codes + scales + zero-points) included.

Speed: every read dequantizes the whole prefix on the CPU; nothing is cached, so the packed form is
the only copy held between forwards. Not optimised: one SmolLM2 layer of 1536 tokens (3 KV heads x 64)
takes 15 ms at 4 bits, 13 ms at 8, 68 ms at 3 bits (codes straddle bytes) on one CPU thread, i.e.
~0.45 s of dequantization per decode step over 30 layers at 4 bits; under ``continue`` it is paid once
per chunk, under ``stream`` / ``generate`` once per step. ``KEEP_READ_COPY = True`` (for accuracy runs
of those protocols on a CPU, ``benchmarks/kv_bytes_protocols.py``) keeps a dequantized copy of each
packed block, made once when the block is packed: the same values are read (dequantization is
elementwise per block), the bytes axis still counts the packed form, and a step costs no dequantization.
"""

from __future__ import annotations

from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.groupquant import KVQuantSpec, PackedGroups, dequantize_kv, quantize_kv

KEEP_READ_COPY = False  # module docstring: a dequantized copy for CPU accuracy runs, same values read


def _cat(a: PackedGroups | None, b: PackedGroups, dim: int) -> PackedGroups:
    return b if a is None else a.cat(b, dim)


class PackedLayer:
    """The packed first ``tokens`` tokens of one cache layer: keys in blocks of ``key_group`` tokens
    (per channel), values per token (groups of ``value_group`` channels)."""

    def __init__(self, spec: KVQuantSpec, head_dim: int) -> None:
        self.spec, self.head_dim = spec, head_dim
        self.keys: PackedGroups | None = None
        self.values: PackedGroups | None = None
        self.tokens = 0
        self.read_copy: tuple[torch.Tensor, torch.Tensor] | None = None  # KEEP_READ_COPY only

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack (B, H, T, D) keys and values after the tokens already packed."""
        pk, pv = quantize_kv(k, v, self.spec)
        self.keys, self.values = _cat(self.keys, pk, 2), _cat(self.values, pv, 2)
        if KEEP_READ_COPY and (self.read_copy is not None or self.tokens == 0):
            dk, dv = (x.to(k.dtype) for x in dequantize_kv(pk, pv, self.spec, self.head_dim))
            old = self.read_copy
            self.read_copy = (dk, dv) if old is None else (torch.cat([old[0], dk], 2), torch.cat([old[1], dv], 2))
        self.tokens += k.shape[2]

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, tokens, D) keys and values as the packed codes give them back."""
        if self.read_copy is not None:
            return self.read_copy[0].to(dtype), self.read_copy[1].to(dtype)
        k, v = dequantize_kv(self.keys, self.values, self.spec, self.head_dim)
        return k.to(dtype), v.to(dtype)

    @property
    def nbytes(self) -> int:
        """Codes + scales + zero-points of K and V."""
        return (self.keys.nbytes if self.keys else 0) + (self.values.nbytes if self.values else 0)


def packed_tokens(cache: Any, layer: int) -> int:
    store = cache.packed[layer]
    return store.tokens if store is not None else 0


def pack_layer(cache: Any, layer: int, n: int, spec: KVQuantSpec) -> None:
    """Make the first ``n`` tokens of ``layer`` packed (no-op if they already are)."""
    store = cache.packed[layer]
    head_dim = cache.k[layer].shape[-1]
    if store is None:
        store = PackedLayer(spec, head_dim)
    elif store.spec != spec:
        raise DynapruneError(f"layer {layer} is packed as {store.spec}, cannot append {spec}")
    start = store.tokens
    if n <= start:
        return
    if n > cache.lengths[layer] or (n - start) % spec.key_group:
        raise DynapruneError(
            f"cannot pack tokens {start}..{n} of layer {layer} holding {cache.lengths[layer]} "
            f"in key groups of {spec.key_group} tokens"
        )
    store.append(cache.k[layer][:, :, start:n], cache.v[layer][:, :, start:n])
    cache.k[layer][:, :, start:n] = float("nan")  # only the packed form holds them now
    cache.v[layer][:, :, start:n] = float("nan")
    cache.packed[layer] = store


def read_layer(cache: Any, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, H, end, D) keys and values attention reads: dequantized prefix ++ fp tokens."""
    store = cache.packed[layer]
    k, v = store.dequantize(cache.k[layer].dtype)
    return (
        torch.cat([k, cache.k[layer][:, :, store.tokens : end]], 2),
        torch.cat([v, cache.v[layer][:, :, store.tokens : end]], 2),
    )


def unpack_layer(cache: Any, layer: int) -> None:
    """Write the dequantized prefix back into the fp buffer and drop the packed form."""
    store = cache.packed[layer]
    if store is None:
        return
    k, v = store.dequantize(cache.k[layer].dtype)
    cache.k[layer][:, :, : store.tokens] = k
    cache.v[layer][:, :, : store.tokens] = v
    cache.packed[layer] = None


def layer_bytes(cache: Any, layer: int, fp_bytes: int | None = None) -> int:
    """Bytes of K and V ``layer`` holds: the packed prefix's codes, scales and zero-points, and the fp
    tokens at ``fp_bytes`` an element (default: the buffer's own element size; 2 for the fp16 axis)."""
    k = cache.k[layer]
    fp_tokens = cache.lengths[layer] - packed_tokens(cache, layer)
    width = k.element_size() if fp_bytes is None else fp_bytes
    store = cache.packed[layer]
    return 2 * k.shape[0] * k.shape[1] * fp_tokens * k.shape[3] * width + (store.nbytes if store else 0)

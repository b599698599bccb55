"""Quantized, packed K/V cache: ``kv_bits=B`` (or ``kv_key_bits`` / ``kv_value_bits``), ``kv_group=G``,
``kv_value_group``, ``kv_residual=R`` (KIVI, Liu et al. 2024, Sec. 3: keys per channel, values per
token, a full-precision window of the newest tokens), ``kv_scale_bits=8|16`` (scales and zero-points in
8 bits with a fp16 step and base per row, QLoRA's double quantization: ``prune/scalequant.py``) and
``kv_rotate=k|v|kv`` (K and/or V stored Hadamard-rotated, QuaRot-style: ``prune/hadamard.py``).

After every decoder forward (role ``kvstore``: after the KV budget has evicted, so only the survivors
are packed) each layer's cached tokens but the newest ``R`` are group-quantized to B bits and packed
(``prune/groupquant.py``, stored by ``runtime/kvquant.py``), in whole key groups of G tokens (a key's
scale and zero-point are per channel over G consecutive tokens); what does not fill a group stays in
full precision until it does. Values are grouped per token over ``kv_value_group`` channels (default
G), which must divide the head dimension. Attention reads the dequantized codes; the prompt's own
forward attends in full precision (it runs before anything is packed), as KIVI and transformers'
quantized cache do. Cost: the K/V bytes held and read, scales and zero-points included
(``cost.kv_bytes_vs_fp16``, ``runtime/cost.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynaprune.prune import keys as K
from dynaprune.prune.groupquant import MAX_BITS, KVQuantSpec
from dynaprune.prune.technique import Stage, Technique

# Defaults chosen on WikiText-2 valid (benchmarks/results/kv-quant.json, SmolLM2, continue 1536 + 512): at 4
# bits groups of 64 beat 32 and 128 (13.070 vs 13.085 / 13.097); a full-precision window of 64 tokens
# gains 0.008 perplexity for +0.03 of the fp16 bytes, 128 tokens no more: it does not pay by default.
DEFAULT_KV_GROUP = 64
DEFAULT_KV_RESIDUAL = 0
DEFAULT_KV_SCALE_BITS = 16


def check_scale_bits(key: str, value: Any) -> int:
    value = K.as_int(key, value)
    if value not in (8, 16):
        raise K.err(key, f"scales and zero-points are stored in 8 or 16 bits, got {value}")
    return value


def check_bits(key: str, value: Any) -> int:
    value = K.as_int(key, value)
    if not 1 <= value <= MAX_BITS:
        raise K.err(key, f"{value} bits is outside 1..{MAX_BITS}")
    return value


@dataclass(frozen=True)
class KVQuantization(Technique):
    """``kv_bits``: bits of the cached K and V (``kv_key_bits`` / ``kv_value_bits`` apart); ``kv_group``:
    tokens per key group (and channels per value group unless ``kv_value_group``); ``kv_residual``:
    newest tokens kept in full precision."""

    kv_bits: int | None = None
    kv_key_bits: int | None = None
    kv_value_bits: int | None = None
    kv_group: int | None = None
    kv_value_group: int | None = None
    kv_residual: int | None = None
    kv_scale_bits: int | None = None
    kv_rotate: str | None = None

    role = "kvstore"
    keys = (
        K.Key("kv_bits", K.parse_int, check_bits),
        K.Key("kv_key_bits", K.parse_int, check_bits),
        K.Key("kv_value_bits", K.parse_int, check_bits),
        K.Key("kv_group", K.parse_int, K.at_least(1, integer=True)),
        K.Key("kv_value_group", K.parse_int, K.at_least(1, integer=True)),
        K.Key("kv_residual", K.parse_int, K.at_least(0, integer=True)),
        K.Key("kv_scale_bits", K.parse_int, check_scale_bits),
        K.Key("kv_rotate", K.parse_word, K.choice("k", "v", "kv")),
    )

    def check(self) -> None:
        if self.key_bits is None or self.value_bits is None:
            named = next(k.name for k in self.keys if getattr(self, k.name) is not None)
            raise K.err(named, "a quantized KV cache needs kv_bits (or both kv_key_bits and kv_value_bits)")

    @property
    def key_bits(self) -> int | None:
        return self.kv_key_bits if self.kv_key_bits is not None else self.kv_bits

    @property
    def value_bits(self) -> int | None:
        return self.kv_value_bits if self.kv_value_bits is not None else self.kv_bits

    def spec(self, head_dim: int) -> KVQuantSpec:
        """The storage of K and V for a model of this head dimension (refused: a value group not dividing it)."""
        group = self.kv_group if self.kv_group is not None else DEFAULT_KV_GROUP
        value_group = self.kv_value_group if self.kv_value_group is not None else group
        if head_dim % value_group:
            key = "kv_value_group" if self.kv_value_group is not None else "kv_group"
            hint = "" if key == "kv_value_group" else f" (set kv_value_group to a divisor of {head_dim})"
            raise K.err(
                key,
                f"{value_group} does not divide head_dim={head_dim}: values are quantized per "
                f"token in groups of channels{hint}",
            )
        scale_bits = self.kv_scale_bits if self.kv_scale_bits is not None else DEFAULT_KV_SCALE_BITS
        if self.kv_rotate and head_dim & (head_dim - 1):
            raise K.err("kv_rotate", f"a Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
        return KVQuantSpec(self.key_bits, self.value_bits, group, value_group, scale_bits, self.kv_rotate or "")

    def stage(self, run) -> Stage | None:
        return KVQuantStage(self, run)


class KVQuantStage(Stage):
    name = "kvstore"

    def __init__(self, technique: KVQuantization, run) -> None:
        super().__init__(technique, run)
        self.spec = technique.spec(run.shape.head_dim)  # a bad group is refused when the context is made
        self.residual = technique.kv_residual if technique.kv_residual is not None else DEFAULT_KV_RESIDUAL

    def end_forward(self, cache) -> None:
        """Pack every layer's tokens but the newest ``residual``, in whole key groups."""
        if cache is None:
            return
        group = self.spec.key_group
        for layer in range(cache.n_layers):
            n = (cache.lengths[layer] - self.residual) // group * group
            if n > 0:
                cache.pack_prefix(layer, n, self.spec)

"""The Llama-family configuration (``LlamaConfig``): read from a transformers ``config.json`` dict
(Llama, Mistral, Qwen2 variants, rope scaling, biases, sliding window) and written back to one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynaprune.errors import DynapruneError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tie_embeddings: bool = False
    rope_scaling: dict | None = None  # None, {"rope_type": "linear"|"llama3", ...}
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # refused beyond it, see module docstring
    arch: str = "llama"
    # a statically pruned checkpoint (dynaprune prune): query heads / FFN width per layer; None = uniform
    layer_heads: list[int] | None = None
    layer_intermediate: list[int] | None = None
    static_record: dict | None = None  # config.json's dynaprune_static: what dynaprune prune removed

    def heads_of(self, layer: int) -> int:
        return self.heads if self.layer_heads is None else self.layer_heads[layer]

    def ffn_of(self, layer: int) -> int:
        return self.intermediate if self.layer_intermediate is None else self.layer_intermediate[layer]

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        arch = d.get("model_type", "llama")
        if arch not in SUPPORTED_TYPES:
            raise DynapruneError(f"model_type {arch!r} is not a Llama-family model ({', '.join(SUPPORTED_TYPES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise DynapruneError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        rope = dict(d.get("rope_parameters") or {})  # transformers 5 layout
        rope.update(d.get("rope_scaling") or {})  # transformers 4 layout
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(rope["factor"])}
        elif rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        elif rope_type != "default":
            raise DynapruneError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise DynapruneError("partial rotary embeddings are not supported")
        window = None
        if arch == "mistral" or (arch == "qwen2" and d.get("use_sliding_window")):
            window = d.get("sliding_window")
        heads = d["num_attention_heads"]
        attn_bias = bool(d.get("attention_bias", False))
        from dynaprune.static.shapes import per_layer_shapes, read_static_record  # pruned checkpoints

        layer_heads, layer_ffn = per_layer_shapes(d, d["num_hidden_layers"], heads, d.get("num_key_value_heads"))
        return cls(
            static_record=read_static_record(d),
            layer_heads=layer_heads,
            layer_intermediate=layer_ffn,
            vocab=d["vocab_size"],
            hidden=d["hidden_size"],
            layers=d["num_hidden_layers"],
            heads=heads,
            kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate=d["intermediate_size"],
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_positions=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            qkv_bias=arch == "qwen2" or attn_bias,
            o_bias=attn_bias and arch != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            arch=arch,
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers config dict (used by ``Llama.to_transformers``)."""
        d = {
            "model_type": self.arch, "vocab_size": self.vocab, "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate, "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_positions, "tie_word_embeddings": self.tie_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "mlp_bias": self.mlp_bias,
            "attention_bias": self.o_bias,
        }
        if self.sliding_window is not None:
            d.update(sliding_window=self.sliding_window, use_sliding_window=True)
        if self.layer_heads is not None:  # a statically pruned model (static/shapes.py)
            d["dynaprune_layer_heads"] = self.layer_heads
        if self.layer_intermediate is not None:
            d["dynaprune_layer_intermediate"] = self.layer_intermediate
        if self.static_record is not None:
            d["dynaprune_static"] = self.static_record
        return d

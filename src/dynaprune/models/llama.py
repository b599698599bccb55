"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), compact in the style of gpt-fast's model.py.

Loads HF checkpoint folders (safetensors) and llama.cpp GGUF files. Q/K/V and gate/up projections
are fused into one matmul each (fewer, larger GEMMs); attention always goes through
``runtime.attention`` and the block loop through ``ctx.between_layers`` so pruning stays outside.
Mistral / Qwen2 sliding-window attention is not implemented: inputs longer than the window are
refused rather than computed with full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import assign_weights, read_hf_folder, strip_prefix
from dynaprune.runtime.attention import DENSE, RunContext, attention
from dynaprune.runtime.kvcache import KVCache, advance_positions, default_positions

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
        return cls(
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
        return d


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, computed exactly as transformers does (fp32), with linear/llama3 scaling."""
    d = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = c.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
    factor, lo, hi, old = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.sizes = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.wqkv = nn.Linear(c.hidden, sum(self.sizes), bias=c.qkv_bias)
        self.wo = nn.Linear(c.heads * c.head_dim, c.hidden, bias=c.o_bias)

    def forward(self, x, cos, sin, layer, positions, mask, cache, ctx):
        b, n, _ = x.shape
        c = self.c
        plan = ctx.head_plan()  # pruned heads: their projections are skipped
        if plan is None:
            q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
            q = q.view(b, n, c.heads, c.head_dim).transpose(1, 2)
            k = k.view(b, n, c.kv_heads, c.head_dim).transpose(1, 2)
            v = v.view(b, n, c.kv_heads, c.head_dim).transpose(1, 2)
        else:
            q, k, v = plan.qkv(x, self.wqkv)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        key_mask = mask
        if cache is not None:  # keys are cached after RoPE, so pruning the cache never re-rotates
            k, v = cache.update(layer, k, v, positions=positions, mask=mask)
            key_mask = cache.key_mask(layer)
        if c.sliding_window is not None and k.shape[2] > c.sliding_window:
            raise DynapruneError(
                f"sequence of {k.shape[2]} tokens exceeds the sliding window ({c.sliding_window}), "
                "which dynaprune does not implement"
            )
        y = attention(q, k, v, layer=layer, ctx=ctx, key_padding_mask=key_mask, causal=True)
        if plan is not None:
            return plan.output(y, self.wo)
        return self.wo(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.w13 = nn.Linear(c.hidden, 2 * c.intermediate, bias=c.mlp_bias)  # gate and up, fused
        self.w2 = nn.Linear(c.intermediate, c.hidden, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden, c.rms_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.hidden, c.rms_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin, layer, positions, mask, cache, ctx):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, positions, mask, cache, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass
class LazyTokenizer:
    """The tokenizer transformers builds from a GGUF's metadata (chat template included), made on demand."""

    gguf_path: Path

    def load(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.gguf_path.parent), gguf_file=self.gguf_path.name)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, tokenizer=None, name: str = "llama"):
        super().__init__()
        self.config = config
        self.name = name
        self._tokenizer = tokenizer
        self.tok_embeddings = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_eps)
        self.output = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def tokenizer(self):
        if isinstance(self._tokenizer, LazyTokenizer):  # GGUF tokenizers take seconds to build: on first use
            self._tokenizer = self._tokenizer.load()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def rope_tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (n', head_dim) for positions < n' (>= n), grown by doubling when needed."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != device:
            size = min(self.config.max_positions, max(n, 1 << max(n - 1, 1).bit_length(), 4096))
            freqs = torch.arange(size, device=device).float()[:, None] * rope_inv_freq(self.config).to(device)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope = (emb.cos(), emb.sin())
        return self._rope

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.tok_embeddings.weight
        return KVCache(self.config.layers, batch, self.config.kv_heads, self.config.head_dim, max_len,
                       dtype=w.dtype, device=w.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ctx: RunContext | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, L, V) fp32 (or (B, 1, V) with ``last_only``, as a prefill needs).

        ``attention_mask`` (B, L) True = real token; padded positions are masked as keys and default
        positions count real tokens only (left padding gives the unpadded positions).
        """
        ctx = ctx or DENSE
        ctx.begin_forward(cache)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: let SDPA run unmasked
        if positions is None:
            positions = default_positions(input_ids, cache, attention_mask)
        if positions.numel() and int(positions.max()) >= self.config.max_positions:
            raise DynapruneError(
                f"position {int(positions.max())} exceeds the model's maximum of {self.config.max_positions}"
            )
        cos_t, sin_t = self.rope_tables(int(positions.max()) + 1 if positions.numel() else 1, input_ids.device)
        x = self.tok_embeddings(input_ids)
        keep: dict[str, torch.Tensor] = {"positions": positions}
        if attention_mask is not None:
            keep["mask"] = attention_mask
        pos = None
        for i, block in enumerate(self.layers):
            if keep["positions"] is not pos:  # gather cos/sin again only after tokens were pruned
                pos = keep["positions"]
                cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]  # (B, 1, L, D), broadcast over heads
            mask = keep.get("mask")
            x = block(x, cos, sin, i, pos, mask, cache, ctx)
            x, keep = ctx.between_layers(i, x, keep)
            if "mask" in keep:  # keep padding rows finite whatever the attention backend does with them
                x = x.masked_fill(~keep["mask"][..., None], 0.0)
        if cache is not None:
            advance_positions(cache, positions, attention_mask)
        ctx.end_forward(cache)  # where a KV-budget context evicts cached tokens
        ctx.count_lm_head(x, keep.get("mask"), last_only)  # the LM head's FLOPs belong to the run's cost
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def generate(self, prompt, **kwargs):
        """See ``dynaprune.runtime.generate.generate``."""
        from dynaprune.runtime.generate import generate

        return generate(self, prompt, **kwargs)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_hf_state(cls, config: LlamaConfig, state: dict[str, torch.Tensor], *, tokenizer=None,
                      name: str = "llama", source: str = "checkpoint") -> Llama:
        """Build from an HF-named state dict (``model.layers.N.self_attn.q_proj.weight``, ...)."""
        sd = strip_prefix(state, ("model.",))
        c = config
        out: dict[str, torch.Tensor] = {}

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise DynapruneError(f"{source}: missing tensor {key!r} for a {c.arch} model")
            return sd.pop(key)

        out["tok_embeddings.weight"] = take("embed_tokens.weight")
        out["norm.weight"] = take("norm.weight")
        if c.tie_embeddings:
            sd.pop("lm_head.weight", None)
            out["output.weight"] = out["tok_embeddings.weight"]
        else:
            out["output.weight"] = take("lm_head.weight")
        for i in range(c.layers):
            p = q = f"layers.{i}."
            a = p + "self_attn."
            out[q + "attention.wqkv.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
            if c.qkv_bias:
                out[q + "attention.wqkv.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
            out[q + "attention.wo.weight"] = take(a + "o_proj.weight")
            if c.o_bias:
                out[q + "attention.wo.bias"] = take(a + "o_proj.bias")
            m = p + "mlp."
            out[q + "feed_forward.w13.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
            out[q + "feed_forward.w2.weight"] = take(m + "down_proj.weight")
            if c.mlp_bias:
                out[q + "feed_forward.w13.bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
                out[q + "feed_forward.w2.bias"] = take(m + "down_proj.bias")
            out[q + "attention_norm.weight"] = take(p + "input_layernorm.weight")
            out[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise DynapruneError(f"{source}: unexpected tensors, e.g. {leftover[:3]} (not a {c.arch} checkpoint?)")
        with torch.device("meta"):  # no random init: every weight comes from the checkpoint
            model = cls(c, tokenizer=tokenizer, name=name)
        assign_weights(model, out, source)
        if c.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.eval()

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Llama:
        """Load an HF checkpoint folder (config.json + *.safetensors; pickles are refused)."""
        tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        config, state, tokenizer, folder = read_hf_folder(path, tokenizer_files)
        return cls.from_hf_state(LlamaConfig.from_hf(config), state, tokenizer=tokenizer, name=folder.name,
                                 source=str(folder))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Llama:
        """Load a llama.cpp GGUF file (llama / qwen2), dequantized to fp32; tokenizer from its metadata."""
        from dynaprune.models.gguf_loader import read_gguf

        path = Path(path)
        cfg, state = read_gguf(path)
        config = LlamaConfig.from_hf(cfg)

        tokenizer = LazyTokenizer(path)
        return cls.from_hf_state(config, state, tokenizer=tokenizer, name=path.stem, source=str(path))

    def to_transformers(self):
        """The same weights in a transformers ``*ForCausalLM`` (the test oracle and the speed baseline)."""
        import transformers

        c = self.config
        cls_name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[c.arch]
        hf_cfg = getattr(transformers, f"{cls_name}Config")(**c.to_hf())
        hf = getattr(transformers, f"{cls_name}ForCausalLM")(hf_cfg).float().eval()
        sd = {"model.embed_tokens.weight": self.tok_embeddings.weight, "model.norm.weight": self.norm.weight,
              "lm_head.weight": self.output.weight}
        qs, ks, _ = self.layers[0].attention.sizes
        for i, blk in enumerate(self.layers):
            p = f"model.layers.{i}."
            for part in ("weight", "bias"):
                fused = getattr(blk.attention.wqkv, part)
                if fused is not None:
                    for x, t in zip("qkv", fused.split([qs, ks, ks]), strict=True):
                        sd[p + f"self_attn.{x}_proj.{part}"] = t
                if getattr(blk.attention.wo, part) is not None:
                    sd[p + f"self_attn.o_proj.{part}"] = getattr(blk.attention.wo, part)
                if getattr(blk.feed_forward.w13, part) is not None:
                    gate, up = getattr(blk.feed_forward.w13, part).chunk(2)
                    sd[p + f"mlp.gate_proj.{part}"], sd[p + f"mlp.up_proj.{part}"] = gate, up
                    sd[p + f"mlp.down_proj.{part}"] = getattr(blk.feed_forward.w2, part)
            sd[p + "input_layernorm.weight"] = blk.attention_norm.weight
            sd[p + "post_attention_layernorm.weight"] = blk.ffn_norm.weight
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
        if c.tie_embeddings:
            hf.tie_weights()
        return hf

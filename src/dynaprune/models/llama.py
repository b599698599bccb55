"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), compact in the style of gpt-fast's model.py.

Loads HF checkpoint folders (safetensors) and llama.cpp GGUF files. Q/K/V and gate/up projections
are fused into one matmul each (fewer, larger GEMMs); attention always goes through
``runtime.attention`` and the block loop through ``ctx.between_layers`` so pruning stays outside.
Mistral / Qwen2 sliding-window attention is not implemented: inputs longer than the window are
refused rather than computed with full attention.

The configuration is ``llama_config.py``; checkpoint name conversion (HF / GGUF tensors in,
transformers out) and the lazy GGUF tokenizer are ``llama_checkpoint.py``; both re-exported here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import assign_weights, read_hf_folder
from dynaprune.models.llama_checkpoint import LazyTokenizer, llama_state_from_hf, llama_to_transformers
from dynaprune.models.llama_config import SUPPORTED_TYPES, LlamaConfig
from dynaprune.prune.tokens import last_real_token
from dynaprune.runtime.attention import DENSE, RunContext, attention
from dynaprune.runtime.kvcache import KVCache, advance_positions, default_positions

__all__ = ["SUPPORTED_TYPES", "LazyTokenizer", "Llama", "LlamaConfig"]


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
    def __init__(self, c: LlamaConfig, layer: int = 0):
        super().__init__()
        self.c = c
        self.n_head = c.heads_of(layer)  # fewer query heads once statically pruned (dynaprune prune)
        self.sizes = [self.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.wqkv = nn.Linear(c.hidden, sum(self.sizes), bias=c.qkv_bias)
        self.wo = nn.Linear(self.n_head * c.head_dim, c.hidden, bias=c.o_bias)

    def forward(self, x, cos, sin, layer, positions, mask, cache, ctx):
        b, n, _ = x.shape
        c = self.c
        plan = ctx.head_plan()  # pruned heads: their projections are skipped
        if plan is None:
            q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
            q = q.view(b, n, self.n_head, c.head_dim).transpose(1, 2)
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
    def __init__(self, c: LlamaConfig, layer: int = 0):
        super().__init__()
        self.w13 = nn.Linear(c.hidden, 2 * c.ffn_of(layer), bias=c.mlp_bias)  # gate and up, fused
        self.w2 = nn.Linear(c.ffn_of(layer), c.hidden, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden, c.rms_eps)
        self.attention = Attention(c, layer)
        self.ffn_norm = RMSNorm(c.hidden, c.rms_eps)
        self.feed_forward = FeedForward(c, layer)

    def forward(self, x, cos, sin, layer, positions, mask, cache, ctx):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, positions, mask, cache, ctx)
        return x + self.feed_forward(self.ffn_norm(x))

class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, tokenizer=None, name: str = "llama"):
        super().__init__()
        self.config = config
        self.name = name
        self._tokenizer = tokenizer
        self.tok_embeddings = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.layers))
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
            x = last_real_token(x, keep.get("mask"))
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
        out = llama_state_from_hf(config, state, source)
        with torch.device("meta"):  # no random init: every weight comes from the checkpoint
            model = cls(config, tokenizer=tokenizer, name=name)
        assign_weights(model, out, source)
        if config.tie_embeddings:
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
        return llama_to_transformers(self)

"""GPT-2 decoder, compact in the style of nanoGPT's model.py.

Learned absolute positions at the input (so a pruned token keeps its position embedding), pre-LN
blocks, tied LM head. HF GPT-2 checkpoints store ``Conv1D`` weights as (in, out): we transpose them
once at load into ``nn.Linear`` layout. Attention goes through ``runtime.attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import assign_weights, read_hf_folder, strip_prefix
from dynaprune.prune.tokens import last_real_token
from dynaprune.runtime.attention import DENSE, RunContext, attention
from dynaprune.runtime.kvcache import KVCache, advance_positions, default_positions

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class GPT2Config:
    vocab: int = 50257
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    ln_eps: float = 1e-5
    max_positions: int = 1024
    activation: str = "gelu_new"
    tie_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_by_layer: bool = False  # scale_attn_by_inverse_layer_idx

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_heads(self) -> int:
        return self.heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        if d.get("model_type", "gpt2") != "gpt2":
            raise DynapruneError(f"model_type {d.get('model_type')!r} is not GPT-2")
        act = d.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise DynapruneError(f"activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if d.get("add_cross_attention"):
            raise DynapruneError("GPT-2 with cross-attention is not supported")
        hidden = d.get("n_embd", 768)
        return cls(
            vocab=d.get("vocab_size", 50257),
            hidden=hidden,
            layers=d.get("n_layer", 12),
            heads=d.get("n_head", 12),
            intermediate=d.get("n_inner") or 4 * hidden,
            ln_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            max_positions=d.get("n_positions", 1024),
            activation=act,
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
            scale_by_layer=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
        )


class Block(nn.Module):
    def __init__(self, c: GPT2Config, layer: int):
        super().__init__()
        self.c = c
        self.ln_1 = nn.LayerNorm(c.hidden, eps=c.ln_eps)
        self.c_attn = nn.Linear(c.hidden, 3 * c.hidden)
        self.c_proj = nn.Linear(c.hidden, c.hidden)
        self.ln_2 = nn.LayerNorm(c.hidden, eps=c.ln_eps)
        self.c_fc = nn.Linear(c.hidden, c.intermediate)
        self.mlp_proj = nn.Linear(c.intermediate, c.hidden)
        self.act = ACTIVATIONS[c.activation]
        self.scale = (c.head_dim**-0.5 if c.scale_attn_weights else 1.0) / (layer + 1 if c.scale_by_layer else 1)

    def forward(self, x, layer, positions, mask, cache, ctx):
        b, n, _ = x.shape
        h, d = self.c.heads, self.c.head_dim
        plan = ctx.head_plan()  # pruned heads: their projections are skipped
        if plan is None:
            q, k, v = self.c_attn(self.ln_1(x)).split(self.c.hidden, dim=-1)
            q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = plan.qkv(self.ln_1(x), self.c_attn)
        key_mask = mask
        if cache is not None:
            k, v = cache.update(layer, k, v, positions=positions, mask=mask)
            key_mask = cache.key_mask(layer)
        y = attention(q, k, v, layer=layer, ctx=ctx, key_padding_mask=key_mask, causal=True, scale=self.scale)
        x = x + (self.c_proj(y.transpose(1, 2).reshape(b, n, -1)) if plan is None else plan.output(y, self.c_proj))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config, tokenizer=None, name: str = "gpt2"):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.max_positions, config.hidden)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden, eps=config.ln_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config.layers, batch, self.config.heads, self.config.head_dim, max_len,
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
        """Logits (B, L, V) fp32; same contract as ``Llama.forward``."""
        ctx = ctx or DENSE
        ctx.begin_forward(cache)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None
        if positions is None:
            positions = default_positions(input_ids, cache, attention_mask)
        if positions.numel() and int(positions.max()) >= self.config.max_positions:
            raise DynapruneError(
                f"position {int(positions.max())} exceeds the model's maximum of {self.config.max_positions}"
            )
        x = self.wte(input_ids) + self.wpe(positions)
        keep: dict[str, torch.Tensor] = {"positions": positions}
        if attention_mask is not None:
            keep["mask"] = attention_mask
        for i, block in enumerate(self.h):
            x = block(x, i, keep["positions"], keep.get("mask"), cache, ctx)
            x, keep = ctx.between_layers(i, x, keep)
            if "mask" in keep:  # keep padding rows finite whatever the attention backend does with them
                x = x.masked_fill(~keep["mask"][..., None], 0.0)
        if cache is not None:
            advance_positions(cache, positions, attention_mask)
        ctx.end_forward(cache)  # where a KV-budget context evicts cached tokens
        ctx.count_lm_head(x, keep.get("mask"), last_only)  # the LM head's FLOPs belong to the run's cost
        if last_only:
            x = last_real_token(x, keep.get("mask"))
        return self.lm_head(self.ln_f(x)).float()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def generate(self, prompt, **kwargs):
        """See ``dynaprune.runtime.generate.generate``."""
        from dynaprune.runtime.generate import generate

        return generate(self, prompt, **kwargs)

    @classmethod
    def from_hf_state(cls, config: GPT2Config, state: dict[str, torch.Tensor], *, tokenizer=None,
                      name: str = "gpt2", source: str = "checkpoint") -> GPT2:
        sd = strip_prefix(state, ("transformer.",))
        c = config

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise DynapruneError(f"{source}: missing tensor {key!r} for a GPT-2 model")
            return sd.pop(key)

        out = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
               "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}
        if c.tie_embeddings:
            sd.pop("lm_head.weight", None)
            out["lm_head.weight"] = out["wte.weight"]
        else:
            out["lm_head.weight"] = take("lm_head.weight")
        conv = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
        for i in range(c.layers):
            p = f"h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[p + f"{ln}.weight"], out[p + f"{ln}.bias"] = take(p + f"{ln}.weight"), take(p + f"{ln}.bias")
            for theirs, ours in conv.items():
                out[p + f"{ours}.weight"] = take(p + f"{theirs}.weight").t()  # Conv1D (in, out) -> Linear
                out[p + f"{ours}.bias"] = take(p + f"{theirs}.bias")
            sd.pop(p + "attn.bias", None)  # causal-mask buffers of old checkpoints
            sd.pop(p + "attn.masked_bias", None)
        if sd:
            raise DynapruneError(f"{source}: unexpected tensors, e.g. {list(sd)[:3]} (not a GPT-2 checkpoint?)")
        with torch.device("meta"):
            model = cls(c, tokenizer=tokenizer, name=name)
        assign_weights(model, out, source)
        if c.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        return model.eval()

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> GPT2:
        """Load an HF GPT-2 checkpoint folder (config.json + *.safetensors; pickles are refused)."""
        tokenizer_files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
        config, state, tokenizer, folder = read_hf_folder(path, tokenizer_files)
        return cls.from_hf_state(GPT2Config.from_hf(config), state, tokenizer=tokenizer, name=folder.name,
                                 source=str(folder))

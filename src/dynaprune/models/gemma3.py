"""Gemma 3 text decoder (google/gemma-3-270m and kin), compact, from a llama.cpp GGUF.

Differences from ``llama.py``: one KV head shared by all query heads, RMS norms that scale by (1 + w)
before and after both attention and FFN, Q/K norms over each head before RoPE, a GELU-tanh gated FFN,
embeddings scaled by sqrt(hidden), a tied LM head, a query scale of ``query_pre_attn_scalar ** -0.5``,
and two kinds of layers: sliding-window layers (a query sees its ``window`` latest keys, itself
included; RoPE base 10,000) and, every ``pattern``-th layer, global layers (RoPE base 1,000,000).

Every layer goes through ``runtime.attention`` (so every recipe applies); a sliding layer passes its
window, which masks a prompt longer than it, and after each forward the model evicts from a sliding
layer's KV cache every token the next query can no longer see (``ctx.compact_cache``, so state a pruning
context keeps per cached token follows), so such a layer never holds more than ``window - 1`` tokens
between forwards (a packed, quantized layer: until a key group expired, ``runtime/sliding.py``) and
attends to at most ``window`` keys. The work counter counts what it attends. The window
is one of positions: once tokens were pruned (a prefill selection keeps survivors at their original
positions) the query at p sees the keys with p - window < pos <= p (``sliding_window``), not the latest
``window`` survivors.

The GGUF lacks a few Gemma 3 constants (the sliding-window pattern, the local RoPE base, the query
scale); they are read when present and default to the values of every Gemma 3 text model (6, 10,000,
head_dim) as llama.cpp does. llama.cpp stores the norm weights as 1 + w; we keep w, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import assign_weights
from dynaprune.models.llama import rotate_half
from dynaprune.prune.tokens import last_real_token
from dynaprune.runtime.attention import DENSE, RunContext, attention
from dynaprune.runtime.kvcache import KVCache, advance_positions, default_positions
from dynaprune.runtime.sliding import defer_eviction, sliding_window, window_keep


@dataclass
class Gemma3Config:
    vocab: int = 262144
    hidden: int = 640
    layers: int = 18
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    intermediate: int = 2048
    rms_eps: float = 1e-6
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    sliding_window: int = 512
    pattern: int = 6  # every pattern-th layer is global, the others slide
    query_scalar: float = 256.0  # scores are scaled by query_scalar ** -0.5
    max_positions: int = 32768
    bos_id: int = 2
    eos_id: int = 1

    def is_sliding(self, layer: int) -> bool:
        return (layer + 1) % self.pattern != 0

    def window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` sees at most (None: all of them)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def to_hf(self) -> dict:
        """The transformers ``Gemma3TextConfig`` keyword arguments (the test oracle)."""
        return dict(
            vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate, rms_norm_eps=self.rms_eps, sliding_window=self.sliding_window,
            layer_types=["sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.layers)],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local},
                             "full_attention": {"rope_type": "default", "rope_theta": self.rope_global}},
            query_pre_attn_scalar=int(self.query_scalar),  # an int in every Gemma 3 config
            max_position_embeddings=self.max_positions,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=self.bos_id,
            eos_token_id=self.eos_id, pad_token_id=0, attn_logit_softcapping=None, final_logit_softcapping=None,
        )


class RMSNorm(nn.Module):
    """Gemma's RMS norm: x / rms(x) * (1 + w), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: Gemma3Config, layer: int):
        super().__init__()
        self.c, self.window = c, c.window(layer)
        self.sizes = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.wqkv = nn.Linear(c.hidden, sum(self.sizes), bias=False)
        self.wo = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_eps)

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
        q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        key_mask, key_pos = mask, positions
        if cache is not None:  # keys are cached after RoPE, so pruning the cache never re-rotates
            k, v = cache.update(layer, k, v, positions=positions, mask=mask)
            key_mask = cache.key_mask(layer)
            per_head = cache.head_positions[layer] is not None  # compacted per KV head: each head's positions
            key_pos = cache.head_cached_positions(layer) if per_head else cache.cached_positions(layer)
        y = attention(q, k, v, layer=layer, ctx=ctx, key_padding_mask=key_mask, causal=True,
                      scale=c.query_scalar**-0.5, window=sliding_window(self.window, positions, key_pos))
        if plan is not None:
            return plan.output(y, self.wo)
        return self.wo(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.w13 = nn.Linear(c.hidden, 2 * c.intermediate, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, c: Gemma3Config, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden, c.rms_eps)
        self.attention = Attention(c, layer)
        self.post_attention_norm = RMSNorm(c.hidden, c.rms_eps)
        self.ffn_norm = RMSNorm(c.hidden, c.rms_eps)
        self.feed_forward = FeedForward(c)
        self.post_ffn_norm = RMSNorm(c.hidden, c.rms_eps)

    def forward(self, x, cos, sin, layer, positions, mask, cache, ctx):
        a = self.attention(self.attention_norm(x), cos, sin, layer, positions, mask, cache, ctx)
        x = x + self.post_attention_norm(a)
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config, tokenizer=None, name: str = "gemma3"):
        super().__init__()
        self.config = config
        self.name = name
        self._tokenizer = tokenizer
        self.tok_embeddings = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_eps)
        self.output = nn.Linear(config.hidden, config.vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        self._rope: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    requires_bos = True  # Gemma is trained with <bos> first: scoring text without it is far off

    @property
    def tokenizer(self):
        if callable(getattr(self._tokenizer, "load", None)):  # built from the GGUF on first use
            self._tokenizer = self._tokenizer.load()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def rope_tables(self, base: float, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (n', head_dim) of RoPE base ``base`` for positions < n' (>= n), fp32 as transformers."""
        table = self._rope.get(base)
        if table is None or table[0].shape[0] < n or table[0].device != device:
            d = self.config.head_dim
            size = min(self.config.max_positions, max(n, 1 << max(n - 1, 1).bit_length(), 4096))
            inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            freqs = torch.arange(size, device=device).float()[:, None] * inv.to(device)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope[base] = table = (emb.cos(), emb.sin())
        return table

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.tok_embeddings.weight
        cache = KVCache(self.config.layers, batch, self.config.kv_heads, self.config.head_dim, max_len,
                        dtype=w.dtype, device=w.device)
        # the sliding layers' windows, for the cost of a dense cache (runtime/pruning.py)
        cache.windows = {i: w for i in range(self.config.layers) if (w := self.config.window(i)) is not None}
        return cache

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
        """Logits (B, L, V) fp32 (or (B, 1, V) with ``last_only``); as ``Llama.forward``."""
        c = self.config
        ctx = ctx or DENSE
        ctx.begin_forward(cache)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: let SDPA run unmasked
        if positions is None:
            positions = default_positions(input_ids, cache, attention_mask)
        if positions.numel() and int(positions.max()) >= c.max_positions:
            raise DynapruneError(f"position {int(positions.max())} exceeds the model's maximum of {c.max_positions}")
        n = int(positions.max()) + 1 if positions.numel() else 1
        tables = {base: self.rope_tables(base, n, input_ids.device) for base in (c.rope_local, c.rope_global)}
        x = self.tok_embeddings(input_ids)
        x = x * torch.tensor(math.sqrt(c.hidden), dtype=x.dtype)  # rounded to the weights' dtype, as Gemma
        keep: dict[str, torch.Tensor] = {"positions": positions}
        if attention_mask is not None:
            keep["mask"] = attention_mask
        pos, rope = None, {}
        for i, block in enumerate(self.layers):
            if keep["positions"] is not pos:  # gather cos/sin again only after tokens were pruned
                pos = keep["positions"]
                rope = {base: (cos[pos][:, None], sin[pos][:, None]) for base, (cos, sin) in tables.items()}
            cos, sin = rope[c.rope_local if c.is_sliding(i) else c.rope_global]
            x = block(x, cos, sin, i, pos, keep.get("mask"), cache, ctx)
            x, keep = ctx.between_layers(i, x, keep)
            if "mask" in keep:  # keep padding rows finite whatever the attention backend does with them
                x = x.masked_fill(~keep["mask"][..., None], 0.0)
        if cache is not None:
            advance_positions(cache, positions, attention_mask)
            self._evict_outside_windows(cache, ctx)
        ctx.end_forward(cache)  # where a KV-budget context evicts cached tokens
        ctx.count_lm_head(x, keep.get("mask"), last_only)
        if last_only:
            x = last_real_token(x, keep.get("mask"))
        return self.output(self.norm(x)).float()

    def _evict_outside_windows(self, cache: KVCache, ctx: RunContext) -> None:
        """Sliding layers drop the tokens no later query can see (before a KV budget ranks the rest). A
        layer with a packed (quantized) prefix drops them a key group at a time: every compaction packs the
        survivors again from their dequantized values, so evicting one expired token a step would quantize
        each token some ``window`` times over; meanwhile the mask by position hides them (counted held)."""
        for layer in range(self.config.layers):
            window = self.config.window(layer)
            found = window_keep(cache, layer, window) if window is not None else None
            if found is not None and not defer_eviction(cache, layer, found):
                ctx.compact_cache(cache, layer, *found)
            if window is not None:  # a dense cache of this layer holds a window too (runtime/cost.py)
                cache.appended[layer] = min(cache.appended[layer], window - 1)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def generate(self, prompt, **kwargs):
        """See ``dynaprune.runtime.generate.generate``."""
        from dynaprune.runtime.generate import generate

        return generate(self, prompt, **kwargs)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Gemma3:
        """Load a llama.cpp ``gemma3`` GGUF, dequantized to fp32; tokenizer from its vocabulary."""
        from dynaprune.models.gemma3_gguf import GemmaTokenizerLoader, read_gemma3_gguf

        path = Path(path)
        fields, state, vocabulary = read_gemma3_gguf(path)
        config = Gemma3Config(**fields)
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = cls(config, tokenizer=GemmaTokenizerLoader(vocabulary), name=path.stem)
        state["output.weight"] = state["tok_embeddings.weight"]  # tied (strict loading wants both names)
        assign_weights(model, state, str(path))
        model.output.weight = model.tok_embeddings.weight
        return model.eval()

    def to_transformers(self):
        """The same weights in transformers' ``Gemma3ForCausalLM`` (the test oracle)."""
        import transformers

        c = self.config
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**c.to_hf())).float().eval()
        sd = {"model.embed_tokens.weight": self.tok_embeddings.weight, "model.norm.weight": self.norm.weight}
        qs, ks, _ = self.layers[0].attention.sizes
        names = {"attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}
        for i, blk in enumerate(self.layers):
            p = f"model.layers.{i}."
            for x, t in zip("qkv", blk.attention.wqkv.weight.split([qs, ks, ks]), strict=True):
                sd[p + f"self_attn.{x}_proj.weight"] = t
            sd[p + "self_attn.o_proj.weight"] = blk.attention.wo.weight
            sd[p + "self_attn.q_norm.weight"] = blk.attention.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = blk.attention.k_norm.weight
            gate, up = blk.feed_forward.w13.weight.chunk(2)
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
            sd[p + "mlp.down_proj.weight"] = blk.feed_forward.w2.weight
            for ours, theirs in names.items():
                sd[p + f"{theirs}.weight"] = getattr(blk, ours).weight
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        return hf

"""Llama checkpoint conversion: HF-named tensors (safetensors folders, GGUF files read by
``gguf_loader``) to the fused names of ``models/llama.py`` and back to a transformers ``*ForCausalLM``
(the test oracle and the speed baseline), and the GGUF tokenizer built on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import strip_prefix
from dynaprune.models.llama_config import LlamaConfig


@dataclass
class LazyTokenizer:
    """The tokenizer transformers builds from a GGUF's metadata (chat template included), made on demand."""

    gguf_path: Path

    def load(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.gguf_path.parent), gguf_file=self.gguf_path.name)


def llama_state_from_hf(config: LlamaConfig, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """This model's state dict from an HF-named one (``model.layers.N.self_attn.q_proj.weight``, ...):
    Q/K/V and gate/up fused; a missing or unexpected tensor is an error naming ``source``."""
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
    return out


def llama_to_transformers(model):
    """The same weights as ``model`` (a ``Llama``) in a transformers ``*ForCausalLM``."""
    import transformers

    c = model.config
    cls_name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[c.arch]
    hf_cfg = getattr(transformers, f"{cls_name}Config")(**c.to_hf())
    hf = getattr(transformers, f"{cls_name}ForCausalLM")(hf_cfg).float().eval()
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    qs, ks, _ = model.layers[0].attention.sizes
    for i, blk in enumerate(model.layers):
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

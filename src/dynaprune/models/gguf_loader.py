"""Reading llama.cpp GGUF files into a Hugging Face style (config dict, fp32 state dict).

The GGUF is parsed with the ``gguf`` package and every tensor dequantized to fp32. Names are mapped
back to the HF Llama/Qwen2 layout, so ``Llama.from_gguf`` shares the loading path of HF folders.
llama.cpp's converter permutes the rows of Q and K (and their biases) of ``llama`` models so its RoPE
can rotate adjacent pairs; we undo that here, exactly as transformers' own GGUF integration does
(``LlamaTensorProcessor._reverse_permute_weights``). Qwen2 files are not permuted (NeoX-style RoPE).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from dynaprune.errors import DynapruneError

SUPPORTED_ARCHS = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise DynapruneError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many kinds (ValueError, IndexError, struct errors...)
        raise DynapruneError(
            f"{path}: not a readable GGUF file, corrupt or truncated ({type(e).__name__}: {e})"
        ) from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (weights or biases): per head, the rows were reordered
    from [first half, second half] to interleaved pairs; put them back in HF's rotate-half order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_config(reader, path: Path) -> dict:
    """The HF-style config dict (Llama/Qwen2 keys) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise DynapruneError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def need(key: str):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise DynapruneError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer KV head counts (hybrid models) are not supported
        raise DynapruneError(f"{path}: per-layer KV head counts are not supported")
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "intermediate_size": int(need("feed_forward_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        if factor is None:
            raise DynapruneError(f"{path}: RoPE scaling {scaling!r} without {arch}.rope.scaling.factor")
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(factor)}
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is not None:
        cfg["vocab_size"] = int(vocab)
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf] = int(v)
    return cfg


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF-style config dict, HF-named fp32 state dict) of a llama/qwen2 GGUF file."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = _open(path)
    cfg = gguf_config(reader, path)
    permute = cfg["model_type"] == "llama"
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        m = _BLOCK.fullmatch(t.name)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            raise DynapruneError(f"{path}: unsupported GGUF tensor {t.name!r} (e.g. RoPE frequency factors)")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            w = dequantize(t.data, t.tensor_type)
            w = np.require(w, np.float32, ["C", "W"]).reshape(shape)  # copies only read-only/strided data
        except Exception as e:
            raise DynapruneError(
                f"{path}: tensor {t.name} cannot be read, file corrupt or truncated ({type(e).__name__}: {e})"
            ) from None
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            n = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            w = np.ascontiguousarray(unpermute_rope_rows(w, n))
        state[name] = torch.from_numpy(w)
    if "model.embed_tokens.weight" not in state:
        raise DynapruneError(f"{path}: GGUF has no token_embd.weight")
    cfg.setdefault("vocab_size", state["model.embed_tokens.weight"].shape[0])
    cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    return cfg, state


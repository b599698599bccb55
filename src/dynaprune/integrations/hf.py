"""A live transformers model in and out: ``from_transformers`` wraps a BERT / Llama / Mistral / Qwen2 /
GPT-2 model as ours *sharing its weights*, ``to_transformers`` goes back (a copy: the test oracle).

Sharing: a tensor both layouts store the same way is the very same ``nn.Parameter``; GPT-2's ``Conv1D``
weights (in, out) become a transposed view (same storage); where we fuse projections (Q/K/V, gate/up)
the fused tensor is built once and the transformers model's projections are re-pointed to views of it,
so after the call both models read one copy and an edit through either is seen by the other.
"""

from __future__ import annotations

import torch
from torch import nn

from dynaprune.errors import DynapruneError

SUPPORTED = ("bert", "gpt2", "llama", "mistral", "qwen2")
HALF = (torch.float16, torch.bfloat16)


def _param(root: nn.Module, name: str) -> nn.Parameter:
    try:
        p = root.get_parameter(name)
    except AttributeError:
        raise DynapruneError(f"transformers model has no parameter {name!r} (an unusual variant?)") from None
    return p


def _set(ours: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = ours.get_submodule(mod_name)
    want = getattr(mod, attr)
    if want.shape != value.shape:
        got, expected = tuple(value.shape), tuple(want.shape)
        raise DynapruneError(f"{name}: transformers tensor has shape {got}, expected {expected}")
    mod._parameters[attr] = value


def _share(ours: nn.Module, hf: nn.Module, name: str, sources: list[str], transpose: bool = False) -> None:
    """Point our parameter ``name`` at the transformers ``sources`` (one: same Parameter / transposed view;
    several: one fused tensor, the sources re-pointed to its slices)."""
    src = [_param(hf, s) for s in sources]
    if len(src) == 1 and not transpose:
        _set(ours, name, src[0])
    elif transpose:
        _set(ours, name, nn.Parameter(src[0].detach().t(), requires_grad=src[0].requires_grad))
    else:
        fused = nn.Parameter(torch.cat([p.detach() for p in src]), requires_grad=src[0].requires_grad)
        _set(ours, name, fused)
        start = 0
        for p in src:
            p.data = fused.data[start:start + p.shape[0]]
            start += p.shape[0]


def _check_model(hf_model: nn.Module) -> str:
    config = getattr(hf_model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        kind = type(hf_model).__name__ + (f" (model_type {arch!r})" if arch else "")
        raise DynapruneError(f"{kind} is not supported by from_transformers; supported: {', '.join(SUPPORTED)}")
    params = list(hf_model.parameters())
    if any(p.device.type == "meta" for p in params):
        raise DynapruneError("the transformers model has weights on the meta device (not loaded yet)")
    half = [p for p in params if p.dtype in HALF and p.device.type == "cpu"]
    if half:
        raise DynapruneError(
            f"the transformers model is in {half[0].dtype} on CPU, where half precision is slow or unsupported; "
            "call hf_model.float() first (or move it to a GPU)"
        )
    return arch


def _body(hf_model: nn.Module, prefix: str) -> tuple[nn.Module, str]:
    """The transformers module holding the backbone, and the prefix its parameter names carry."""
    names = {n for n, _ in hf_model.named_parameters()}
    return hf_model, (prefix + ".") if any(n.startswith(prefix + ".") for n in names) else ""


def _llama(hf_model: nn.Module, tokenizer):
    from dynaprune.models.llama import Llama
    from dynaprune.models.llama_config import LlamaConfig

    config = LlamaConfig.from_hf(hf_model.config.to_dict())
    _, p = _body(hf_model, "model")
    with torch.device("meta"):
        ours = Llama(config, tokenizer=tokenizer, name=getattr(hf_model.config, "name_or_path", "") or config.arch)
    _share(ours, hf_model, "tok_embeddings.weight", [p + "embed_tokens.weight"])
    _share(ours, hf_model, "norm.weight", [p + "norm.weight"])
    if config.tie_embeddings or not any(n == "lm_head.weight" for n, _ in hf_model.named_parameters()):
        ours.output.weight = ours.tok_embeddings.weight
    else:
        _share(ours, hf_model, "output.weight", ["lm_head.weight"])
    for i in range(config.layers):
        h, o = f"{p}layers.{i}.", f"layers.{i}."
        parts = ["weight"] + (["bias"] if config.qkv_bias else [])
        for t in parts:
            _share(ours, hf_model, o + f"attention.wqkv.{t}", [h + f"self_attn.{x}_proj.{t}" for x in "qkv"])
        for t in ["weight"] + (["bias"] if config.o_bias else []):
            _share(ours, hf_model, o + f"attention.wo.{t}", [h + f"self_attn.o_proj.{t}"])
        for t in ["weight"] + (["bias"] if config.mlp_bias else []):
            _share(ours, hf_model, o + f"feed_forward.w13.{t}", [h + f"mlp.gate_proj.{t}", h + f"mlp.up_proj.{t}"])
            _share(ours, hf_model, o + f"feed_forward.w2.{t}", [h + f"mlp.down_proj.{t}"])
        _share(ours, hf_model, o + "attention_norm.weight", [h + "input_layernorm.weight"])
        _share(ours, hf_model, o + "ffn_norm.weight", [h + "post_attention_layernorm.weight"])
    return ours


def _gpt2(hf_model: nn.Module, tokenizer):
    from dynaprune.models.gpt2 import GPT2, GPT2Config

    config = GPT2Config.from_hf(hf_model.config.to_dict())
    _, p = _body(hf_model, "transformer")
    with torch.device("meta"):
        ours = GPT2(config, tokenizer=tokenizer, name=getattr(hf_model.config, "name_or_path", "") or "gpt2")
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        _share(ours, hf_model, name, [p + name])
    if config.tie_embeddings or not any(n == "lm_head.weight" for n, _ in hf_model.named_parameters()):
        ours.lm_head.weight = ours.wte.weight
    else:
        _share(ours, hf_model, "lm_head.weight", ["lm_head.weight"])
    conv = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
    for i in range(config.layers):
        h, o = f"{p}h.{i}.", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            for t in ("weight", "bias"):
                _share(ours, hf_model, o + f"{ln}.{t}", [h + f"{ln}.{t}"])
        for theirs, mine in conv.items():
            _share(ours, hf_model, o + f"{mine}.weight", [h + f"{theirs}.weight"], transpose=True)  # Conv1D
            _share(ours, hf_model, o + f"{mine}.bias", [h + f"{theirs}.bias"])
    return ours


def _bert(hf_model: nn.Module, tokenizer):
    from dynaprune.models.bert import Bert, BertConfig

    config = BertConfig.from_hf(hf_model.config.to_dict())
    _, p = _body(hf_model, "bert")
    with torch.device("meta"):
        ours = Bert(config)
    e = p + "embeddings."
    for mine, theirs in (("tok_emb", "word_embeddings"), ("pos_emb", "position_embeddings"),
                         ("type_emb", "token_type_embeddings")):
        _share(ours, hf_model, mine + ".weight", [e + theirs + ".weight"])
    for t in ("weight", "bias"):
        _share(ours, hf_model, f"emb_ln.{t}", [e + f"LayerNorm.{t}"])
    for i in range(config.num_layers):
        h, o = f"{p}encoder.layer.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            _share(ours, hf_model, o + f"qkv.{t}", [h + f"attention.self.{n}.{t}" for n in ("query", "key", "value")])
            for mine, theirs in (("proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                                 ("fc1", "intermediate.dense"), ("fc2", "output.dense"), ("ln2", "output.LayerNorm")):
                _share(ours, hf_model, o + f"{mine}.{t}", [h + f"{theirs}.{t}"])
    ours.name = getattr(hf_model.config, "name_or_path", "") or "bert"
    ours.tokenizer = tokenizer
    lower = getattr(tokenizer, "do_lower_case", None)
    if lower is not None:
        ours.lowercase = bool(lower)
    return ours


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "mistral": _llama, "qwen2": _llama}


def from_transformers(hf_model: nn.Module, tokenizer=None) -> nn.Module:
    """Our model (``Bert``, ``Llama`` or ``GPT2``) over the weights of a live transformers model, shared, not
    copied: the transformers model's fused projections are re-pointed at our fused tensors. Its task heads
    (a BERT classifier, a pooler) are not carried over. Raises ``DynapruneError`` for an unsupported
    architecture or a half-precision model on CPU."""
    arch = _check_model(hf_model)
    ours = BUILDERS[arch](hf_model, tokenizer)
    left = [n for n, t in list(ours.named_parameters()) + list(ours.named_buffers()) if t.device.type == "meta"]
    if left:
        raise DynapruneError(f"from_transformers: no transformers tensor for {left[:3]} (an unusual variant?)")
    return ours.eval()


def to_transformers(model: nn.Module) -> nn.Module:
    """A transformers model with ``model``'s weights (copied): ``*ForCausalLM`` for decoders, ``BertModel``
    for BERT (its last hidden state is what ``Bert.forward`` returns, densely)."""
    from dynaprune.models.bert import Bert
    from dynaprune.models.gpt2 import GPT2
    from dynaprune.models.llama import Llama

    if isinstance(model, Llama):
        return model.to_transformers()
    if isinstance(model, GPT2):
        return _gpt2_out(model)
    if isinstance(model, Bert):
        return _bert_out(model)
    raise DynapruneError(f"to_transformers: {type(model).__name__} is not a BERT, Llama-family or GPT-2 model")


def _load(hf: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(("attn.bias", "masked_bias"))]
    if missing or unexpected:
        raise DynapruneError(f"to_transformers: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


def _gpt2_out(model) -> nn.Module:
    import transformers

    c = model.config
    cfg = transformers.GPT2Config(
        vocab_size=c.vocab, n_embd=c.hidden, n_layer=c.layers, n_head=c.heads, n_inner=c.intermediate,
        layer_norm_epsilon=c.ln_eps, n_positions=c.max_positions, activation_function=c.activation,
        tie_word_embeddings=c.tie_embeddings, scale_attn_weights=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_by_layer,
    )
    hf = transformers.GPT2LMHeadModel(cfg).to(model.wte.weight.device)
    sd = {"lm_head.weight": model.lm_head.weight}
    conv = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
    for name, t in model.state_dict().items():
        sd["transformer." + name] = t
    for i in range(c.layers):
        for theirs, mine in conv.items():
            sd.pop(f"transformer.h.{i}.{mine}.weight")
            sd.pop(f"transformer.h.{i}.{mine}.bias")
            sd[f"transformer.h.{i}.{theirs}.weight"] = getattr(model.h[i], mine).weight.t()
            sd[f"transformer.h.{i}.{theirs}.bias"] = getattr(model.h[i], mine).bias
    sd.pop("transformer.lm_head.weight", None)
    hf = _load(hf, sd)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


def _bert_out(model) -> nn.Module:
    import transformers

    c = model.config
    if c.layer_heads is not None or c.layer_intermediate is not None:
        raise DynapruneError("to_transformers: a statically pruned BERT (per-layer widths) has no transformers form")
    cfg = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act, pad_token_id=c.pad_token_id,
    )
    hf = transformers.BertModel(cfg, add_pooling_layer=False).to(model.tok_emb.weight.device)
    sd = {"embeddings.word_embeddings.weight": model.tok_emb.weight,
          "embeddings.position_embeddings.weight": model.pos_emb.weight,
          "embeddings.token_type_embeddings.weight": model.type_emb.weight,
          "embeddings.LayerNorm.weight": model.emb_ln.weight, "embeddings.LayerNorm.bias": model.emb_ln.bias}
    for i, blk in enumerate(model.layers):
        h = f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            for n, part in zip(("query", "key", "value"), getattr(blk.qkv, t).chunk(3), strict=True):
                sd[h + f"attention.self.{n}.{t}"] = part
            for mine, theirs in (("proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                                 ("fc1", "intermediate.dense"), ("fc2", "output.dense"), ("ln2", "output.LayerNorm")):
                sd[h + f"{theirs}.{t}"] = getattr(getattr(blk, mine), t)
    return _load(hf, sd)

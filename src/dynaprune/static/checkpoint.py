"""Writing a statically pruned model as an HF-style folder (safetensors + config.json), atomically.

Tensor names are transformers' (BERT: ``encoder.layer.N.attention.self.query.weight`` ...; Llama:
``model.layers.N.self_attn.q_proj.weight`` ...) with the pruned shapes; config.json carries the
per-layer shapes (``static/shapes.py``) and a record of what was removed, so ``dynaprune.load`` rebuilds
the smaller model and refuses tensors that disagree with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dynaprune.errors import DynapruneError
from dynaprune.io import atomic_folder
from dynaprune.static.shapes import FFN_KEY, HEADS_KEY, RECORD_KEY
from dynaprune.static.structured import adapter


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise DynapruneError(f"{out} already exists; choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise DynapruneError(f"{out} exists and is not a folder; it is not overwritten")
    if not out.parent.exists():
        raise DynapruneError(f"{out.parent}: no such folder for the output")
    return out


def _bert_state(model) -> dict[str, torch.Tensor]:
    s = model.state_dict()
    out = {"embeddings.word_embeddings.weight": s["tok_emb.weight"],
           "embeddings.position_embeddings.weight": s["pos_emb.weight"],
           "embeddings.token_type_embeddings.weight": s["type_emb.weight"],
           "embeddings.LayerNorm.weight": s["emb_ln.weight"], "embeddings.LayerNorm.bias": s["emb_ln.bias"]}
    for i in range(len(model.layers)):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), s[o + "qkv." + t].chunk(3), strict=True):
                out[p + f"attention.self.{name}.{t}"] = part
            out[p + f"attention.output.dense.{t}"] = s[o + "proj." + t]
            out[p + f"attention.output.LayerNorm.{t}"] = s[o + "ln1." + t]
            out[p + f"intermediate.dense.{t}"] = s[o + "fc1." + t]
            out[p + f"output.dense.{t}"] = s[o + "fc2." + t]
            out[p + f"output.LayerNorm.{t}"] = s[o + "ln2." + t]
    if getattr(model, "head", None) is not None:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = s["head.pooler.weight"], s["head.pooler.bias"]
        out["classifier.weight"], out["classifier.bias"] = s["head.classifier.weight"], s["head.classifier.bias"]
    return out


def _bert_config(model) -> dict:
    c = model.config
    d = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
         "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
         "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps, "hidden_act": c.hidden_act,
         "pad_token_id": c.pad_token_id, "position_embedding_type": "absolute"}
    head = getattr(model, "head", None)
    if head is not None:  # the fine-tuned classifier's head travels with the pruned encoder
        from dynaprune.finetune.checkpoint import hf_config

        full = hf_config(model)
        d.update({k: full[k] for k in ("architectures", "id2label", "label2id", "dynaprune", "problem_type")})
    return d


def _llama_state(model) -> dict[str, torch.Tensor]:
    s, c = model.state_dict(), model.config
    out = {"model.embed_tokens.weight": s["tok_embeddings.weight"], "model.norm.weight": s["norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = s["output.weight"]
    for i, blk in enumerate(model.layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sizes = blk.attention.sizes
        for t in ("weight", "bias"):
            if o + f"attention.wqkv.{t}" in s:
                for x, part in zip("qkv", s[o + f"attention.wqkv.{t}"].split(sizes), strict=True):
                    out[p + f"self_attn.{x}_proj.{t}"] = part
            if o + f"attention.wo.{t}" in s:
                out[p + f"self_attn.o_proj.{t}"] = s[o + f"attention.wo.{t}"]
            if o + f"feed_forward.w13.{t}" in s:
                gate, up = s[o + f"feed_forward.w13.{t}"].chunk(2)
                out[p + f"mlp.gate_proj.{t}"], out[p + f"mlp.up_proj.{t}"] = gate, up
                out[p + f"mlp.down_proj.{t}"] = s[o + f"feed_forward.w2.{t}"]
        out[p + "input_layernorm.weight"] = s[o + "attention_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = s[o + "ffn_norm.weight"]
    return out


def _sentence_transformers_files(model, folder: Path) -> None:
    if model.tokenizer is None:
        return
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": model.max_seq_length, "do_lower_case": model.lowercase}) + "\n")
    if getattr(model, "head", None) is not None:
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if model.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules) + "\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": model.config.hidden_size,
        "pooling_mode_mean_tokens": model.pooling == "mean", "pooling_mode_cls_token": model.pooling == "cls"}) + "\n")


def save_pruned(model, out: str | Path, record: dict, *, overwrite: bool = False) -> Path:
    """Write the (pruned) ``model`` to ``out`` with ``record`` (what was removed, how) in config.json."""
    arch = adapter(model)
    out = check_output_folder(out, overwrite)
    if arch.kind == "bert":
        state, config = _bert_state(model), _bert_config(model)
    else:
        state, config = _llama_state(model), model.config.to_hf()
        config["architectures"] = ["LlamaForCausalLM"]
    config[HEADS_KEY] = [arch.heads(i) for i in range(arch.n_layers)]
    config[FFN_KEY] = [arch.ffn_width(i) for i in range(arch.n_layers)]
    config[RECORD_KEY] = record
    with atomic_folder(out) as tmp:
        tensors = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        if arch.kind == "bert":
            _sentence_transformers_files(model, tmp)
    return out

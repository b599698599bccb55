"""Writing a fine-tuned classifier as a Hugging Face folder, atomically: everything goes into a hidden
temporary folder beside the target, which is renamed into place only when complete, so an interrupted
or failed run leaves no half-written checkpoint (and an existing one, with ``overwrite``, intact until
the new one is whole).

Contents: ``model.safetensors`` (BertForSequenceClassification tensor names), ``config.json`` (HF's
BERT config, ``id2label``/``label2id``, plus a ``dynaprune`` section: pooling, label type, training
record), the tokenizer files, ``label_map.json`` and ``sentence_bert_config.json`` (max_seq_length and
lower-casing, so ``dynaprune.load`` tokenizes as during training)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dynaprune.errors import DynapruneError
from dynaprune.io import atomic_folder
from dynaprune.models.bert_classifier import MEAN_POOLING_NOTE, hf_state


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite`` and it is a folder) before any training is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DynapruneError(f"{out} already exists; choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise DynapruneError(f"{out} exists and is not a folder; it is not overwritten")
    if not out.parent.exists():
        raise DynapruneError(f"{out.parent}: no such folder for the output")
    return out


def hf_config(model, training: dict | None = None) -> dict:
    cfg, head = model.config, model.head
    id2label = {str(i): lab for i, lab in enumerate(head.labels)}
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": head.dropout.p,
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": head.dropout.p,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "problem_type": "single_label_classification",
        "id2label": id2label,
        "label2id": {lab: int(i) for i, lab in id2label.items()},
        "dynaprune": {
            "pooling": head.pooling,
            "label_type": head.label_type,
            "reproduced_by": "dynaprune and transformers" if head.pooling == "cls" else "dynaprune only",
            **({"note": MEAN_POOLING_NOTE} if head.pooling == "mean" else {}),
            **({"training": training} if training else {}),
        },
    }
    if cfg.layer_heads is not None or cfg.layer_intermediate is not None:  # statically pruned (static/shapes.py)
        from dynaprune.static.shapes import FFN_KEY, HEADS_KEY

        config[HEADS_KEY] = [cfg.heads_of(i) for i in range(cfg.num_layers)]
        config[FFN_KEY] = [cfg.ffn_of(i) for i in range(cfg.num_layers)]
    if cfg.static_record is not None:  # what dynaprune prune removed: a fine-tune keeps the record
        from dynaprune.static.shapes import RECORD_KEY

        config[RECORD_KEY] = cfg.static_record
    return config


def save_classifier(model, out: str | Path, *, overwrite: bool = False, training: dict | None = None) -> Path:
    """Write ``model`` (a Bert with a head) to the folder ``out`` atomically; returns the folder."""
    if getattr(model, "head", None) is None:
        raise DynapruneError(f"{model.name} has no classification head to save")
    out = check_output_folder(out, overwrite)
    with atomic_folder(out) as tmp:
        save_file(hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model, training), indent=2) + "\n")
        head = model.head
        (tmp / "label_map.json").write_text(json.dumps(
            {"labels": head.labels, "label_type": head.label_type, "pooling": head.pooling}, indent=2) + "\n")
        (tmp / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": model.max_seq_length, "do_lower_case": model.lowercase}, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
    return out

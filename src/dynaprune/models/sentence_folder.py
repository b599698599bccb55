"""What a BERT checkpoint folder says besides its weights: the tokenizer files and, for a
sentence-transformers folder, pooling, normalization, max_seq_length and lowercasing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynaprune.errors import DynapruneError


def load_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None  # forward() on token ids still works; embed() says what is missing
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise DynapruneError(f"{folder}: could not load the tokenizer ({e})") from None


def read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DynapruneError(f"{path}: not valid JSON ({e})") from None


def read_sentence_transformers(model: Any, folder: Path) -> None:
    """Pooling mode, normalization and max_seq_length from a sentence-transformers folder, if it is one.
    A plain BERT folder keeps mean pooling, no normalization and max_position_embeddings."""
    modules = read_json(folder / "modules.json") or []
    types = {m.get("type", ""): m.get("path", "") for m in modules if isinstance(m, dict)}
    pool_dir = next((p for t, p in types.items() if t.endswith("models.Pooling")), "1_Pooling")
    pool_cfg = read_json(folder / pool_dir / "config.json")
    if pool_cfg:
        if pool_cfg.get("pooling_mode_mean_tokens"):
            model.pooling = "mean"
        elif pool_cfg.get("pooling_mode_cls_token"):
            model.pooling = "cls"
        else:
            modes = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v]
            raise DynapruneError(f"{folder}: pooling {modes} is not supported (mean or cls)")
    model.normalize = any(t.endswith("models.Normalize") for t in types)
    st_cfg = read_json(folder / "sentence_bert_config.json") or {}
    if not isinstance(st_cfg, dict):
        st_cfg = {}
    max_len = st_cfg.get("max_seq_length") or model.config.max_position_embeddings
    model.max_seq_length = min(int(max_len), model.config.max_position_embeddings)
    model.lowercase = bool(st_cfg.get("do_lower_case", False))

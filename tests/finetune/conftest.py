"""A tiny random-weight BERT folder with a word-level vocabulary, and a learnable toy sentiment task."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was", "a", "very",
         "plot", "story", "not", "really", "is"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def toy_rows(n: int, seed: int = 0, labels: tuple = (1, 0)) -> list[tuple[str, object]]:
    """Sentences of 2-8 filler words with one sentiment word inserted; label = its polarity (alternating)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[8:]) for _ in range(rng.randint(2, 8))]
        pos = i % 2 == 0
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if pos else NEGATIVE))
        rows.append((" ".join(words), labels[0] if pos else labels[1]))
    return rows


def write_tsv(path: Path, rows, header: str | None = "sentence\tlabel") -> Path:
    lines = ([header] if header else []) + [f"{t}\t{lab}" for t, lab in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> Path:
    """BertModel (2 layers, hidden 32) with weights far from init, a WordPiece tokenizer, safetensors."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(folder))
    assert tok("the film")["input_ids"] == [2, vocab.index("the"), vocab.index("film"), 3]
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def toy():
    """The helpers: ``toy.rows(n, seed, labels)`` and ``toy.write_tsv(path, rows, header)``."""
    from types import SimpleNamespace

    return SimpleNamespace(rows=toy_rows, write_tsv=write_tsv)

"""Recovery fine-tuning of a pruned Llama (static/recover_lm.py): the causal-LM loss falls on a text
with a learnable pattern, only the non-embedding weights move, the written checkpoint loads with the
pruned shapes and the trained logits; ``dynaprune prune --finetune`` runs it end to end; a test split or
a text shorter than one chunk is refused."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_structured import tiny_llama

import dynaprune
from dynaprune.errors import DynapruneError
from dynaprune.static.checkpoint import save_pruned
from dynaprune.static.recover import RecoveryConfig, recover
from dynaprune.static.structured import remove_ffn_neurons, remove_heads

WORDS = [f"w{i}" for i in range(56)]


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def pattern_text(path, n_words: int = 1200):
    """A learnable text: each word is followed by the next one of a fixed cycle (some random restarts)."""
    rng, words, i = random.Random(0), [], 0
    for _ in range(n_words):
        i = rng.randrange(len(WORDS)) if rng.random() < 0.05 else (i + 1) % len(WORDS)
        words.append(WORDS[i])
    path.write_text(" ".join(words) + "\n")
    return path


def pruned_llama():
    m = tiny_llama()
    m.tokenizer = word_tokenizer()
    remove_heads(m, 1, [0, 2, 3, 5])  # keeps 2 query heads of each KV group of 3
    remove_ffn_neurons(m, 0, list(range(0, 40, 2)))  # keeps 20 of 40
    return m


def test_lm_recovery_lowers_the_loss_and_writes_a_loadable_pruned_checkpoint(tmp_path):
    m = pruned_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = RecoveryConfig(pattern_text(tmp_path / "valid.txt"), max_train=None, epochs=3, lr=3e-3, chunk=32,
                         lm_batch=4)
    rec = recover(m, cfg)
    assert rec["chunks"] == 1200 // 32 and rec["steps"] == 3 * 10 and len(rec["losses"]) == rec["steps"]
    assert rec["loss_last_10pct"] < 0.7 * rec["loss_first_10pct"]  # it learned the cycle
    after = m.state_dict()
    assert torch.equal(after["tok_embeddings.weight"], before["tok_embeddings.weight"])  # frozen
    assert not torch.equal(after["layers.1.attention.wo.weight"], before["layers.1.attention.wo.weight"])
    assert all(p.requires_grad for p in m.parameters()) and not m.training  # flags restored, eval mode
    save_pruned(m, tmp_path / "out", {"recovery": rec})
    back = dynaprune.load(str(tmp_path / "out"))
    assert back.config.layer_heads == [6, 4, 6] and back.config.layer_intermediate == [20, 40, 40]
    assert back.layers[1].attention.wo.weight.shape == (48, 32)
    ids = torch.randint(4, 60, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dynaprune_static"]["recovery"]["steps"] == 30


def test_prune_finetune_of_a_llama_end_to_end(dynaprune_cli, tmp_path):
    m = tiny_llama()
    m.tokenizer = word_tokenizer()
    save_pruned(m, tmp_path / "llama", {})  # an unpruned folder with its tokenizer
    text = pattern_text(tmp_path / "valid.txt", 3000)
    code, out = dynaprune_cli("prune", str(tmp_path / "llama"), "--heads", "0.34", "--calib", str(text),
                              "--max-calib", "4", "--finetune", str(text), "--max-train", "8",
                              "--finetune-lr", "1e-3", "-o", str(tmp_path / "p"))
    assert code == 0, out
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    rec = cfg["dynaprune_static"]["recovery"]
    assert rec["chunks"] == 3000 // 512 and rec["steps"] == 3000 // 512 and rec["chunk_tokens"] == 512
    assert sum(cfg["dynaprune_layer_heads"]) == 18 - 6  # 6 of 18 query heads, by whole KV-group units
    assert dynaprune.load(str(tmp_path / "p")).config.layer_heads == cfg["dynaprune_layer_heads"]


def test_lm_recovery_refuses_test_splits_and_short_texts(tmp_path):
    m = pruned_llama()
    with pytest.raises(DynapruneError, match="test split"):
        recover(m, RecoveryConfig(pattern_text(tmp_path / "test.txt"), chunk=32))
    (tmp_path / "short.txt").write_text("w1 w2 w3\n")
    with pytest.raises(DynapruneError, match="fewer than one recovery chunk of 32"):
        recover(m, RecoveryConfig(tmp_path / "short.txt", chunk=32))
    with pytest.raises(DynapruneError, match="BERT classifiers only"):
        recover(m, RecoveryConfig(pattern_text(tmp_path / "valid.txt"), chunk=32, recipe="token=0.5"))

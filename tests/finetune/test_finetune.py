"""Fine-tuning our BERT with a classification head: logits equal to transformers' after training, the
checkpoint round trip, gradients under run-time pruning against finite differences, batches, schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dynaprune
from dynaprune.errors import DynapruneError
from dynaprune.finetune import FinetuneConfig, bucketed_batches, finetune, read_training_data, save_classifier


@pytest.fixture
def train_tiny(tiny_bert_folder, tmp_path, toy):
    """train_tiny(**config) -> (model, report, step infos, dev set): 96 toy rows, batch 16, 2 epochs."""
    return lambda **kw: _train_tiny(tiny_bert_folder, tmp_path, toy, **kw)


def _train_tiny(folder, tmp_path, toy, *, labels=(1, 0), **kw):
    model = dynaprune.load(str(folder))
    train, label_map = read_training_data(toy.write_tsv(tmp_path / "train.tsv", toy.rows(96, 0, labels)))
    dev, _ = read_training_data(toy.write_tsv(tmp_path / "dev.tsv", toy.rows(40, 1, labels)), labels=label_map)
    cfg = FinetuneConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, **kw})
    steps = []
    report = finetune(model, train, label_map, dev, cfg, steps.append)
    return model, report, steps, dev


def test_finetuned_logits_match_transformers(train_tiny, tmp_path, tiny_bert_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, report, steps, dev = train_tiny()
    assert report.steps == 12 and report.dev_accuracy is not None
    base = dynaprune.load(str(tiny_bert_folder))
    assert (base.layers[1].fc1.weight - model.layers[1].fc1.weight).abs().max() > 1e-3  # trained weights
    out = save_classifier(model, tmp_path / "clf")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    texts = dev.texts[:7]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).logits
    ours = model.classify_logits(texts)
    reloaded = dynaprune.load(str(out)).classify_logits(texts)
    assert ours.shape == (7, 2)
    assert (ours - ref).abs().max() <= 1e-4
    assert (reloaded - ref).abs().max() <= 1e-4
    assert hf.config.id2label == {0: "0", 1: "1"}


def test_round_trip_string_labels_and_mean_pooling(train_tiny, tmp_path):
    model, _, _, dev = train_tiny(labels=("pos", "neg"), pooling="mean", epochs=1)
    out = save_classifier(model, tmp_path / "clf", training={"note": "test"})
    again = dynaprune.load(str(out))
    assert again.head.labels == ["neg", "pos"] and again.head.pooling == "mean"  # sorted label names
    assert again.head.label_of(1) == "pos"
    assert (again.classify_logits(dev.texts) - model.classify_logits(dev.texts)).abs().max() <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["dynaprune"]["reproduced_by"] == "dynaprune only" and "note" in config["dynaprune"]
    assert json.loads((out / "label_map.json").read_text())["labels"] == ["neg", "pos"]
    out2 = save_classifier(again, tmp_path / "clf2")  # save(load(save(m))) holds the same tensors
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_integer_labels_read_back_as_integers(train_tiny):
    model, _, _, _ = train_tiny(labels=(10, 2), epochs=1)
    assert model.head.labels == ["2", "10"]  # numeric order, not "10" < "2"
    assert model.head.label_of(1) == 10


def test_schedule_warmup_then_linear_decay_to_zero(train_tiny):
    _, _, steps, _ = train_tiny(warmup=0.25, lr=1e-3)  # 12 steps, 3 warm-up
    lrs = [s.lr for s in steps]  # the rate the NEXT step will use
    assert lrs[:4] == pytest.approx([2e-3 / 3, 1e-3, 1e-3 * 9 / 10, 1e-3 * 8 / 10])  # peak once
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_same_seed_same_model(train_tiny):
    a, _, _, dev = train_tiny(epochs=1)
    b, _, _, _ = train_tiny(epochs=1)
    c, _, _, _ = train_tiny(epochs=1, seed=1)
    assert a.classify_logits(dev.texts).equal(b.classify_logits(dev.texts))
    assert not a.classify_logits(dev.texts).equal(c.classify_logits(dev.texts))


@pytest.mark.parametrize("recipe", ["token=0.5", "head=0.5"])
def test_pruned_forward_gradient_is_the_derivative(tiny_bert_folder, toy, recipe):
    """Pruning-aware training: autograd's gradient of the PRUNED loss equals its central finite difference
    (the kept set does not change under a 1e-4 step), and differs from the dense gradient."""
    from dynaprune.finetune.data import LabelMap
    from dynaprune.finetune.train import new_head
    from dynaprune.runtime.pruning import make_context

    model = dynaprune.load(str(tiny_bert_folder))
    model.head = new_head(model, LabelMap(("0", "1"), "int"), FinetuneConfig())
    model = model.double().eval()  # eval: no dropout, the loss is a function of the weights alone
    rows = toy.rows(6, 3)
    ids = model.tokenize([t for t, _ in rows])
    L = max(map(len, ids))
    x = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    mask = torch.arange(L) < torch.tensor([len(r) for r in ids])[:, None]
    y = torch.tensor([lab for _, lab in rows])
    weight = model.layers[0].fc1.weight

    def loss(pruned: bool) -> torch.Tensor:
        ctx = make_context(recipe, model) if pruned else None
        hidden, kept = model(x, mask, ctx=ctx)
        return torch.nn.functional.cross_entropy(model.head(hidden, kept), y)

    grads = {}
    for pruned in (True, False):
        model.zero_grad()
        loss(pruned).backward()
        grads[pruned] = weight.grad.clone()
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    eps = 1e-4
    with torch.no_grad():
        weight += eps * direction
        up = float(loss(True))
        weight -= 2 * eps * direction
        down = float(loss(True))
        weight += eps * direction
    numeric = (up - down) / (2 * eps)
    analytic = float((grads[True] * direction).sum())
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert (grads[True] - grads[False]).abs().max() > 1e-6  # the pruning changed what was trained


def test_finetune_with_recipe_trains_through_the_pruned_forward(train_tiny):
    model, report, _, dev = train_tiny(recipe="token=0.5")
    assert report.steps == 12 and 0.0 <= report.dev_accuracy <= 1.0
    with pytest.raises(DynapruneError, match="kv"):
        train_tiny(recipe="kv=0.5")  # no KV cache is decoded in training


def test_bucketed_batches_cover_every_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, 1000).tolist()
    batches = bucketed_batches(lengths, 16, np.random.default_rng(1), pool_batches=10)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000)) and max(map(len, batches)) == 16
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    shuffled = np.random.default_rng(2).permutation(1000).tolist()
    padded_random = sum(16 * max(lengths[i] for i in shuffled[s:s + 16]) for s in range(0, 1000, 16))
    assert padded < 0.75 * padded_random
    again = bucketed_batches(lengths, 16, np.random.default_rng(1), pool_batches=10)
    other = bucketed_batches(lengths, 16, np.random.default_rng(3), pool_batches=10)
    assert again == batches and other != batches


def test_interrupted_save_leaves_nothing(train_tiny, tmp_path, monkeypatch):
    model, _, _, _ = train_tiny(epochs=1)
    first = save_classifier(model, tmp_path / "clf")
    before = (first / "model.safetensors").read_bytes()

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_classifier(model, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        save_classifier(model, tmp_path / "clf", overwrite=True)
    assert not (tmp_path / "new").exists()
    assert (first / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(DynapruneError, match="already exists"):
        save_classifier(model, tmp_path / "clf")


def test_hdp_trains_q_k_v_straight_through(tiny_bert_folder, toy):
    """HDP decides and scores on fixed-point Q and K (piecewise constant in the weights); training takes
    the exact scores' gradient through them. Before the fix the QKV projections got no gradient at all."""
    from dynaprune.finetune.data import LabelMap
    from dynaprune.finetune.train import new_head
    from dynaprune.runtime.pruning import make_context

    model = dynaprune.load(str(tiny_bert_folder))
    model.head = new_head(model, LabelMap(("0", "1"), "int"), FinetuneConfig())
    model.eval()
    rows = toy.rows(6, 3)
    ids = model.tokenize([t for t, _ in rows])
    L = max(map(len, ids))
    x = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    mask = torch.arange(L) < torch.tensor([len(r) for r in ids])[:, None]
    recipe = "block_sparsity=0.75,block_score=max,block_size=2"
    with torch.no_grad():
        ref = model.head(*model(x, mask, ctx=make_context(recipe, model)))
    hidden, kept = model(x, mask, ctx=make_context(recipe, model))
    logits = model.head(hidden, kept)
    assert logits.equal(ref)  # the straight-through term adds exactly zero to the forward
    torch.nn.functional.cross_entropy(logits, torch.tensor([lab for _, lab in rows])).backward()
    d = model.config.hidden_size
    for i in range(model.config.num_layers):
        grad = model.layers[i].qkv.weight.grad
        assert all(grad[j * d:(j + 1) * d].abs().max() > 0 for j in range(3)), i  # Q, K and V rows

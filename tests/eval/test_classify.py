"""Linear-probe classification: the plumbing with a fake encoder, and a small real MiniLM run."""

from __future__ import annotations

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval.classify import PROBE_C, SST2_DEFAULTS, data_root, evaluate_classify, sst2_defaults
from dynaprune.models.bert import Bert


class WordEncoder:
    """Feature = presence of a few words: linearly separable on the toy data below."""

    name = "words"
    WORDS = ("good", "bad", "great", "awful", "meh")

    def __init__(self):
        self.seen: list[list[str]] = []

    def embed(self, texts, recipe=None, *, batch_size=32, ctx_factory=None, progress=None):
        self.seen.append(list(texts))
        for i in range(len(texts)):
            if progress:
                progress(i + 1, len(texts))
        return torch.tensor([[float(w in t.split()) for w in self.WORDS] for t in texts])


def write(path, rows, header=True):
    path.write_text(("text\tlabel\n" if header else "") + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    return path


@pytest.fixture
def toy(tmp_path):
    train = [(f"a good film {i}", "pos") for i in range(20)] + [(f"a bad film {i}", "neg") for i in range(20)]
    test = [("good", "pos"), ("bad", "neg"), ("good good", "pos")]
    return write(tmp_path / "train.tsv", train), write(tmp_path / "dev.tsv", test, header=False)


def test_probe_learns_toy_task(toy):
    train, dev = toy
    seen = []
    r = evaluate_classify(WordEncoder(), dev, train, progress=lambda d, t: seen.append((d, t)))
    assert r.task == "classify" and r.n == 3 and r.metric == {"name": "accuracy", "value": 1.0}
    assert r.extra["n_train"] == 40 and r.extra["classes"] == ["neg", "pos"]
    assert f"C={PROBE_C}" in r.extra["probe"]
    assert seen[-1] == (43, 43) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_max_train_is_a_seeded_subset(toy):
    train, dev = toy
    subsets = []
    for seed in (0, 0, 1):
        enc = WordEncoder()
        r = evaluate_classify(enc, dev, train, max_train=10, max_examples=2, seed=seed)
        assert r.extra["n_train"] == 10 and r.n == 2
        subsets.append(enc.seen[0])
    assert subsets[0] == subsets[1] != subsets[2]
    assert evaluate_classify(WordEncoder(), dev, train, max_train=1000).extra["n_train"] == 40


def test_unseen_test_label_and_single_class(tmp_path, toy):
    train, _ = toy
    dev = write(tmp_path / "odd.tsv", [("good", "pos"), ("so so", "neutral")])
    with pytest.raises(DynapruneError, match=r"labels \['neutral'\] do not occur in the training set"):
        evaluate_classify(WordEncoder(), dev, train)
    one = write(tmp_path / "one.tsv", [("good", "pos"), ("great", "pos")])
    with pytest.raises(DynapruneError, match="only one class"):
        evaluate_classify(WordEncoder(), dev, one)
    with pytest.raises(DynapruneError, match="max_train"):
        evaluate_classify(WordEncoder(), dev, train, max_train=0)


def test_sst2_defaults_resolve(monkeypatch, shared_data, tmp_path):
    monkeypatch.delenv("DYNAPRUNE_DATA", raising=False)
    assert set(SST2_DEFAULTS) == {"data", "train"}
    d = sst2_defaults()
    assert d["data"].resolve() == (shared_data / "sst2" / "dev.tsv").resolve() and d["train"].is_file()
    monkeypatch.setenv("DYNAPRUNE_DATA", str(tmp_path))
    assert data_root() == tmp_path and sst2_defaults()["train"] == tmp_path / "sst2" / "train.tsv"


def test_minilm_probe_on_sst2_subset(minilm_path):
    model = Bert.from_hf_folder(minilm_path)
    r = evaluate_classify(model, SST2_DEFAULTS["data"], SST2_DEFAULTS["train"], max_train=400,
                          max_examples=200, batch_size=64)
    assert r.n == 200 and r.extra["n_train"] == 400
    assert 0.65 < r.metric["value"] <= 1.0  # full train set: ~0.81; 5000 train sentences: 0.79

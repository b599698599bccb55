"""Linear-probe classification: the plumbing with a fake encoder, and a small real MiniLM run."""

from __future__ import annotations

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval import classify
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


class SwappingEncoder(WordEncoder):
    """A stand-in for a pruned model: under a context factory, the "good" and "bad" features trade
    places, so a probe trained on dense embeddings reads every pruned sentence backwards. It has a
    weight (so the dense probe can be cached under its fingerprint)."""

    name = "swapping"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = torch.tensor([weight])
        self.contexts: list[bool] = []

    def parameters(self):
        return iter([self.weight])

    def embed(self, texts, recipe=None, *, batch_size=32, ctx_factory=None, progress=None):
        self.contexts.append(ctx_factory is not None)
        x = super().embed(texts, batch_size=batch_size, progress=progress) * self.weight
        return x[:, [1, 0, 2, 3, 4]] if ctx_factory is not None else x


@pytest.fixture(autouse=True)
def no_cached_probes():
    classify._DENSE_PROBES.clear()
    yield
    classify._DENSE_PROBES.clear()


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


def test_the_probe_is_trained_on_dense_embeddings_unless_asked(toy):
    """Hand oracle: the swap turns "good" into "bad" under pruning, so the dense-trained probe gets all
    3 test sentences wrong (accuracy 0) while a probe retrained on the pruned embeddings gets them all
    right (1.0). Retraining would hide what pruning did to the embeddings."""
    train, dev = toy
    pruned = lambda: object()  # noqa: E731  (the encoder only asks whether there is a factory)
    enc = SwappingEncoder()
    dense_probe = evaluate_classify(enc, dev, train, ctx_factory=pruned)
    assert dense_probe.metric["value"] == 0.0 and enc.contexts == [False, True]
    assert dense_probe.extra["probe_trained_on"] == "dense" and dense_probe.extra["probe_cached"] is False
    enc = SwappingEncoder()
    retrained = evaluate_classify(enc, dev, train, ctx_factory=pruned, probe="retrained")
    assert retrained.metric["value"] == 1.0 and enc.contexts == [True, True]
    assert retrained.extra["probe_trained_on"] == "retrained"
    assert evaluate_classify(SwappingEncoder(), dev, train).metric["value"] == 1.0  # dense model, dense probe
    with pytest.raises(DynapruneError, match="unknown probe 'pruned'"):
        evaluate_classify(enc, dev, train, probe="pruned")


def test_the_dense_probe_is_cached_per_model_training_set_and_seed(toy, tmp_path):
    train, dev = toy
    pruned = lambda: object()  # noqa: E731
    enc = SwappingEncoder()
    first = evaluate_classify(enc, dev, train, ctx_factory=pruned, max_train=30)
    seen = []
    again = evaluate_classify(enc, dev, train, ctx_factory=pruned, max_train=30,
                              progress=lambda d, t: seen.append((d, t)))
    assert enc.contexts == [False, True, True] and again.extra["probe_cached"] is True  # no second training pass
    assert again.metric == first.metric and seen[-1] == (3, 3)
    for kwargs in ({"max_train": 20}, {"max_train": 30, "seed": 1}):  # another training set: trained again
        enc.contexts.clear()
        res = evaluate_classify(enc, dev, train, ctx_factory=pruned, **kwargs)
        assert enc.contexts == [False, True] and res.extra["probe_cached"] is False
    other = SwappingEncoder(weight=2.0)  # another model (other weights): its own probe
    assert evaluate_classify(other, dev, train, max_train=30).extra["probe_cached"] is False
    edited = write(tmp_path / "train2.tsv", [(f"a good film {i}", "pos") for i in range(20)]
                   + [(f"a bad film {i}", "neg") for i in range(20)])
    enc.contexts.clear()
    assert evaluate_classify(enc, dev, edited, max_train=30).extra["probe_cached"] is False
    plain = WordEncoder()  # no weights to fingerprint: never cached
    evaluate_classify(plain, dev, train)
    assert evaluate_classify(plain, dev, train).extra["probe_cached"] is False and len(plain.seen) == 4


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

"""Text classification by a linear probe on frozen sentence embeddings (SST-2 and any text<TAB>label).

The probe is sklearn's LogisticRegression with a fixed C (no tuning on the evaluation set), trained on
the embeddings of the training file; the metric is accuracy on the evaluation file.

Under a pruning recipe the probe is trained once on the DENSE embeddings and tests the pruned ones
(``probe="dense"``, the default): run-time pruning without retraining, so the probe must not adapt to
the pruned model either. ``probe="retrained"`` trains it on the pruned embeddings instead (a labelled
variant, closer to fine-tuning after pruning). The dense probe is cached in the process per (model,
training file, its rows, seed, batch size), so a sweep of recipes embeds the training set once.

A fine-tuned classifier (``dynaprune finetune``: a model with its own head) is evaluated with that head
and no probe; the training file is not read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynaprune.errors import DynapruneError
from dynaprune.eval.data import data_root, load_labeled_text, resolve_data_path
from dynaprune.eval.metrics import accuracy
from dynaprune.eval.result import TaskResult
from dynaprune.eval.sts import Encoder, Progress, check_limit, recipe_of
from dynaprune.runtime.attention import RunContext

__all__ = ["PROBES", "PROBE_C", "PROBE_MAX_ITER", "SST2_DEFAULTS", "data_root", "evaluate_classify",
           "sst2_defaults"]

# Relative to data_root() (the repo's sibling shared/data, or $DYNAPRUNE_DATA); the loaders resolve them.
SST2_DEFAULTS = {"data": "sst2/dev.tsv", "train": "sst2/train.tsv"}
PROBE_C = 1.0  # sklearn's default L2 strength; fixed, never tuned on the evaluation set
PROBE_MAX_ITER = 1000
PROBES = ("dense", "retrained")  # what the probe is trained on: dense embeddings, or the pruned ones
_DENSE_PROBES: dict[tuple, Any] = {}  # (model, train file, rows, seed, batch size) -> fitted probe


def sst2_defaults() -> dict[str, Path]:
    """SST2_DEFAULTS as absolute paths under the current data_root()."""
    return {k: data_root() / v for k, v in SST2_DEFAULTS.items()}


def _model_key(model: Encoder) -> tuple | None:
    """Tells two encoders apart: name, pooling settings and a hash of config and first weights. None
    (never cached) for a model without parameters: nothing but its address would name it."""
    from dynaprune.eval.mtbench import model_fingerprint

    try:
        identity = model_fingerprint(model)
    except (AttributeError, StopIteration, TypeError):
        return None
    return (model.name, identity, tuple(sorted(recipe_of(model).items())))


def _file_key(path: str | Path) -> tuple:
    resolved = resolve_data_path(path)
    stat = resolved.stat()
    return (str(resolved), stat.st_size, stat.st_mtime_ns)  # an edited file is another training set


def _fit_probe(x_train: np.ndarray, labels: list, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    return probe.fit(x_train, labels)


def evaluate_classify(
    model: Encoder,
    data_path: str | Path,
    train_path: str | Path,
    *,
    max_train: int | None = None,
    max_examples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    ctx_factory: Callable[[], RunContext] | None = None,
    progress: Progress | None = None,
    probe: str = "dense",
) -> TaskResult:
    """Accuracy of a logistic-regression probe trained on the embeddings of ``train_path`` (a seeded
    random subset of ``max_train`` rows if given) and tested on the first ``max_examples`` rows of
    ``data_path`` embedded under ``ctx_factory``. ``probe``: "dense" trains on the dense embeddings
    (cached), "retrained" on the embeddings under ``ctx_factory``. ``progress(done, total)`` counts the
    sentences embedded."""
    if probe not in PROBES:
        raise DynapruneError(f"unknown probe {probe!r} (known: {', '.join(PROBES)})")
    if getattr(model, "head", None) is not None:
        return _evaluate_head(model, data_path, max_examples=max_examples, batch_size=batch_size,
                              ctx_factory=ctx_factory, progress=progress)
    check_limit(max_train, "max_train")
    check_limit(max_examples, "max_examples")
    t0 = time.perf_counter()
    train = load_labeled_text(train_path)
    test = load_labeled_text(data_path)[:max_examples]
    if max_train is not None and max_train < len(train):
        pick = np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False))
        train = [train[i] for i in pick]
    classes = sorted({x.label for x in train}, key=str)
    if len(classes) < 2:
        raise DynapruneError(f"{train_path}: the training set has only one class ({classes[0]!r})")
    unseen = sorted({x.label for x in test} - set(classes), key=str)
    if unseen:
        raise DynapruneError(
            f"{data_path}: labels {unseen[:5]} do not occur in the training set {train_path} "
            f"(training labels: {classes[:10]})"
        )
    labels = [x.label for x in train]
    model_key = _model_key(model)
    key = (model_key, _file_key(train_path), len(train), seed, batch_size) if model_key else None
    fitted = _DENSE_PROBES.get(key) if probe == "dense" and key else None
    total = len(test) + (0 if fitted is not None else len(train))
    train_progress = (lambda d, _t: progress(d, total)) if progress else None
    test_progress = (lambda d, _t: progress(total - len(test) + d, total)) if progress else None
    t_embed = time.perf_counter()
    if fitted is None:
        train_ctx = ctx_factory if probe == "retrained" else None  # dense: the probe never sees pruning
        x_train = model.embed([x.text for x in train], batch_size=batch_size, ctx_factory=train_ctx,
                              progress=train_progress).numpy()
    x_test = model.embed([x.text for x in test], batch_size=batch_size, ctx_factory=ctx_factory,
                         progress=test_progress).numpy()
    t_embed = time.perf_counter() - t_embed
    cached = fitted is not None
    if fitted is None:
        fitted = _fit_probe(x_train, labels, seed)
        if probe == "dense" and key:
            _DENSE_PROBES[key] = fitted
    acc = accuracy(fitted.predict(x_test).tolist(), [x.label for x in test])
    return TaskResult(
        model=model.name,
        task="classify",
        data=str(data_path),
        n=len(test),
        metric={"name": "accuracy", "value": acc},
        cost={},
        seconds=time.perf_counter() - t0,
        extra={
            "train": str(resolve_data_path(train_path)),
            "n_train": len(train),
            "probe": f"LogisticRegression(C={PROBE_C}, max_iter={PROBE_MAX_ITER}) on frozen embeddings",
            "probe_trained_on": probe,  # dense: trained once on dense embeddings; retrained: on pruned ones
            "probe_cached": cached,
            "seed": seed,
            "classes": classes,
            "embed_seconds": t_embed,
            "batch_size": batch_size,
            **recipe_of(model),
        },
    )


def _evaluate_head(
    model: Encoder, data_path: str | Path, *, max_examples: int | None, batch_size: int,
    ctx_factory: Callable[[], RunContext] | None, progress: Progress | None,
) -> TaskResult:
    """Accuracy of the model's own classification head (a fine-tuned classifier) on ``data_path``."""
    check_limit(max_examples, "max_examples")
    t0 = time.perf_counter()
    test = load_labeled_text(data_path)[:max_examples]
    head = model.head
    unseen = sorted({str(x.label) for x in test} - set(head.labels))
    if unseen:
        raise DynapruneError(f"{data_path}: labels {unseen[:5]} are not among the classifier's labels "
                             f"{head.labels[:10]}")
    logits = model.classify_logits([x.text for x in test], batch_size=batch_size, ctx_factory=ctx_factory,
                                   progress=progress)
    predicted = [head.labels[i] for i in logits.argmax(1).tolist()]
    acc = accuracy(predicted, [str(x.label) for x in test])
    return TaskResult(
        model=model.name, task="classify", data=str(data_path), n=len(test),
        metric={"name": "accuracy", "value": acc}, cost={}, seconds=time.perf_counter() - t0,
        extra={"classifier": f"fine-tuned head (pooling={head.pooling})", "classes": head.labels,
               "batch_size": batch_size, **recipe_of(model)},
    )

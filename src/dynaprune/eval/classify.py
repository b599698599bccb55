"""Text classification by a linear probe on frozen sentence embeddings (SST-2 and any text<TAB>label).

The probe is sklearn's LogisticRegression with a fixed C (no tuning on the evaluation set), trained on
the embeddings of the training file; the metric is accuracy on the evaluation file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynaprune.errors import DynapruneError
from dynaprune.eval.data import data_root, load_labeled_text, resolve_data_path
from dynaprune.eval.metrics import accuracy
from dynaprune.eval.result import TaskResult
from dynaprune.eval.sts import Encoder, Progress, check_limit, recipe_of
from dynaprune.runtime.attention import RunContext

__all__ = ["PROBE_C", "PROBE_MAX_ITER", "SST2_DEFAULTS", "data_root", "evaluate_classify", "sst2_defaults"]

# Relative to data_root() (the repo's sibling shared/data, or $DYNAPRUNE_DATA); the loaders resolve them.
SST2_DEFAULTS = {"data": "sst2/dev.tsv", "train": "sst2/train.tsv"}
PROBE_C = 1.0  # sklearn's default L2 strength; fixed, never tuned on the evaluation set
PROBE_MAX_ITER = 1000


def sst2_defaults() -> dict[str, Path]:
    """SST2_DEFAULTS as absolute paths under the current data_root()."""
    return {k: data_root() / v for k, v in SST2_DEFAULTS.items()}


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
) -> TaskResult:
    """Accuracy of a logistic-regression probe trained on the embeddings of ``train_path`` (a seeded
    random subset of ``max_train`` rows if given) and tested on the first ``max_examples`` rows of
    ``data_path``. ``progress(done, total)`` counts the sentences of both sets."""
    from sklearn.linear_model import LogisticRegression

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
    total = len(train) + len(test)
    train_progress = (lambda d, _t: progress(d, total)) if progress else None
    test_progress = (lambda d, _t: progress(len(train) + d, total)) if progress else None
    kw = {"batch_size": batch_size, "ctx_factory": ctx_factory}
    t_embed = time.perf_counter()
    x_train = model.embed([x.text for x in train], progress=train_progress, **kw).numpy()
    x_test = model.embed([x.text for x in test], progress=test_progress, **kw).numpy()
    t_embed = time.perf_counter() - t_embed
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    probe.fit(x_train, [x.label for x in train])
    acc = accuracy(probe.predict(x_test).tolist(), [x.label for x in test])
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
            "seed": seed,
            "classes": classes,
            "embed_seconds": t_embed,
            "batch_size": batch_size,
            **recipe_of(model),
        },
    )

"""Semantic textual similarity: Spearman of cosine(embed(s1), embed(s2)) against gold scores."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval.data import load_sts
from dynaprune.eval.metrics import cosine_similarity, pearson, spearman
from dynaprune.eval.result import TaskResult
from dynaprune.runtime.attention import RunContext

Progress = Callable[[int, int], None]


class Encoder(Protocol):
    """What the sentence tasks need from a model (our Bert, or anything with the same embed())."""

    name: str

    def embed(self, texts: Sequence[str], recipe: object | None = None, *, batch_size: int = 32,
              ctx_factory: Callable[[], RunContext] | None = None,
              progress: Progress | None = None) -> torch.Tensor: ...


def check_limit(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DynapruneError(f"{what} must be a positive integer, got {value!r}")


def recipe_of(model: Encoder) -> dict:
    return {k: getattr(model, k) for k in ("pooling", "normalize", "max_seq_length") if hasattr(model, k)}


def evaluate_sts(
    model: Encoder,
    data_path: str | Path,
    *,
    max_examples: int | None = None,
    batch_size: int = 32,
    ctx_factory: Callable[[], RunContext] | None = None,
    progress: Progress | None = None,
) -> TaskResult:
    """Spearman (and Pearson) of the cosine similarity of each pair's embeddings vs the gold scores.
    ``max_examples`` keeps the first N pairs. Each distinct sentence is embedded once."""
    check_limit(max_examples, "max_examples")
    t0 = time.perf_counter()
    pairs = load_sts(data_path)[:max_examples]
    if len(pairs) < 2:
        raise DynapruneError("STS needs at least 2 sentence pairs for a correlation")
    sentences = list(dict.fromkeys(s for p in pairs for s in (p.s1, p.s2)))
    row = {s: i for i, s in enumerate(sentences)}
    emb = model.embed(sentences, batch_size=batch_size, ctx_factory=ctx_factory, progress=progress)
    e1 = emb[[row[p.s1] for p in pairs]]
    e2 = emb[[row[p.s2] for p in pairs]]
    sims = cosine_similarity(e1, e2)
    gold = [p.score for p in pairs]
    return TaskResult(
        model=model.name,
        task="sts",
        data=str(data_path),
        n=len(pairs),
        metric={"name": "spearman", "value": spearman(sims, gold), "pearson": pearson(sims, gold)},
        cost={},
        seconds=time.perf_counter() - t0,
        extra={"sentences": len(sentences), "batch_size": batch_size, "similarity": "cosine",
               **recipe_of(model)},
    )

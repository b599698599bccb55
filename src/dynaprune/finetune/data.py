"""Training data for ``dynaprune finetune``: ``text<TAB>label`` TSVs (eval.data's reader: header optional,
integer or string labels), the label map (class index <-> label), and length-bucketed batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynaprune.errors import DynapruneError
from dynaprune.eval.data import LabeledText, load_labeled_text


@dataclass(frozen=True)
class LabelMap:
    """Class index -> label (as a string) and whether the training file wrote integers."""

    labels: tuple[str, ...]
    label_type: str  # "int" | "str"

    @classmethod
    def from_examples(cls, examples: list[LabeledText], where: str) -> LabelMap:
        values = {x.label for x in examples}
        if len(values) < 2:
            only = next(iter(values))
            raise DynapruneError(f"{where}: the training data has only one class ({only!r}); need at least 2")
        as_int = all(isinstance(v, int) for v in values)
        ordered = sorted(values) if as_int else sorted(values, key=str)  # 0, 1, 2 ... or names A-Z
        return cls(tuple(str(v) for v in ordered), "int" if as_int else "str")

    def index(self, examples: list[LabeledText], where: str) -> list[int]:
        """Class indices of ``examples``; a label the map does not know is one error naming it."""
        pos = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({str(x.label) for x in examples} - set(pos))
        if unknown:
            raise DynapruneError(f"{where}: labels {unknown[:5]} do not occur in the training data "
                                 f"(training labels: {list(self.labels)[:10]})")
        return [pos[str(x.label)] for x in examples]


@dataclass
class TrainingData:
    texts: list[str]
    targets: list[int]  # class indices
    path: str


def read_training_data(
    path: str | Path, *, max_rows: int | None = None, seed: int = 0, labels: LabelMap | None = None,
    what: str = "training data",
) -> tuple[TrainingData, LabelMap]:
    """Rows of a ``text<TAB>label`` file (a seeded random subset of ``max_rows`` when given) and the label
    map (built from these rows unless ``labels`` is given, e.g. for the dev file)."""
    examples = load_labeled_text(path)
    if max_rows is not None and max_rows < len(examples):
        pick = np.sort(np.random.default_rng(seed).choice(len(examples), max_rows, replace=False))
        examples = [examples[i] for i in pick]
    label_map = labels or LabelMap.from_examples(examples, f"{path}")
    targets = label_map.index(examples, f"{path} ({what})")
    return TrainingData([x.text for x in examples], targets, str(path)), label_map


def bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator,
                     pool_batches: int = 50) -> list[list[int]]:
    """Index batches of similar lengths (little padding) that still differ between epochs: shuffle, cut
    into pools of ``pool_batches`` batches, sort each pool by length, cut it into batches, shuffle the
    batches. Every index appears exactly once."""
    if batch_size < 1:
        raise DynapruneError(f"batch size must be a positive number, got {batch_size}")
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]

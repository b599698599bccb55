"""Evaluation data loaders: STS pairs and labeled text, from TSV files, into plain dataclasses.

TSVs are read with ``csv.QUOTE_NONE``: STS-B sentences contain unbalanced quotes that csv's default
quoting would silently merge across lines. Relative paths that do not exist from the working directory
are looked up under the shared data folder (``data_root()``), so ``stsb/dev.tsv`` works anywhere.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from dynaprune.errors import DynapruneError
from dynaprune.paths import shared_data_dir

# Repo root = parents[3] of src/dynaprune/eval/data.py; the shared data lives beside the repo.
SCORE_NAMES = {"score", "label", "similarity", "similarity_score", "gold", "gold_score", "sim", "relatedness"}
LABEL_NAMES = {"label", "labels", "class", "target", "y", "category", "sentiment"}
TEXT_NAMES = {"sentence", "text", "review", "document", "sentence1", "content"}


@dataclass(frozen=True)
class STSPair:
    s1: str
    s2: str
    score: float


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: int | str


def data_root() -> Path:
    """The shared evaluation data folder: $DYNAPRUNE_DATA, else ``shared/data`` next to the repo."""
    return shared_data_dir()


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else (when relative) under ``data_root()``."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = data_root() / p
    return alt if alt.exists() else p


def _read_rows(path: str | Path) -> tuple[Path, list[tuple[int, list[str]]]]:
    """Non-blank TSV rows with their 1-based line numbers. Missing, unreadable or empty file: error."""
    p = resolve_data_path(path)
    if not p.exists():
        raise DynapruneError(f"{path}: no such file (also looked under {data_root()})")
    if p.is_dir():
        raise DynapruneError(f"{p} is a folder, expected a data file (.tsv)")
    if not p.is_file():
        raise DynapruneError(f"{p}: not a regular file")
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DynapruneError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise DynapruneError(f"{p}: cannot be read ({e})") from None
    if not rows:
        raise DynapruneError(f"{p}: empty file")
    return p, rows


def _float(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def load_sts(path: str | Path) -> list[STSPair]:
    """STS sentence pairs with gold scores. Formats, detected from the first row:

    - GLUE STS-B: 10 columns with a header (``sentence1``, ``sentence2``, ``score`` located by name);
      any header naming ``sentence1``/``sentence2`` and a score column works the same way;
    - original STS benchmark: no header, ``genre file year id score s1 s2`` (+ trailing columns, ignored);
    - plain: ``s1<TAB>s2<TAB>score``, optional header (its last cell a name such as ``score``).
    """
    p, rows = _read_rows(path)
    line, first = rows[0]
    lower = [c.strip().lower() for c in first]
    ncols: int | None = None  # exact column count required, None = at least max(cols) + 1
    if "sentence1" in lower and "sentence2" in lower:  # named header (GLUE)
        score_name = next((c for c in lower if c in SCORE_NAMES), None)
        if score_name is None:
            raise DynapruneError(f"{p}: line {line}: header has no score column (e.g. 'score')")
        cols = (lower.index("sentence1"), lower.index("sentence2"), lower.index(score_name))
        ncols, rows, fmt = len(first), rows[1:], "header"
    elif len(first) == 3:
        cols, ncols, fmt = (0, 1, 2), 3, "s1<TAB>s2<TAB>score"
        if _float(first[2]) is None and lower[2] in SCORE_NAMES:
            rows = rows[1:]
    elif len(first) == 10 and _is_int(first[0]):  # GLUE without its header: starts with a row index
        cols, ncols, fmt = (7, 8, 9), 10, "GLUE STS-B (10 columns)"
    elif len(first) >= 7 and _float(first[4]) is not None:  # original STS benchmark: starts with a genre
        cols, fmt = (5, 6, 4), "genre file year id score s1 s2"
    else:
        raise DynapruneError(
            f"{p}: line {line}: {len(first)} columns; expected an STS file: GLUE STS-B (10 columns, "
            "header), original STS benchmark (genre file year id score s1 s2) or s1<TAB>s2<TAB>score"
        )
    need = max(cols) + 1
    out = []
    for line, r in rows:
        if (ncols is not None and len(r) != ncols) or len(r) < need:
            want = ncols if ncols is not None else f"at least {need}"
            raise DynapruneError(f"{p}: line {line}: {len(r)} columns, expected {want} ({fmt})")
        s1, s2, raw = r[cols[0]].strip(), r[cols[1]].strip(), r[cols[2]].strip()
        score = _float(raw)
        if score is None:
            raise DynapruneError(f"{p}: line {line}: score {raw!r} is not a number")
        if not s1 or not s2:
            raise DynapruneError(f"{p}: line {line}: empty sentence")
        out.append(STSPair(s1, s2, score))
    if not out:
        raise DynapruneError(f"{p}: no sentence pairs (only a header)")
    return out


def load_labeled_text(path: str | Path) -> list[LabeledText]:
    """``text<TAB>label`` rows (header optional). Labels become ints when every label is an integer,
    otherwise they stay strings (class names)."""
    p, rows = _read_rows(path)
    line, first = rows[0]
    if len(first) == 2:
        text, label = (c.strip().lower() for c in first)
        others_int = len(rows) > 1 and all(len(r) == 2 and _is_int(r[1].strip()) for _, r in rows[1:])
        if label in LABEL_NAMES or text in TEXT_NAMES or (others_int and not _is_int(label)):
            rows = rows[1:]
    out: list[tuple[str, str]] = []
    for line, r in rows:
        if len(r) != 2:
            raise DynapruneError(f"{p}: line {line}: {len(r)} columns, expected 2 (text<TAB>label)")
        text, label = r[0].strip(), r[1].strip()
        if not text:
            raise DynapruneError(f"{p}: line {line}: empty text")
        if not label:
            raise DynapruneError(f"{p}: line {line}: empty label")
        out.append((text, label))
    if not out:
        raise DynapruneError(f"{p}: no examples (only a header)")
    as_int = all(_is_int(lab) for _, lab in out)
    return [LabeledText(t, int(lab) if as_int else lab) for t, lab in out]

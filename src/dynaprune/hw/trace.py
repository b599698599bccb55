"""Workload traces in the SpAtten CSV schema (the hardware model's input, read and written here).

One row is one (iteration, layer, head) attention request of one query, as published with SpAtten's
hardware model (``../shared/data/spatten-workloads``, columns in ``COLUMNS``). Conventions we read
from the published files and keep when writing:
  * a bit width of -1 means "not quantized"; ``auto_requant_thres``/``auto_requant_incre``/``topk``
    are -1 when unused;
  * some files carry a line naming the experiment config (first cell filled, all others empty); it may
    sit anywhere and is not a data row; the writer puts it last, as the published files do;
  * ``embedding_length_D`` is written as a float ("64.0") and must hold an integer;
  * ``topk`` on an ``if_topk`` row is the number of tokens the cascade token pruning keeps for what
    follows (the next layer, or after the last layer the next iteration, whose selection is made
    over all ``sentence_length_L`` tokens).
Summarization (our extension, inside the same schema): consecutive rows with the same
(iteration, layer, head) are the queries of one prefill pass over the same keys and values; the
simulators fetch those K/V once and reuse them.

Every row is validated; a bad file ends with one ``DynapruneError`` naming the line and the column.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dynaprune.errors import DynapruneError

COLUMNS: tuple[str, ...] = (
    "iteration_id", "layer_id", "head_id", "embedding_length_D", "sentence_length_L", "key_fetch_num",
    "quant_key_bit", "quant_query_bit", "auto_requant_thres", "if_requant", "auto_requant_incre",
    "value_fetch_num", "quant_value_bit", "if_accumulate_importance", "if_rescale_previous_importance",
    "if_topk", "topk",
)
BOOL_COLUMNS = ("if_requant", "if_accumulate_importance", "if_rescale_previous_importance", "if_topk")
FLOAT_COLUMNS = ("auto_requant_thres",)
INT_COLUMNS = tuple(c for c in COLUMNS if c not in BOOL_COLUMNS + FLOAT_COLUMNS)
BIT_COLUMNS = ("quant_key_bit", "quant_query_bit", "quant_value_bit")
MAX_BITS = 32

_TRUE = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One attention request (one query of one head); field names are the CSV columns.

    ``value_fetch_num`` defaults to ``key_fetch_num`` (no local value pruning). Invalid values raise
    ``DynapruneError`` with the offending column.
    """

    iteration_id: int
    layer_id: int
    head_id: int
    embedding_length_D: int
    sentence_length_L: int
    key_fetch_num: int
    quant_key_bit: int = -1
    quant_query_bit: int = -1
    auto_requant_thres: float = -1.0
    if_requant: bool = False
    auto_requant_incre: int = -1
    value_fetch_num: int | None = None
    quant_value_bit: int = -1
    if_accumulate_importance: bool = False
    if_rescale_previous_importance: bool = False
    if_topk: bool = False
    topk: int = -1

    def __post_init__(self) -> None:
        if self.value_fetch_num is None:
            object.__setattr__(self, "value_fetch_num", self.key_fetch_num)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in BOOL_COLUMNS:
                if not isinstance(v, (bool, np.bool_)):
                    raise DynapruneError(f"{f.name} must be True or False, got {v!r}")
            elif f.name in FLOAT_COLUMNS:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or math.isnan(v):
                    raise DynapruneError(f"{f.name} must be a number, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DynapruneError(f"{f.name} must be an integer, got {v!r}")
        problem = _row_problem(self.as_dict())
        if problem:
            raise DynapruneError(problem)

    def as_dict(self) -> dict[str, int | float | bool]:
        return {c: getattr(self, c) for c in COLUMNS}


def _row_problem(r: dict) -> str | None:
    """The first schema violation of a parsed row, as a message naming the column, or None."""
    for c in ("iteration_id", "layer_id", "head_id", "key_fetch_num", "value_fetch_num"):
        if r[c] < 0:
            return f"{c} must be >= 0, got {r[c]}"
    for c in ("embedding_length_D", "sentence_length_L"):
        if r[c] < 1:
            return f"{c} must be >= 1, got {r[c]}"
    if r["key_fetch_num"] > r["sentence_length_L"]:
        return f"key_fetch_num {r['key_fetch_num']} > sentence_length_L {r['sentence_length_L']}"
    if r["value_fetch_num"] > r["key_fetch_num"]:
        return (f"value_fetch_num {r['value_fetch_num']} > key_fetch_num {r['key_fetch_num']} "
                "(a pruned token's value cannot be fetched)")
    for c in BIT_COLUMNS:
        if r[c] != -1 and not 1 <= r[c] <= MAX_BITS:
            return f"{c} must be -1 (not quantized) or 1..{MAX_BITS}, got {r[c]}"
    if r["auto_requant_incre"] != -1 and not 0 <= r["auto_requant_incre"] <= MAX_BITS:
        return f"auto_requant_incre must be -1 or 0..{MAX_BITS}, got {r['auto_requant_incre']}"
    thres = r["auto_requant_thres"]
    if thres != -1 and not 0 <= thres <= 1:
        return f"auto_requant_thres must be -1 or a probability in [0, 1], got {thres}"
    if r["if_requant"] and (r["quant_key_bit"] == -1 or r["auto_requant_incre"] <= 0):
        return "if_requant needs quant_key_bit (MSBs) and auto_requant_incre (LSBs) >= 1"
    if r["topk"] != -1 and not 0 <= r["topk"] <= r["sentence_length_L"]:
        return f"topk must be -1 or 0..sentence_length_L ({r['sentence_length_L']}), got {r['topk']}"
    if r["if_topk"] and r["topk"] == -1:
        return "if_topk is True but topk is -1 (how many tokens to keep?)"
    return None


@dataclass(frozen=True)
class Trace:
    """A validated trace held column-wise (numpy arrays keyed by column name) for fast simulation."""

    columns: dict[str, np.ndarray]
    config: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.columns]
        if missing:
            raise DynapruneError(f"trace is missing columns: {', '.join(missing)}")
        n = {len(v) for v in self.columns.values()}
        if len(n) != 1:
            raise DynapruneError("trace columns differ in length")

    def __len__(self) -> int:
        return len(self.columns["iteration_id"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def rows(self) -> Iterator[TraceRow]:
        cols = [self.columns[c].tolist() for c in COLUMNS]
        for values in zip(*cols, strict=True):
            yield TraceRow(*values)

    def replace(self, **columns: np.ndarray | int | float | bool) -> Trace:
        """A copy with some columns replaced (scalars broadcast), re-validated."""
        new = dict(self.columns)
        for name, value in columns.items():
            if name not in COLUMNS:
                raise DynapruneError(f"unknown trace column '{name}'")
            new[name] = np.broadcast_to(np.asarray(value, dtype=self.columns[name].dtype), (len(self),)).copy()
        out = Trace(new, self.config, self.source)
        validate_columns(out)
        return out

    @classmethod
    def from_rows(cls, rows: Iterable[TraceRow], config: str | None = None) -> Trace:
        rows = list(rows)
        if not rows:
            raise DynapruneError("a trace needs at least one row")
        cols = {c: np.array([getattr(r, c) for r in rows], dtype=_dtype(c)) for c in COLUMNS}
        return cls(cols, config)


def _dtype(column: str) -> type:
    return bool if column in BOOL_COLUMNS else float if column in FLOAT_COLUMNS else np.int64


def validate_columns(trace: Trace) -> None:
    """Vectorised schema check of every row; the first bad row is reported with its column."""
    c = trace.columns
    bad = np.zeros(len(trace), dtype=bool)
    for name in ("iteration_id", "layer_id", "head_id", "key_fetch_num", "value_fetch_num"):
        bad |= c[name] < 0
    bad |= (c["embedding_length_D"] < 1) | (c["sentence_length_L"] < 1)
    bad |= c["key_fetch_num"] > c["sentence_length_L"]
    bad |= c["value_fetch_num"] > c["key_fetch_num"]
    for name in BIT_COLUMNS:
        bad |= (c[name] != -1) & ((c[name] < 1) | (c[name] > MAX_BITS))
    inc, thres = c["auto_requant_incre"], c["auto_requant_thres"]
    bad |= (inc != -1) & ((inc < 0) | (inc > MAX_BITS))
    bad |= np.isnan(thres) | ((thres != -1) & ((thres < 0) | (thres > 1)))
    bad |= c["if_requant"] & ((c["quant_key_bit"] == -1) | (inc <= 0))
    bad |= (c["topk"] != -1) & ((c["topk"] < 0) | (c["topk"] > c["sentence_length_L"]))
    bad |= c["if_topk"] & (c["topk"] == -1)
    if bad.any():
        i = int(np.argmax(bad))
        row = {name: c[name][i].item() for name in COLUMNS}
        raise DynapruneError(f"trace row {i}: {_row_problem(row)}")


# ------------------------------------------------------------------------------------------ read


def _parse(column: str, raw: str) -> int | float | bool:
    """A cell's value; ValueError says what the cell should be ("True or False", "a number", ...)."""
    text = raw.strip()
    if column in BOOL_COLUMNS:
        if text.lower() not in _TRUE:
            raise ValueError("True or False")
        return _TRUE[text.lower()]
    kind = "a number" if column in FLOAT_COLUMNS else "an integer"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(kind) from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{kind} (finite)")
    if column in FLOAT_COLUMNS:
        return value
    if value != int(value):
        raise ValueError(kind)
    return int(value)


def _is_config_line(cells: list[str]) -> bool:
    first = cells[0].strip()
    if not first or any(c.strip() for c in cells[1:]):
        return False
    try:
        float(first)
    except ValueError:
        return True
    return False


def read_trace(path: str | Path) -> Trace:
    """Read and validate a workload CSV (header row, data rows, optional config-name line)."""
    from dynaprune.user_paths import check_input_file

    path = check_input_file(path, "trace file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DynapruneError(f"cannot read trace {path}: {e}") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise DynapruneError(f"{path}: empty file (expected a header row with {', '.join(COLUMNS)})")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DynapruneError(f"{path}: missing columns: {', '.join(missing)}")
    where = [header.index(c) for c in COLUMNS]
    values: dict[str, list] = {c: [] for c in COLUMNS}
    config = None
    for lineno, cells in enumerate(reader, start=2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if _is_config_line(cells):
            config = config or cells[0].strip()
            continue
        if len(cells) < len(header):
            raise DynapruneError(f"{path}:{lineno}: expected {len(header)} fields, got {len(cells)}")
        row = {}
        for c, j in zip(COLUMNS, where, strict=True):
            try:
                row[c] = _parse(c, cells[j])
            except ValueError as e:
                raise DynapruneError(f"{path}:{lineno}: column '{c}': {cells[j].strip()!r} is not {e}") from None
        problem = _row_problem(row)
        if problem:
            raise DynapruneError(f"{path}:{lineno}: {problem}")
        for c in COLUMNS:
            values[c].append(row[c])
    if not values["iteration_id"]:
        raise DynapruneError(f"{path}: no data rows")
    cols = {c: np.array(v, dtype=_dtype(c)) for c, v in values.items()}
    return Trace(cols, config, str(path))


# ----------------------------------------------------------------------------------------- write


def _format(column: str, value: int | float | bool) -> str:
    if column in BOOL_COLUMNS:
        return "True" if value else "False"
    if column == "embedding_length_D":
        return f"{float(value):.1f}"
    if column in FLOAT_COLUMNS:
        return str(int(value)) if float(value) == int(value) else repr(float(value))
    return str(int(value))


def write_trace(path: str | Path, rows: Iterable[TraceRow] | Trace, config: str | None = None) -> Path:
    """Write rows (or a Trace) in the published schema, atomically; returns the path.

    ``config`` (or the trace's own) is written as the last line, the way the published files name the
    experiment that produced them.
    """
    trace = rows if isinstance(rows, Trace) else Trace.from_rows(rows, config)
    validate_columns(trace)
    config = config if config is not None else trace.config
    if config is not None and ("," in config or "\n" in config or not config.strip()):
        raise DynapruneError("trace config name must be one non-empty line without commas")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            cols = [trace.columns[c].tolist() for c in COLUMNS]
            for values in zip(*cols, strict=True):
                w.writerow([_format(c, v) for c, v in zip(COLUMNS, values, strict=True)])
            if config:
                w.writerow([config] + [""] * (len(COLUMNS) - 1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

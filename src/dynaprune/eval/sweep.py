"""Sweeps: a grid of (model x task x recipe) runs from a YAML config, one JSON line per finished run.

Config (YAML)::

    name: minilm-token-pruning
    results: results/minilm-token.jsonl      # optional, the CLI's --out wins
    runs:
      - model: minilm-l6                     # or a list of models
        task: sts                            # sts | classify | sst2 | lm | generate
        data: ../shared/data/stsb/dev.tsv    # optional: the task's default data otherwise
        options: {max_examples: 500}         # any `dynaprune eval` option
        recipes: [dense, "token=0.5"]        # one run per recipe

Resuming: every run has a ``run_id`` (a hash of everything that defines it). A restarted sweep reads the
results file, skips runs already there and appends the rest; finished lines are never rewritten (a
partial last line left by a kill is dropped). Everything is validated before the first run starts; an
error names the config line it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynaprune.errors import DynapruneError

SCHEMA = "dynaprune.result/1"
TASKS = ("sts", "classify", "sst2", "lm", "generate")
LM_PROTOCOLS = ("window", "continue", "stream")  # = eval.lm.PROTOCOLS (that module imports torch)
OPTIONS = {
    "max_examples": int, "max_train": int, "max_tokens": int, "window": int, "protocol": str,
    "context": int, "continuation": int, "batch_size": int, "train_data": str,
    "stream_tokens": int, "max_new_tokens": int,
}


@dataclass(frozen=True)
class RunSpec:
    model: str
    task: str
    data: str | None
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # where in the config it came from

    @property
    def run_id(self) -> str:
        key = json.dumps([self.model, self.task, self.data, self.recipe, sorted(self.options.items())])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.model} · {self.task} · {self.recipe}"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping (for error messages)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def load_config(
    path: str | Path, validate_recipe: Callable[[str, str, str], None] | None = None, base: Path | None = None
) -> tuple[dict, list[RunSpec]]:
    """Parse and validate a sweep config; returns (header, run specs). Raises DynapruneError with the line.
    ``validate_recipe(recipe, task, lm protocol)`` refuses a recipe that is invalid or would do nothing there."""
    from dynaprune.models.registry import KNOWN_MODELS
    from dynaprune.paths import default_data

    path = Path(path)
    if path.is_dir():
        raise DynapruneError(f"sweep config {path} is a folder, expected a file (.yaml)")
    if not path.is_file():
        raise DynapruneError(f"sweep config not found: {path}")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise DynapruneError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("runs"), list) or not cfg["runs"]:
        raise DynapruneError(f"{path}: needs a non-empty 'runs:' list")
    base = base or Path.cwd()
    specs: list[RunSpec] = []
    for entry in cfg["runs"]:
        if not isinstance(entry, dict):
            raise DynapruneError(f"{path}: each entry of 'runs' must be a mapping")
        line = entry.pop("__line__", 0)
        where = f"{path}:{line}"
        unknown = set(entry) - {"model", "task", "data", "options", "recipes", "recipe"}
        if unknown:
            raise DynapruneError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        options = dict(entry.get("options") or {})
        options.pop("__line__", None)
        for key, value in options.items():
            if key not in OPTIONS:
                raise DynapruneError(f"{where}: unknown option {key!r} (known: {', '.join(OPTIONS)})")
            if not isinstance(value, OPTIONS[key]) or (OPTIONS[key] is int and value <= 0):
                raise DynapruneError(f"{where}: option {key}={value!r} must be a positive {OPTIONS[key].__name__}")
        protocol = options.get("protocol", "window")
        if protocol not in LM_PROTOCOLS:
            raise DynapruneError(f"{where}: option protocol={protocol!r} is not one of {', '.join(LM_PROTOCOLS)}")
        recipes = [str(r) for r in _as_list(entry.get("recipes", entry.get("recipe", "dense")))]
        for model in _as_list(entry.get("model")):
            if model is None:
                raise DynapruneError(f"{where}: 'model' is missing")
            if model not in KNOWN_MODELS and not (base / str(model)).exists() and not Path(model).exists():
                raise DynapruneError(f"{where}: unknown model {model!r} (not an alias, no such path)")
            for task in _as_list(entry.get("task")):
                if task not in TASKS:
                    raise DynapruneError(f"{where}: unknown task {task!r} (known: {', '.join(TASKS)})")
                data = entry.get("data")
                for name, file in (("data", data or default_data(task).get("data")),
                                   ("train_data", options.get("train_data") or default_data(task).get("train_data"))):
                    if file is not None and Path(file).is_dir():
                        raise DynapruneError(f"{where}: {name} {file} is a folder, expected a file")
                    if file is not None and not Path(file).is_file():
                        raise DynapruneError(f"{where}: {name} file not found: {file}")
                for recipe in recipes:
                    if validate_recipe is not None:
                        try:
                            validate_recipe(recipe, task, protocol)  # keys that act for this task
                        except DynapruneError as e:
                            raise DynapruneError(f"{where}: recipe {recipe!r}: {e}") from None
                    specs.append(RunSpec(str(model), task, str(data) if data else None, recipe, options, line))
    header = {k: v for k, v in cfg.items() if k not in ("runs", "__line__")}
    return header, specs


def read_results(path: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """All result lines of a results file (none if it does not exist yet).

    A last line cut short by a kill (no newline after it, not JSON) is dropped, with ``warn`` told its line
    number; any other line that is not a JSON object of this schema is refused, naming the line: a
    corrupt line in the middle means the file is not what a sweep wrote, and skipping it would hide runs.
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise DynapruneError(f"{path} is a folder, expected a results file (.jsonl)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DynapruneError(f"{path}: not a dynaprune results file (not UTF-8 text)") from None
    except OSError as e:
        raise DynapruneError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n") and rows:  # a partial last line from an interrupted write
                if warn is not None:
                    warn(f"{path}:{i}: skipped an incomplete last line (an interrupted write)")
                continue
            raise DynapruneError(f"{path}:{i}: not a dynaprune results line (not JSON: {e.msg})") from None
        if not isinstance(row, dict):
            raise DynapruneError(f"{path}:{i}: not a dynaprune results line (a JSON {type(row).__name__}, "
                                 "expected an object)")
        if "schema" not in row:
            raise DynapruneError(f"{path}:{i}: not a dynaprune results line (no 'schema'; this dynaprune reads "
                                 f"{SCHEMA!r})")
        if row["schema"] != SCHEMA:
            raise DynapruneError(
                f"{path}:{i}: results of schema {row['schema']!r}; this dynaprune reads {SCHEMA!r}"
            )
        rows.append(row)
    return rows


def _drop_partial_tail(path: Path) -> None:
    """Cut a trailing line without a newline (a run killed mid-write); finished lines stay as they are."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, default=str) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def failed_row(spec: RunSpec, error: str, command: str = "") -> dict:
    """The line of a point that raised: it names the point and the error; a resumed sweep runs it again."""
    return {"schema": SCHEMA, "run_id": spec.run_id, "config_line": spec.line, "status": "failed",
            "model": spec.model, "task": spec.task, "recipe": spec.recipe, "error": error, "command": command}


def pending(specs: list[RunSpec], results_path: Path) -> Iterator[RunSpec]:
    done = {row.get("run_id") for row in read_results(results_path) if row.get("status") != "failed"}
    seen: set[str] = set()
    for spec in specs:
        if spec.run_id not in done and spec.run_id not in seen:
            seen.add(spec.run_id)
            yield spec


def run_sweep(
    specs: list[RunSpec],
    results_path: str | Path,
    run: Callable[[RunSpec], dict],
    on_start: Callable[[RunSpec, int, int], None] | None = None,
) -> int:
    """Run every spec not yet in the results file, appending one line each. Returns how many ran."""
    results_path = Path(results_path)
    _drop_partial_tail(results_path)
    todo = list(pending(specs, results_path))
    for i, spec in enumerate(todo):
        if on_start:
            on_start(spec, i, len(todo))
        try:
            row = {"schema": SCHEMA, "run_id": spec.run_id, "config_line": spec.line, **run(spec)}
        except DynapruneError as e:  # one bad point is a failed line; the others still run
            row = failed_row(spec, str(e))
        append_result(results_path, row)
    return len(todo)

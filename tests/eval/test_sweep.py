"""Sweeps: validation with line numbers, resume after an interruption, schema checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import SCHEMA, load_config, read_results, run_sweep


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\t1.0\n")
    return path


def config(data_file: Path) -> str:
    return f"""name: t
runs:
  - model: [minilm-l6, smollm2-135m]
    task: sts
    data: {data_file}
    options: {{max_examples: 10}}
    recipes: [dense, dense2, dense3]
"""


def fake_run(spec) -> dict:
    return {"model": spec.model, "recipe": spec.recipe, "metric": {"value": len(spec.recipe) + len(spec.model)}}


def test_grid_expands(tmp_path, data_file):
    _, specs = load_config(write(tmp_path, config(data_file)))
    assert len(specs) == 6 and len({s.run_id for s in specs}) == 6
    assert all(s.line == 3 for s in specs)


def test_interrupted_sweep_resumes_to_the_same_file(tmp_path, data_file):
    _, specs = load_config(write(tmp_path, config(data_file)))
    whole = tmp_path / "whole.jsonl"
    assert run_sweep(specs, whole, fake_run) == 6

    resumed = tmp_path / "resumed.jsonl"
    calls = []

    def dies_after_two(spec):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(spec)
        return fake_run(spec)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, resumed, dies_after_two)
    finished = resumed.read_bytes()
    with open(resumed, "ab") as f:  # a kill in the middle of writing a line
        f.write(b'{"schema": "dynaprune.res')
    assert run_sweep(specs, resumed, fake_run) == 4
    assert resumed.read_bytes().startswith(finished)  # finished lines never rewritten
    assert resumed.read_text() == whole.read_text()
    assert run_sweep(specs, resumed, fake_run) == 0


@pytest.mark.parametrize(
    "body, message",
    [
        ("runs:\n  - model: gpt-17\n    task: sts\n", "sweep.yaml:2: unknown model 'gpt-17'"),
        ("runs:\n  - model: minilm-l6\n    task: translate\n", "sweep.yaml:2: unknown task 'translate'"),
        ("runs:\n  - model: minilm-l6\n    task: sts\n    data: /no/such.tsv\n", "sweep.yaml:2: data file not found"),
        ("runs:\n  - model: minilm-l6\n    task: sts\n    options: {max_tokens: 0}\n", "max_tokens=0"),
        ("runs:\n  - model: minilm-l6\n    task: sts\n    options: {speed: 3}\n", "unknown option 'speed'"),
        ("name: x\n", "non-empty 'runs:'"),
        ("runs:\n  - model: smollm2-135m\n    task: lm\n    options: {protocol: sliding}\n",
         "sweep.yaml:2: option protocol='sliding' is not one of window, continue, stream"),
        ("runs:\n  - model: minilm-l6\n    task: sts\n    data: /\n",
         "sweep.yaml:2: data / is a folder, expected a file"),
    ],
)
def test_bad_configs_name_the_line(tmp_path, body, message):
    with pytest.raises(DynapruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, body))


def test_bad_recipe_is_rejected_before_running(tmp_path, data_file):
    def validate(recipe, task, protocol):
        if recipe != "dense":
            raise DynapruneError("unknown recipe key 'tokn'")

    with pytest.raises(DynapruneError, match="sweep.yaml:2: recipe 'tokn=0.5'"):
        load_config(write(tmp_path, f"runs:\n  - model: minilm-l6\n    task: sts\n    data: {data_file}\n"
                                    "    recipes: [dense, tokn=0.5]\n"), validate_recipe=validate)


def test_other_schema_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"schema": "dynaprune.result/99"}) + "\n")
    with pytest.raises(DynapruneError, match="schema"):
        read_results(path)
    path.write_text(json.dumps({"schema": SCHEMA, "run_id": "x"}) + "\n")
    assert len(read_results(path)) == 1


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(config):
    from dynaprune.cli import _validate_recipe
    from dynaprune.report.plan import sweep_configs

    root = Path(__file__).resolve().parents[2]
    # A demo list (``configs:``) stands for sweep configs; each of those must validate.
    for sweep in sweep_configs(config, base=root):
        header, specs = load_config(root / sweep, validate_recipe=_validate_recipe)
        assert specs and header["results"].endswith(".jsonl")


@pytest.mark.parametrize("body, message", [
    ("    task: sts\n    recipes: [dense, kv=0.5]\n", "sweep.yaml:2: recipe 'kv=0.5': recipe key 'kv'"),
    ("    task: lm\n    recipes: [kv=0.25]\n", "lm --protocol window scores each window in one forward"),
    ("    task: lm\n    recipes: [kv=64]\n", "kv_tokens=64"),
])
def test_recipe_without_effect_refused_with_the_line(tmp_path, body, message):
    from dynaprune.cli import _validate_recipe

    model = "minilm-l6" if "sts" in body else "smollm2-135m"
    with pytest.raises(DynapruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, f"runs:\n  - model: {model}\n{body}"), validate_recipe=_validate_recipe)
    ok = "    task: lm\n    options: {protocol: continue}\n    recipes: [kv=0.25, kv_tokens=64]\n"
    assert len(load_config(write(tmp_path, f"runs:\n  - model: smollm2-135m\n{ok}"),
                           validate_recipe=_validate_recipe)[1]) == 2


ROW = {"schema": SCHEMA, "run_id": "x"}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]\n", "r.jsonl:1: not a dynaprune results line (a JSON list, expected an object)"),
    (f"{json.dumps(ROW)}\n{{cut\n{json.dumps(ROW)}\n", "r.jsonl:2: not a dynaprune results line (not JSON"),
    ('{"run_id": "x"}\n', "r.jsonl:1: not a dynaprune results line (no 'schema'"),
])
def test_broken_results_lines_refused_with_the_line(tmp_path, text, message):
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    with pytest.raises(DynapruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_results(path)


def test_only_an_interrupted_last_line_is_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"schema": "dyna')
    warnings: list[str] = []
    assert read_results(path, warnings.append) == [ROW]
    assert warnings == [f"{path}:2: skipped an incomplete last line (an interrupted write)"]
    with pytest.raises(DynapruneError, match="is a folder"):
        read_results(tmp_path)

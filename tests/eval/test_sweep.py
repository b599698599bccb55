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
    ],
)
def test_bad_configs_name_the_line(tmp_path, body, message):
    with pytest.raises(DynapruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, body))


def test_bad_recipe_is_rejected_before_running(tmp_path, data_file):
    def validate(recipe):
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

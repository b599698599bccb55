"""The technique registry: every committed recipe keeps its canonical form, keys are owned once,
techniques that cannot compose are refused naming both keys, recipes build from dataclasses."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dynaprune.errors import DynapruneError
from dynaprune.prune import registry
from dynaprune.prune.keys import Key, parse_float
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.scorers.base import TokenScorer
from dynaprune.prune.technique import Technique
from dynaprune.prune.techniques.head_cascade import HeadPruning
from dynaprune.prune.techniques.progressive_quant import Quantization, QuantSetting
from dynaprune.prune.techniques.token_cascade import TokenPruning

ROOT = Path(__file__).resolve().parents[2]
# Canonical str() and to_dict() of every committed recipe, computed with the code before the registry.
CANONICAL = json.loads((Path(__file__).parent / "data" / "recipes_canonical.json").read_text())


def committed_recipes() -> set[str]:
    found: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "recipe" and isinstance(v, str):
                    found.add(v)
                if k == "recipes" and isinstance(v, list):
                    found.update(s for s in v if isinstance(s, str))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in glob.glob(str(ROOT / "benchmarks/results/**/*.jsonl"), recursive=True):
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    walk(json.loads(line))
                except ValueError:
                    pass
    for path in glob.glob(str(ROOT / "configs/**/*.yaml"), recursive=True):
        walk(yaml.safe_load(Path(path).read_text()))
    return found


def test_every_committed_recipe_parses_to_its_canonical_form(monkeypatch):
    monkeypatch.chdir(ROOT)  # @configs/... recipe files are relative to the repository
    found = committed_recipes()
    assert len(found) > 50 and set(CANONICAL) <= found | set(CANONICAL)
    for text in sorted(found):
        recipe = Recipe.parse(text)
        assert Recipe.parse(str(recipe)) == recipe
        if text in CANONICAL:
            assert str(recipe) == CANONICAL[text]["str"], text
            assert recipe.to_dict() == CANONICAL[text]["dict"], text
            assert Recipe.from_json(recipe.to_json()) == recipe


def test_a_key_or_score_name_registered_twice_is_an_error():
    @dataclass(frozen=True)
    class Again(Technique):
        token: float | None = None
        role = "tokens"
        keys = (Key("token", parse_float),)

    with pytest.raises(ValueError, match="recipe key 'token' of Again is already registered by TokenPruning"):
        registry.register(Again)

    @dataclass(frozen=True)
    class Spatten2(TokenScorer):
        name = "spatten"

    with pytest.raises(ValueError, match="score=spatten is already registered"):
        registry.register_scorer(Spatten2)
    assert registry.OWNER["token"] is TokenPruning and registry.SCORERS["spatten"].__name__ == "SpAttenScore"


@pytest.mark.parametrize("text, first, second", [
    ("quant=4+4@0.1,block=0.2", "quant", "block"),
    ("quant=8,fixed=8.8", "quant", "fixed"),
    ("value=0.5,hdp_head=10", "value", "hdp_head"),
    ("value=0.5,block_sparsity=0.5", "value", "block_sparsity"),
])
def test_techniques_that_cannot_compose_are_refused_naming_both_keys(text, first, second):
    with pytest.raises(DynapruneError, match=f"recipe keys '{first}' and '{second}' cannot be combined"):
        Recipe.parse(text)


def test_what_composes_still_does():
    for text in ("token=0.5,head=0.8,value=0.5,quant=6+4@0.1", "token=0.6,block=0.3,hdp_head=5,fixed=8.8",
                 "kv=0.25,score=h2o", "approx=on,quant=8", "head=0.5,kv_tokens=64"):
        assert str(Recipe.parse(text)) == str(Recipe.parse(str(Recipe.parse(text))))


def test_two_techniques_of_one_role_are_refused():
    with pytest.raises(DynapruneError, match="'token' and 'token_schedule' set two techniques of one role"):
        Recipe(TokenPruning(token=0.5), TokenPruning(token_schedule=((1, 0.5),)))


def test_a_recipe_built_from_dataclasses_equals_its_string_form():
    recipe = Recipe(HeadPruning(head=0.9), Quantization(QuantSetting(4, 4, 0.1)), TokenPruning(token=0.5))
    assert recipe == Recipe.parse("quant=4+4@0.1,token=0.5,head=0.9")
    assert str(recipe) == "token=0.5,head=0.9,quant=4+4@0.1"
    assert recipe.token == 0.5 and recipe.kv is None and recipe.score == "spatten" and recipe.head_unit == "query"
    assert Recipe(TokenPruning()) == Recipe() and Recipe().token_keep_schedule(4, 9) == [1.0] * 4
    with pytest.raises(DynapruneError, match="recipe key 'token': 2 is outside"):
        TokenPruning(token=2)

"""A random baseline is evaluated under RANDOM_SEEDS and reported as mean and spread (issue 12 item
10): the oracle is each seed's run made directly with evaluate_lm and the statistics module."""

from __future__ import annotations

import json
import math
import statistics

from dynaprune.eval.lm import evaluate_lm
from dynaprune.prune.baselines import RANDOM_SEEDS
from dynaprune.runtime.pruning import make_context


def test_random_recipe_reports_mean_and_spread_of_three_seeds(tiny, tmp_path, monkeypatch, dynaprune_cli):
    import dynaprune

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    monkeypatch.setattr(dynaprune, "load", lambda name, say=None: tiny)
    recipe = "kv=0.25,score=random"
    out = tmp_path / "r.json"
    code, printed = dynaprune_cli("eval", "tiny", "lm", "--data", str(text), "--protocol", "continue",
                                  "--context", "60", "--continuation", "20", "--max-examples", "3",
                                  "--recipe", recipe, "--json", str(out))
    assert code == 0, printed
    metric = json.loads(out.read_text())["metric"]
    direct = [evaluate_lm(tiny, text, protocol="continue", context=60, continuation=20, max_examples=3,
                          ctx_factory=lambda s=seed: make_context(recipe, tiny, seed=s)).metric["value"]
              for seed in RANDOM_SEEDS]
    assert len(RANDOM_SEEDS) == 3 and metric["seeds"] == list(RANDOM_SEEDS)
    assert len(set(direct)) == 3  # the seeds really draw differently
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(metric["per_seed"], direct, strict=True))
    assert math.isclose(metric["value"], statistics.mean(direct), rel_tol=1e-9)
    assert math.isclose(metric["std"], statistics.stdev(direct), rel_tol=1e-6)
    code, printed = dynaprune_cli("eval", "tiny", "lm", "--data", str(text), "--protocol", "continue",
                                  "--context", "60", "--continuation", "20", "--max-examples", "3",
                                  "--recipe", "kv=0.25,score=h2o", "--json", str(out))
    assert code == 0 and "per_seed" not in json.loads(out.read_text())["metric"]  # deterministic: one run

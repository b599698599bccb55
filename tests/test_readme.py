"""The README's Python example that builds a recipe from technique dataclasses runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import dynaprune

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_api_exports_the_techniques():
    from dynaprune.prune.registry import SCORERS, TECHNIQUES

    exported = {getattr(dynaprune, name) for name in dynaprune.__all__}
    assert {t for t in TECHNIQUES if t.__name__ != "TokenScorer"} <= exported
    assert set(SCORERS.values()) <= exported and dynaprune.Recipe in exported


def test_readme_recipe_from_dataclasses_runs(minilm_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "Recipe(TokenPruning" in b)
    exec(compile(snippet, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("token=0.5,head=0.8,quant=4+4@0.1 (2, 384) FLOPs kept 0.")

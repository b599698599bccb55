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


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n## ", start + 1)
    nxt = text.find("\n### ", start + 1)
    return text[start:min(x for x in (end, nxt, len(text)) if x > 0)]


def test_readme_python_section_runs(capsys):
    """Every code block of the README's Python section runs as written (issue 17)."""
    blocks = re.findall(r"```python\n(.*?)```", _section("Python"), flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md#Python", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("torch.Size([384]) torch.Size([2, 384]) FLOPs kept 0.")
    assert lines[-1].startswith("spearman")

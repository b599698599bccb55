"""Short text for the report: recipes with numbers cut to 4 significant digits, and merged duplicate rows."""

from __future__ import annotations

import re

# a decimal with more than 4 digits after the point (an optimizer's -0.10438942909240723), or an exponent
_LONG_NUMBER = re.compile(r"-?\d+\.\d{5,}(?:[eE][-+]?\d+)?|-?\d+(?:\.\d+)?[eE][-+]?\d+")


def short_number(text: str) -> str:
    value = float(text)
    out = f"{value:.4g}"
    return "0" if out in ("-0", "0") else out


def short_recipe(recipe: str | None) -> str:
    """``block=-0.10438942909240723,head=0.3`` -> ``block=-0.1044,head=0.3``; ``None`` / empty -> ``dense``."""
    if not recipe:
        return "dense"
    return _LONG_NUMBER.sub(lambda m: short_number(m.group(0)), recipe)


def merge_duplicates(body: list[list[str]], ref_column: int) -> list[list[str]]:
    """Rows equal in every cell but the run reference become one row listing every reference (first
    seen order), e.g. the same recipe run from two config files."""
    merged: dict[tuple[str, ...], list[str]] = {}
    refs: dict[tuple[str, ...], list[str]] = {}
    for row in body:
        key = tuple(c for i, c in enumerate(row) if i != ref_column)
        if key not in merged:
            merged[key], refs[key] = list(row), []
        refs[key].append(row[ref_column])
    for key, row in merged.items():
        row[ref_column] = ", ".join(dict.fromkeys(refs[key]))
    return list(merged.values())

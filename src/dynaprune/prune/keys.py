"""Recipe keys: how one ``key=value`` item is parsed, checked, printed and written to JSON.

A technique declares its keys (:class:`Key`, one per knob of its frozen dataclass); the recipe parser
(``prune/recipe.py``) knows none of them and goes through these specs. Every user mistake raises
:class:`DynapruneError` naming the key. Also here: the project's single rounding rule for "keep a
fraction of n" (:func:`keep_count`), shared by schedules, selections and cost reports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.errors import DynapruneError

Schedule = tuple[tuple[int, float], ...]


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` items a keep fraction keeps: round half up, at least 1, at most n (0 if n == 0).

    The single rounding rule of the project, so a schedule, a selection and a cost report agree.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def keep_counts(fraction: float, n: torch.Tensor) -> torch.Tensor:
    """:func:`keep_count` for a tensor of counts (e.g. each row's number of real tokens)."""
    n64 = n.to(torch.float64)
    kept = torch.floor(fraction * n64 + 0.5).clamp(min=1.0)
    return torch.minimum(kept, n64).to(torch.long).clamp(min=0)


@dataclass(frozen=True)
class Key:
    """One recipe key: ``parse`` (key, raw string) -> value, ``check`` (key, value) -> canonical value
    (raises naming the key), ``default`` (left out of the canonical string), ``json``: how the value is
    written in a recipe's JSON form (``plain``: as is, ``text``: its string form, ``schedule``: a list
    of [layer, fraction] pairs)."""

    name: str
    parse: Callable[[str, str], Any]
    check: Callable[[str, Any], Any] | None = None
    default: Any = None
    json: str = "plain"


# ---------------------------------------------------------------------- errors and printing
def err(key: str, message: str) -> DynapruneError:
    return DynapruneError(f"recipe key '{key}': {message}")


def fmt_float(value: float | None) -> str:
    text = repr(float(value))  # shortest form that reads back to the same float
    return text[:-2] if text.endswith(".0") else text


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return "/".join(f"{layer}:{fmt_float(fraction)}" for layer, fraction in value)
    if isinstance(value, tuple):  # fixed=(I, F)
        return f"{value[0]}.{value[1]}"
    return str(value)


# ---------------------------------------------------------------------- checks: value -> canonical value
def as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise err(key, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise err(key, f"must be a finite number, got {value}")
    return value


def as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(key, f"must be an integer, got {value!r}")
    return int(value)


def check_ratio(key: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise err(key, f"{fmt_float(value)} is outside (0, 1]; it is the fraction kept, e.g. {key}=0.5")
    return value


def check_min(key: str, value: Any, lowest: float) -> Any:
    if value < lowest:
        raise err(key, f"{value} is below the minimum {lowest}")
    return value


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise err(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def ratio(key: str, value: Any) -> float:
    return check_ratio(key, as_float(key, value))


def number(key: str, value: Any) -> float:
    return as_float(key, value)


def at_least(lowest: float, integer: bool) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        return check_min(key, as_int(key, value) if integer else as_float(key, value), lowest)

    return check


def choice(*choices: str) -> Callable[[str, Any], str]:
    return lambda key, value: check_choice(key, value, choices)


def onoff(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise err(key, f"must be on or off, got {value!r}")
    return value


def schedule(key: str, points: Iterable[Any]) -> Schedule:
    try:
        points = [tuple(p) for p in points]
    except TypeError:
        raise err(key, f"must be a list of (layer, fraction) pairs, got {points!r}") from None
    if not points:
        raise err(key, "is empty")
    out = []
    for point in points:
        if len(point) != 2:
            raise err(key, f"each entry is (layer, fraction), got {point!r}")
        layer = check_min(key, as_int(key, point[0]), 0)
        out.append((layer, check_ratio(key, as_float(key, point[1]))))
    for (l0, f0), (l1, f1) in zip(out, out[1:], strict=False):
        if l1 <= l0:
            raise err(key, f"layers must increase, got {l0} then {l1}")
        if f1 > f0:
            raise err(key, f"fractions must not increase (a pruned unit never comes back): {f0} then {f1}")
    return tuple(out)


def step_schedule(key: str, points: Schedule, n_layers: int) -> list[float]:
    """(layer, fraction) points -> fraction after each layer, holding the last value in between."""
    if points[-1][0] >= n_layers:
        raise err(key, f"names layer {points[-1][0]} but the model has {n_layers} layers (0..{n_layers - 1})")
    out, current, at = [], 1.0, dict(points)
    for layer in range(n_layers):
        current = at.get(layer, current)
        out.append(current)
    return out


# ---------------------------------------------------------------------- parsers: raw string -> value
def parse_float(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise err(key, f"{raw!r} is not a number") from None


def parse_int(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise err(key, f"{raw!r} is not an integer") from None


def parse_schedule(key: str, raw: str) -> Schedule:
    points = []
    for part in raw.split("/"):
        layer, sep, fraction = part.partition(":")
        if not sep:
            raise err(key, f"entry {part!r} is not LAYER:FRACTION (e.g. {key}=2:0.9/4:0.7)")
        points.append((parse_int(key, layer.strip()), parse_float(key, fraction.strip())))
    return tuple(points)


def parse_onoff(key: str, raw: str) -> bool:
    if raw not in ("on", "off"):
        raise err(key, f"{raw!r} is not on or off")
    return raw == "on"


def parse_word(key: str, raw: str) -> str:
    return raw  # checked against its choices when the technique is built


def parse_pair(key: str, raw: str, example: str) -> tuple[int, int]:
    match = re.match(r"^(\d+)\.(\d+)$", raw)
    if not match:
        raise err(key, f"{raw!r} is not {example}")
    return (int(match.group(1)), int(match.group(2)))


def check_layers(n_layers: int) -> None:
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")


def geometric_schedule(target: float, start: int, end: int, n_layers: int) -> list[float]:
    """Entering layer j: 1 before ``start``, ``target ** ((j - start + 1) / steps)`` up to ``end``,
    then ``target``; returned shifted by one (entry i = after layer i = entering layer i + 1)."""
    steps = end - start + 1

    def entering(j: int) -> float:
        if j < start:
            return 1.0
        if j >= end:
            return target
        return target ** ((j - start + 1) / steps)

    return [entering(i + 1) for i in range(n_layers)]

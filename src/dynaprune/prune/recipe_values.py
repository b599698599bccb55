"""Recipe values: the rounding rule, quantization settings, and the checks and parsers of each key's value.

Split from ``prune/recipe.py`` (which holds the :class:`~dynaprune.prune.recipe.Recipe` dataclass and its
string and JSON forms); every function here raises :class:`DynapruneError` naming the recipe key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dynaprune.errors import DynapruneError

SCORES = ("spatten", "h2o", "streaming", "random", "instant")
BLOCK_SCORES = ("abs_sum", "sum", "max")  # the same names as prune.hdp.BLOCK_SCORES
HEAD_UNITS = ("query", "kv")
PAPER_QUANT_SETTINGS = ((4, 4), (6, 4), (8, 4), (10, 4), (12, 4))

# Length-adaptive token pruning (see Recipe.token_keep_schedule).
DEFAULT_TOKEN_ADAPT = 1.0 / 3.0
DEFAULT_TOKEN_REF_LEN = 128

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
class QuantSetting:
    """``quant=B`` (static, ``lsb_bits == 0``) or ``quant=M+L@T`` (progressive, Sec. III-D)."""

    bits: int  # static bits, or the MSB bits of a progressive setting
    lsb_bits: int = 0
    threshold: float | None = None  # progressive only: LSBs fetched when a row's max prob < threshold

    @property
    def progressive(self) -> bool:
        return self.lsb_bits > 0

    @property
    def total_bits(self) -> int:
        return self.bits + self.lsb_bits

    def __str__(self) -> str:
        if not self.progressive:
            return str(self.bits)
        return f"{self.bits}+{self.lsb_bits}@{_fmt_float(self.threshold)}"



# ---------------------------------------------------------------------- schedules of a recipe
def token_keep_schedule(recipe: Any, n_layers: int, seq_len: int) -> list[float]:
    """Fraction of the ORIGINAL ``seq_len`` tokens alive after each layer (entry i = after layer i,
    i.e. entering layer i + 1). Non-increasing; reaches the target after the last pruning layer.

    Default schedule for ``token=K`` (cascade, Sec. III-A; "the deeper the layer, the more tokens
    are pruned"): layers ``0 .. s-1`` see every token, with ``s = max(1, round(n_layers / 8))``,
    because "in BERT, we accumulate importance scores in former heads and layers and apply token
    pruning to latter ones". Layers ``s .. e`` with ``e = max(s, round(n_layers / 2))`` each
    enter with a geometrically smaller share, ``K_L ** ((j - s + 1) / (e - s + 1))`` for layer j
    (the same fraction of the survivors is dropped at every step), and layers after e run on
    ``K_L``. Mid-depth is where the published SpAtten GPT-2-medium trace reaches its final keep
    ratio (24 layers: layers 0-1 dense, then 0.9, 0.8, 0.6, 0.3 from layer 11 on).

    Length-adaptive rule ("since long sentences are naturally more redundant, we also adjust the
    pruning ratios based on sentence length: the longer, the more tokens are pruned away"):
    ``K_L = K * min(1, token_ref_len / seq_len) ** token_adapt``. Inputs up to ``token_ref_len``
    (default 128, above the BERT benchmarks' "less than 100" tokens) keep exactly K; longer ones
    keep a share shrinking as ``L ** (-1/3)`` by default. The exponent is our reading of the
    paper's figures: about 2x token pruning at BERT lengths against about 4x ("around 4x tokens
    for PTB") at GPT-2 lengths of about 1000, i.e. 2x more pruning for 8x the length.

    ``token_schedule`` is returned literally (no length adaptation); no token pruning gives 1.0s.
    """
    _check_layers(n_layers)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if recipe.token_schedule is not None:
        return _step_schedule("token_schedule", recipe.token_schedule, n_layers)
    if recipe.token is None:
        return [1.0] * n_layers
    adapt = DEFAULT_TOKEN_ADAPT if recipe.token_adapt is None else recipe.token_adapt
    ref_len = DEFAULT_TOKEN_REF_LEN if recipe.token_ref_len is None else recipe.token_ref_len
    target = recipe.token * min(1.0, ref_len / seq_len) ** adapt
    start = max(1, round(n_layers / 8))
    end = max(start, round(n_layers / 2))
    return _geometric_schedule(target, start, end, n_layers)

def token_keep_counts(recipe: Any, n_layers: int, seq_len: int) -> list[int]:
    """:func:`token_keep_schedule` as token counts (:func:`keep_count` of ``seq_len``)."""
    return [keep_count(f, seq_len) for f in token_keep_schedule(recipe, n_layers, seq_len)]

def head_keep_schedule(recipe: Any, n_layers: int, n_heads: int) -> list[int]:
    """Number of head units alive after each layer (entry i = after layer i). Non-increasing.

    ``n_heads`` counts units as ``head_unit`` defines them: query heads, or KV groups for
    ``head_unit=kv`` (:meth:`head_units` gives both numbers). Default schedule for ``head=K``:
    heads are pruned only in the last third, layers ``s = max(1, round(2 n_layers / 3))`` to
    ``n_layers - 1`` entering with ``K ** ((j - s + 1) / (n_layers - s))`` of the heads, rounded by
    :func:`keep_count`. Heads are far less redundant than tokens (the paper prunes 1.1x heads
    against 3.8x tokens) and their importance (sum of |attention_out|) needs several layers to
    accumulate; the published GPT-2-medium trace prunes heads from layer 16 of 24 only. No
    length adaptation for heads. ``head_schedule`` fractions are used literally.
    """
    _check_layers(n_layers)
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    if recipe.head_schedule is not None:
        fractions = _step_schedule("head_schedule", recipe.head_schedule, n_layers)
    elif recipe.head is not None:
        start = max(1, round(2 * n_layers / 3))
        end = max(start, n_layers - 1)
        fractions = _geometric_schedule(recipe.head, start, end, n_layers)
    else:
        return [n_heads] * n_layers
    return [keep_count(f, n_heads) for f in fractions]


# ---------------------------------------------------------------------- recipe files
def read_recipe_file(path: str) -> str:
    """The recipe text of a recipe file (``@PATH``): comments (``#``) and blank lines dropped, the other
    lines joined with commas. Unreadable, empty or nested (``@`` inside) files raise DynapruneError."""
    if not path.strip():
        raise DynapruneError("recipe '@' needs a file path: --recipe @recipe.txt")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise DynapruneError(f"recipe file {path!r} cannot be read: {reason}") from None
    items = [line.split("#", 1)[0].strip().strip(",") for line in lines]
    items = [item for item in items if item]
    if not items:
        raise DynapruneError(f"recipe file {path!r} holds no recipe (only comments or blank lines)")
    text = ",".join(items)
    if text.startswith("@") or ",@" in text:
        raise DynapruneError(f"recipe file {path!r} names another recipe file; write the keys themselves")
    return text


# ---------------------------------------------------------------------- helpers: schedules
def _check_layers(n_layers: int) -> None:
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")


def _geometric_schedule(target: float, start: int, end: int, n_layers: int) -> list[float]:
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


def _step_schedule(key: str, schedule: Schedule, n_layers: int) -> list[float]:
    """(layer, fraction) points -> fraction after each layer, holding the last value in between."""
    if schedule[-1][0] >= n_layers:
        raise _err(key, f"names layer {schedule[-1][0]} but the model has {n_layers} layers (0..{n_layers - 1})")
    out, current, points = [], 1.0, dict(schedule)
    for layer in range(n_layers):
        current = points.get(layer, current)
        out.append(current)
    return out


# ---------------------------------------------------------------------- helpers: values and errors
def _err(key: str, message: str) -> DynapruneError:
    return DynapruneError(f"recipe key '{key}': {message}")


def _fmt_float(value: float | None) -> str:
    text = repr(float(value))  # shortest form that reads back to the same float
    return text[:-2] if text.endswith(".0") else text


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return _fmt_float(value)
    if isinstance(value, QuantSetting):
        return str(value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return "/".join(f"{layer}:{_fmt_float(fraction)}" for layer, fraction in value)
    if isinstance(value, tuple):  # fixed=(I, F)
        return f"{value[0]}.{value[1]}"
    return str(value)


def _json_scalar(key: str, pair: Any, i: int) -> Any:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise _err(key, f"each entry is [layer, fraction], got {pair!r}")
    value = pair[i]
    return repr(value) if isinstance(value, float) else value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _err(key, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _err(key, f"must be a finite number, got {value}")
    return value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(key, f"must be an integer, got {value!r}")
    return int(value)


def _check_ratio(key: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise _err(key, f"{_fmt_float(value)} is outside (0, 1]; it is the fraction kept, e.g. {key}=0.5")
    return value


def _check_min(key: str, value: Any, lowest: float) -> Any:
    if value < lowest:
        raise _err(key, f"{value} is below the minimum {lowest}")
    return value


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _err(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _check_schedule(key: str, schedule: Iterable[Any]) -> Schedule:
    try:
        points = [tuple(p) for p in schedule]
    except TypeError:
        raise _err(key, f"must be a list of (layer, fraction) pairs, got {schedule!r}") from None
    if not points:
        raise _err(key, "is empty")
    out = []
    for point in points:
        if len(point) != 2:
            raise _err(key, f"each entry is (layer, fraction), got {point!r}")
        layer = _check_min(key, _as_int(key, point[0]), 0)
        out.append((layer, _check_ratio(key, _as_float(key, point[1]))))
    for (l0, f0), (l1, f1) in zip(out, out[1:], strict=False):
        if l1 <= l0:
            raise _err(key, f"layers must increase, got {l0} then {l1}")
        if f1 > f0:
            raise _err(key, f"fractions must not increase (a pruned unit never comes back): {f0} then {f1}")
    return tuple(out)


def _check_quant(value: Any) -> QuantSetting:
    if isinstance(value, str):
        value = _parse_quant("quant", value)
    if not isinstance(value, QuantSetting):
        raise _err("quant", f"must be B or M+L@T, got {value!r}")
    bits = _as_int("quant", value.bits)
    lsb = _as_int("quant", value.lsb_bits)
    if not 1 <= bits <= 16:
        raise _err("quant", f"{bits} bits is outside 1..16")
    if lsb == 0:
        if value.threshold is not None:
            raise _err("quant", "a threshold needs MSB+LSB bits: quant=M+L@T")
        return QuantSetting(bits)
    if not 1 <= lsb <= 16 or bits + lsb > 16:
        raise _err("quant", f"MSB + LSB = {bits}+{lsb} must be 1..16 bits each and at most 16 in total "
                            "(e.g. quant=12+4@0.1)")
    if value.threshold is None:
        raise _err("quant", f"progressive quantization needs a threshold: quant={bits}+{lsb}@0.1")
    threshold = _as_float("quant", value.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise _err("quant", f"threshold {_fmt_float(threshold)} is outside [0, 1]")
    return QuantSetting(bits, lsb, threshold)


def _check_kv(value: Any) -> float:
    """``kv`` is a share of the prompt in (0, 1]; a count of tokens is ``kv_tokens`` (``kv=1`` used to mean
    one token while ``token=1`` keeps everything: the share is now the only reading of ``kv``)."""
    value = _as_float("kv", value)
    if 0.0 < value <= 1.0:
        return value
    hint = f"; for a count of tokens write kv_tokens={int(value)}" if value > 1 and value.is_integer() else ""
    raise _err("kv", f"{_fmt_float(value)} is outside (0, 1]: kv is the share of the prompt kept, e.g. kv=0.25{hint}")


def _check_fixed(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        value = _parse_fixed("fixed", value)
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise _err("fixed", f"must be I.F (integer and fraction bits), got {value!r}")
    int_bits, frac_bits = (_as_int("fixed", v) for v in value)
    if not (1 <= int_bits <= 16 and 1 <= frac_bits <= 16 and int_bits + frac_bits <= 16):
        raise _err("fixed", f"{int_bits}.{frac_bits}: I and F must be 1..16 with I + F <= 16")
    return (int_bits, frac_bits)


# ---------------------------------------------------------------------- parsers: raw string -> value
def _parse_float(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise _err(key, f"{raw!r} is not a number") from None


def _parse_int(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _err(key, f"{raw!r} is not an integer") from None


def _parse_schedule(key: str, raw: str) -> Schedule:
    points = []
    for part in raw.split("/"):
        layer, sep, fraction = part.partition(":")
        if not sep:
            raise _err(key, f"entry {part!r} is not LAYER:FRACTION (e.g. {key}=2:0.9/4:0.7)")
        points.append((_parse_int(key, layer.strip()), _parse_float(key, fraction.strip())))
    return tuple(points)


_QUANT_RE = re.compile(r"^(\d+)\+(\d+)(?:@(.*))?$")


def _parse_quant(key: str, raw: str) -> QuantSetting:
    if raw.isdigit():
        return QuantSetting(int(raw))
    match = _QUANT_RE.match(raw)
    if not match:
        raise _err(key, f"{raw!r} is not B (static bits) or M+L@T (e.g. quant=4+4@0.1)")
    msb, lsb, threshold = match.groups()
    if int(lsb) == 0:  # M+0 is no progressive setting; said so rather than read as static M bits
        raise _err(key, f"{raw!r} has no LSB bits: progressive is M+L@T with L >= 1, static is quant=B")
    if threshold is None:  # the bit widths are checked first, so the suggested form is itself valid
        return _check_quant(QuantSetting(int(msb), int(lsb)))
    return QuantSetting(int(msb), int(lsb), _parse_float(key, threshold))


def _parse_fixed(key: str, raw: str) -> tuple[int, int]:
    match = re.match(r"^(\d+)\.(\d+)$", raw)
    if not match:
        raise _err(key, f"{raw!r} is not I.F (integer bits . fraction bits, e.g. fixed=8.8)")
    return (int(match.group(1)), int(match.group(2)))


def _parse_onoff(key: str, raw: str) -> bool:
    if raw not in ("on", "off"):
        raise _err(key, f"{raw!r} is not on or off")
    return raw == "on"


def _parse_word(key: str, raw: str) -> str:
    return raw  # checked against its choices in Recipe.__post_init__

"""What to prune: one frozen dataclass, its string form for the CLI and its JSON form.

A recipe is a comma-separated list of ``key=value`` items; nothing set (``""`` or ``"dense"``) is the
dense model. ``str(recipe)`` is the canonical form (keys in a fixed order, defaults left out) and parses
back to an equal recipe. Every user mistake raises :class:`DynapruneError` naming the key.

SpAtten keys (Wang et al., HPCA 2021, Sec. III):

``token=K``
    cascade token pruning (Sec. III-A, Alg. 2): K = fraction of the input's tokens still alive after
    the last pruning layer. See :meth:`Recipe.token_keep_schedule` for which layers prune and how much,
    and for the length-adaptive rule. ``token_adapt=A`` (default 1/3, 0 = off) and
    ``token_ref_len=N`` (default 128) tune that rule.
``token_schedule=I:F/I:F/...``
    explicit per-layer form instead of ``token``: after layer I (0-based), a fraction F of the
    original tokens is alive; unlisted layers keep the previous value. Taken literally (no length
    adaptation). E.g. ``token_schedule=1:0.9/2:0.8/4:0.6/10:0.3`` is the schedule of the published
    SpAtten GPT-2-medium WikiText-2 workload trace.
``head=K`` / ``head_schedule=I:F/...``
    cascade head pruning (Sec. III-B): K = fraction of heads alive at the end.
``head_unit=query|kv``
    what a "head" is under grouped-query attention: ``query`` (default) prunes query heads (saves Q
    projection, QK and PV work of that head; its KV group is still fetched while any query head of
    the group lives); ``kv`` prunes whole KV groups (all query heads of the group plus the group's K
    and V, which is what saves KV-cache bytes). Identical for multi-head attention.
``value=K``
    local value pruning (Sec. III-C): fraction of V rows kept per head and query.
``quant=M+L@T`` / ``quant=B``
    progressive quantization (Sec. III-D): M MSB bits, L LSB bits, LSBs fetched for rows whose max
    attention probability is below T. The paper's settings are 4+4, 6+4, 8+4, 10+4 and 12+4; any
    M, L >= 1 with M + L <= 16 is accepted. ``quant=B``: static B-bit quantization.
``kv=B``, ``sink=N``, ``recent=N``
    decode-time KV budget: a fraction of the prompt if B < 1, else a token count; sink = tokens kept
    at the start, recent = most recent tokens kept (the official SpAtten-LLM code keeps start, recent
    and important tokens).
``score=spatten|h2o|streaming|random|instant``
    how tokens are ranked: spatten = cumulative over heads, layers and decode steps, with cascade;
    h2o = accumulated per layer, no cascade; streaming = sinks + recent window only; random = uniform
    (a floor); instant = one layer's probabilities only (PoWER-BERT style). h2o and streaming are KV
    eviction methods: they need ``kv`` and exclude ``token``.

Hybrid Dynamic Pruning keys (reserved here, implemented in ``prune/hdp.py``): ``block=RHO`` (threshold
ratio, any real), ``block_sparsity=S`` (target sparsity in [0, 1) to calibrate RHO; excludes
``block``), ``block_size=b`` (>= 1), ``block_score=abs_sum|sum|max`` (block importance from its integer
scores; default abs_sum, the paper's), ``block_keep_first=on|off`` (always keep the first key block,
[CLS]), ``hdp_head=TAU`` (>= 0), ``approx=on|off``, ``fixed=I.F`` (integer and fraction bits, each
1..16, I + F <= 16).

Recipe files: ``@PATH`` anywhere a recipe string is accepted reads the recipe from a text file (what
``dynaprune calibrate`` writes): ``#`` starts a comment, blank lines are skipped, and the remaining
lines are joined with commas, so one ``key=value`` a line works as well as one line with all of them.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
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


@dataclass(frozen=True)
class Recipe:
    """Everything that is pruned or quantized in one run. All fields optional; the default is dense.

    Field names are the recipe keys (see the module docstring for each key's meaning). Construction
    validates everything that does not need the model; :meth:`validate_for` checks the rest.
    """

    token: float | None = None
    token_schedule: Schedule | None = None
    token_adapt: float | None = None
    token_ref_len: int | None = None
    head: float | None = None
    head_schedule: Schedule | None = None
    head_unit: str = "query"
    value: float | None = None
    quant: QuantSetting | None = None
    kv: float | int | None = None
    sink: int | None = None
    recent: int | None = None
    score: str = "spatten"
    block: float | None = None
    block_sparsity: float | None = None
    block_size: int | None = None
    block_score: str = "abs_sum"
    block_keep_first: bool = False
    hdp_head: float | None = None
    approx: bool = False
    fixed: tuple[int, int] | None = None

    # ------------------------------------------------------------------ construction and checks
    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("token", "head", "value"):
            if getattr(self, name) is not None:
                put(name, _check_ratio(name, _as_float(name, getattr(self, name))))
        for name in ("token_schedule", "head_schedule"):
            if getattr(self, name) is not None:
                put(name, _check_schedule(name, getattr(self, name)))
        if self.token_adapt is not None:
            put("token_adapt", _check_min("token_adapt", _as_float("token_adapt", self.token_adapt), 0.0))
        if self.token_ref_len is not None:
            put("token_ref_len", _check_min("token_ref_len", _as_int("token_ref_len", self.token_ref_len), 1))
        put("head_unit", _check_choice("head_unit", self.head_unit, HEAD_UNITS))
        if self.quant is not None:
            put("quant", _check_quant(self.quant))
        if self.kv is not None:
            put("kv", _check_kv(self.kv))
        for name in ("sink", "recent"):
            if getattr(self, name) is not None:
                put(name, _check_min(name, _as_int(name, getattr(self, name)), 0))
        put("score", _check_choice("score", self.score, SCORES))
        if self.block is not None:
            put("block", _as_float("block", self.block))
        if self.block_sparsity is not None:
            value = _as_float("block_sparsity", self.block_sparsity)
            if not 0.0 <= value < 1.0:
                raise _err("block_sparsity", f"{_fmt_float(value)} is outside [0, 1)")
            put("block_sparsity", value)
        if self.block_size is not None:
            put("block_size", _check_min("block_size", _as_int("block_size", self.block_size), 1))
        put("block_score", _check_choice("block_score", self.block_score, BLOCK_SCORES))
        if not isinstance(self.block_keep_first, bool):
            raise _err("block_keep_first", f"must be on or off, got {self.block_keep_first!r}")
        if self.hdp_head is not None:
            put("hdp_head", _check_min("hdp_head", _as_float("hdp_head", self.hdp_head), 0.0))
        if not isinstance(self.approx, bool):
            raise _err("approx", f"must be on or off, got {self.approx!r}")
        if self.fixed is not None:
            put("fixed", _check_fixed(self.fixed))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are each valid but contradict each other."""
        if self.token is not None and self.token_schedule is not None:
            raise _err("token_schedule", "set either token or token_schedule, not both")
        if self.head is not None and self.head_schedule is not None:
            raise _err("head_schedule", "set either head or head_schedule, not both")
        for name in ("token_adapt", "token_ref_len"):
            if getattr(self, name) is not None and self.token is None:
                raise _err(
                    name,
                    "tunes the length-adaptive default schedule of token=K; it needs token "
                    "(an explicit token_schedule is taken literally)",
                )
        if self.head_unit != "query" and not self.prunes_heads:
            raise _err("head_unit", "head_unit=kv needs head or head_schedule")
        for name in ("sink", "recent"):
            if getattr(self, name) is not None and self.kv is None:
                raise _err(name, f"{name} protects tokens inside the decode-time KV budget; it needs kv")
        if isinstance(self.kv, int):
            self._check_protected_fit(self.kv)
        if self.score in ("h2o", "streaming"):
            if self.kv is None:
                raise _err("score", f"score={self.score} is a KV-cache eviction method; it needs kv")
            if self.prunes_tokens:
                raise _err("score", f"score={self.score} has no cascade; it cannot drive token/token_schedule")
        if self.score in ("random", "instant") and not (self.prunes_tokens or self.kv is not None):
            raise _err("score", f"score={self.score} ranks tokens; it needs token, token_schedule or kv")
        if self.block is not None and self.block_sparsity is not None:
            raise _err("block_sparsity", "set either block (a threshold ratio) or block_sparsity (a target)")
        no_blocks = self.block is None and self.block_sparsity is None
        if self.block_size is not None and no_blocks:
            raise _err("block_size", "block_size needs block or block_sparsity")
        for name, default in (("block_score", "abs_sum"), ("block_keep_first", False)):
            if getattr(self, name) != default and no_blocks:
                raise _err(name, f"{name} tunes block pruning; it needs block or block_sparsity")

    def _check_protected_fit(self, budget: int) -> None:
        protected = (self.sink or 0) + (self.recent or 0)
        if protected > budget:
            raise _err(
                "sink + recent",
                f"sink + recent = {protected} protected tokens exceed the kv budget of {budget} tokens",
            )

    def validate_for(self, n_layers: int, n_heads: int, n_kv_heads: int, context_len: int | None = None) -> None:
        """The checks that need the model (layers, heads) or the context length (the KV budget)."""
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"bad model shape: {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads")
        for name in ("token_schedule", "head_schedule"):
            if getattr(self, name) is not None:
                _step_schedule(name, getattr(self, name), n_layers)
        if context_len is not None and self.kv is not None:
            self.kv_budget_tokens(context_len)

    # ------------------------------------------------------------------ what is on
    @property
    def is_dense(self) -> bool:
        """No key set: the run is the plain dense model (``str(recipe) == "dense"``)."""
        return self == Recipe()

    @property
    def prunes_tokens(self) -> bool:
        return self.token is not None or self.token_schedule is not None

    @property
    def prunes_heads(self) -> bool:
        return self.head is not None or self.head_schedule is not None

    # ------------------------------------------------------------------ schedules
    def token_keep_schedule(self, n_layers: int, seq_len: int) -> list[float]:
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
        if self.token_schedule is not None:
            return _step_schedule("token_schedule", self.token_schedule, n_layers)
        if self.token is None:
            return [1.0] * n_layers
        adapt = DEFAULT_TOKEN_ADAPT if self.token_adapt is None else self.token_adapt
        ref_len = DEFAULT_TOKEN_REF_LEN if self.token_ref_len is None else self.token_ref_len
        target = self.token * min(1.0, ref_len / seq_len) ** adapt
        start = max(1, round(n_layers / 8))
        end = max(start, round(n_layers / 2))
        return _geometric_schedule(target, start, end, n_layers)

    def token_keep_counts(self, n_layers: int, seq_len: int) -> list[int]:
        """:meth:`token_keep_schedule` as token counts (:func:`keep_count` of ``seq_len``)."""
        return [keep_count(f, seq_len) for f in self.token_keep_schedule(n_layers, seq_len)]

    def head_keep_schedule(self, n_layers: int, n_heads: int) -> list[int]:
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
        if self.head_schedule is not None:
            fractions = _step_schedule("head_schedule", self.head_schedule, n_layers)
        elif self.head is not None:
            start = max(1, round(2 * n_layers / 3))
            end = max(start, n_layers - 1)
            fractions = _geometric_schedule(self.head, start, end, n_layers)
        else:
            return [n_heads] * n_layers
        return [keep_count(f, n_heads) for f in fractions]

    def head_units(self, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """(number of prunable units, query heads per unit) for this model under ``head_unit``."""
        if self.head_unit == "kv":
            return n_kv_heads, n_heads // n_kv_heads
        return n_heads, 1

    def kv_budget_tokens(self, context_len: int) -> int | None:
        """The decode-time KV budget in tokens for a prompt of ``context_len`` tokens (None: no budget)."""
        if self.kv is None:
            return None
        if isinstance(self.kv, int):
            if self.kv > context_len:
                raise _err("kv", f"kv={self.kv} tokens is larger than the context of {context_len} tokens")
            budget = self.kv
        else:
            budget = keep_count(self.kv, context_len)
        self._check_protected_fit(budget)
        return budget

    # ------------------------------------------------------------------ string and JSON forms
    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Parse ``"token=0.5,head=0.9,quant=4+4@0.1"``; ``""`` or ``"dense"`` is the dense recipe."""
        if not isinstance(text, str):
            raise DynapruneError(f"a recipe is a string like 'token=0.5,quant=4+4@0.1', got {text!r}")
        if text.strip().startswith("@"):
            text = read_recipe_file(text.strip()[1:])
        stripped = text.strip()
        if stripped in ("", "dense"):
            return cls()
        values: dict[str, Any] = {}
        for item in stripped.split(","):
            item = item.strip()
            if not item:
                raise DynapruneError(f"recipe {text!r} has an empty item (a stray comma?)")
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if key not in _PARSERS:
                hint = difflib.get_close_matches(key, KEYS, n=1)
                did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise DynapruneError(f"unknown recipe key '{key}'{did_you_mean}; known keys: {', '.join(KEYS)}")
            if not sep or not raw:
                raise _err(key, f"needs a value: write {key}=VALUE")
            if key in values:
                raise _err(key, "is given twice")
            values[key] = _PARSERS[key](key, raw)
        return cls(**values)

    def __str__(self) -> str:
        items = [f"{key}={_format_value(value)}" for key, value in self.to_items()]
        return ",".join(items) if items else "dense"

    def to_items(self) -> list[tuple[str, Any]]:
        """(key, value) for every key that differs from the default, in canonical order."""
        default = _DEFAULT
        return [
            (f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the keys that are set (schedules as [[layer, fraction], ...])."""
        out: dict[str, Any] = {}
        for key, value in self.to_items():
            if key in ("token_schedule", "head_schedule"):
                out[key] = [[layer, fraction] for layer, fraction in value]
            elif key in ("quant", "fixed", "approx", "block_keep_first"):
                out[key] = _format_value(value)
            else:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; values may also be given in their string form."""
        if not isinstance(data, dict):
            raise DynapruneError(f"a recipe in JSON is an object of key: value, got {type(data).__name__}")
        items = []
        for key, value in data.items():
            if key not in _PARSERS:
                raise DynapruneError(f"unknown recipe key '{key}'; known keys: {', '.join(KEYS)}")
            if isinstance(value, str) and "," in value:
                raise _err(key, f"value {value!r} contains a comma")
            if key in ("token_schedule", "head_schedule") and isinstance(value, list | tuple):
                value = "/".join(f"{_json_scalar(key, p, 0)}:{_json_scalar(key, p, 1)}" for p in value)
            elif isinstance(value, bool):
                value = "on" if value else "off"
            elif isinstance(value, float):
                value = repr(value)
            items.append(f"{key}={value}")
        return cls.parse(",".join(items))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise DynapruneError(f"recipe JSON does not parse: {exc}") from None
        return cls.from_dict(data)


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
        raise _err("quant", f"MSB + LSB = {bits}+{lsb} must be 1..16 bits each and at most 16 in total")
    if value.threshold is None:
        raise _err("quant", f"progressive quantization needs a threshold: quant={bits}+{lsb}@0.1")
    threshold = _as_float("quant", value.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise _err("quant", f"threshold {_fmt_float(threshold)} is outside [0, 1]")
    return QuantSetting(bits, lsb, threshold)


def _check_kv(value: Any) -> float | int:
    value = _as_float("kv", value)
    if value <= 0:
        raise _err("kv", f"{_fmt_float(value)} must be > 0 (a fraction of the prompt below 1, else tokens)")
    if value < 1:
        return value
    if not value.is_integer():
        raise _err("kv", f"{_fmt_float(value)}: a budget of 1 or more is a token count and must be whole")
    return int(value)


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
    if threshold is None:
        raise _err(key, f"progressive quantization needs a threshold: quant={msb}+{lsb}@0.1")
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


KEYS: tuple[str, ...] = tuple(f.name for f in fields(Recipe))
_DEFAULT = Recipe()

_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "token": _parse_float,
    "token_schedule": _parse_schedule,
    "token_adapt": _parse_float,
    "token_ref_len": _parse_int,
    "head": _parse_float,
    "head_schedule": _parse_schedule,
    "head_unit": _parse_word,
    "value": _parse_float,
    "quant": _parse_quant,
    "kv": _parse_float,
    "sink": _parse_int,
    "recent": _parse_int,
    "score": _parse_word,
    "block": _parse_float,
    "block_sparsity": _parse_float,
    "block_size": _parse_int,
    "block_score": _parse_word,
    "block_keep_first": _parse_onoff,
    "hdp_head": _parse_float,
    "approx": _parse_onoff,
    "fixed": _parse_fixed,
}
assert tuple(_PARSERS) == KEYS  # one parser per dataclass field, same order

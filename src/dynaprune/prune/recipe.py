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
``kv=F`` / ``kv_tokens=N``, ``sink=N``, ``recent=N``
    decode-time KV budget: ``kv`` is the share of the prompt kept, in (0, 1] (``kv=1`` keeps every
    token), ``kv_tokens`` a count of tokens (>= 1); one or the other. sink = tokens kept at the start,
    recent = most recent tokens kept (the official SpAtten-LLM code keeps start, recent and important
    tokens). The budget acts between forwards of a KV cache (decoding), so it has no effect on an
    encoder or a single prefill (:func:`dynaprune.prune.recipe_scope.check_recipe_applies`).
``score=spatten|h2o|streaming|random|instant``
    how tokens are ranked: spatten = cumulative over heads, layers and decode steps, with cascade;
    h2o = accumulated per layer, no cascade; streaming = sinks + recent window only; random = uniform
    (a floor); instant = one layer's probabilities only (PoWER-BERT style). h2o and streaming are KV
    eviction methods: they need a KV budget and exclude ``token``.

Hybrid Dynamic Pruning keys (reserved here, implemented in ``prune/hdp/``): ``block=RHO`` (threshold
ratio, any real), ``block_sparsity=S`` (target sparsity in [0, 1) to calibrate RHO; excludes
``block``), ``block_size=b`` (>= 1), ``block_score=abs_sum|sum|max`` (block importance from its integer
scores; default max, chosen on STS-B train; abs_sum is the paper's), ``block_keep_first=on|off`` (always
keep the first key block, [CLS]), ``hdp_head=TAU`` (>= 0), ``approx=on|off``, ``fixed=I.F`` (integer and
fraction bits, each 1..16, I + F <= 16).

Recipe files: ``@PATH`` anywhere a recipe string is accepted reads the recipe from a text file (what
``dynaprune calibrate`` writes): ``#`` starts a comment, blank lines are skipped, and the remaining
lines are joined with commas, so one ``key=value`` a line works as well as one line with all of them.
"""


from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from dynaprune.errors import DynapruneError
from dynaprune.prune import recipe_values
from dynaprune.prune.recipe_values import (
    BLOCK_SCORES,
    DEFAULT_TOKEN_ADAPT,
    DEFAULT_TOKEN_REF_LEN,
    HEAD_UNITS,
    SCORES,
    QuantSetting,
    Schedule,
    _as_float,
    _as_int,
    _check_choice,
    _check_fixed,
    _check_kv,
    _check_min,
    _check_quant,
    _check_ratio,
    _check_schedule,
    _err,
    _fmt_float,
    _format_value,
    _json_scalar,
    _parse_fixed,
    _parse_float,
    _parse_int,
    _parse_onoff,
    _parse_quant,
    _parse_schedule,
    _parse_word,
    _step_schedule,
    keep_count,
    keep_counts,
    read_recipe_file,
)

__all__ = ["DEFAULT_TOKEN_ADAPT", "DEFAULT_TOKEN_REF_LEN", "KEYS", "QuantSetting", "Recipe", "keep_count",
           "keep_counts", "read_recipe_file"]  # the values' helpers live in recipe_values


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
    kv: float | None = None
    kv_tokens: int | None = None
    sink: int | None = None
    recent: int | None = None
    score: str = "spatten"
    block: float | None = None
    block_sparsity: float | None = None
    block_size: int | None = None
    block_score: str = "max"  # = prune.hdp.DEFAULT_BLOCK_SCORE (not imported: torch-free)
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
        if self.kv_tokens is not None:
            put("kv_tokens", _check_min("kv_tokens", _as_int("kv_tokens", self.kv_tokens), 1))
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
            if getattr(self, name) is not None and not self.has_kv_budget:
                raise _err(name, f"{name} protects tokens inside the decode-time KV budget; it needs kv or kv_tokens")
        if self.kv is not None and self.kv_tokens is not None:
            raise _err("kv_tokens", "set either kv (a share of the prompt) or kv_tokens (a count), not both")
        if self.kv_tokens is not None:
            self._check_protected_fit(self.kv_tokens)
        if self.score in ("h2o", "streaming"):
            if not self.has_kv_budget:
                raise _err("score", f"score={self.score} is a KV-cache eviction method; it needs kv or kv_tokens")
            if self.prunes_tokens:
                raise _err("score", f"score={self.score} has no cascade; it cannot drive token/token_schedule")
        if self.score in ("random", "instant") and not (self.prunes_tokens or self.has_kv_budget):
            raise _err("score", f"score={self.score} ranks tokens; it needs token, token_schedule, kv or kv_tokens")
        if self.block is not None and self.block_sparsity is not None:
            raise _err("block_sparsity", "set either block (a threshold ratio) or block_sparsity (a target)")
        no_blocks = self.block is None and self.block_sparsity is None
        if self.block_size is not None and no_blocks:
            raise _err("block_size", "block_size needs block or block_sparsity")
        for name, default in (("block_score", "max"), ("block_keep_first", False)):
            if getattr(self, name) != default and no_blocks:
                raise _err(name, f"{name} tunes block pruning; it needs block or block_sparsity")

    def _check_protected_fit(self, budget: int) -> None:
        protected = (self.sink or 0) + (self.recent or 0)
        if protected > budget:
            raise _err("sink + recent", f"{protected} protected tokens exceed the kv budget of {budget} tokens")

    def validate_for(self, n_layers: int, n_heads: int, n_kv_heads: int, context_len: int | None = None) -> None:
        """The checks that need the model (layers, heads) or the context length (the KV budget)."""
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"bad model shape: {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads")
        for name in ("token_schedule", "head_schedule"):
            if getattr(self, name) is not None:
                _step_schedule(name, getattr(self, name), n_layers)
        if context_len is not None and self.has_kv_budget:
            self.kv_budget_tokens(context_len)

    # ------------------------------------------------------------------ what is on
    @property
    def is_dense(self) -> bool:
        """No key set: the run is the plain dense model (``str(recipe) == "dense"``)."""
        return self == Recipe()

    @property
    def has_kv_budget(self) -> bool:
        """A decode-time KV budget is set (``kv`` or ``kv_tokens``)."""
        return self.kv is not None or self.kv_tokens is not None

    @property
    def prunes_tokens(self) -> bool:
        return self.token is not None or self.token_schedule is not None

    @property
    def prunes_heads(self) -> bool:
        return self.head is not None or self.head_schedule is not None

    # ------------------------------------------------------------------ schedules
    def token_keep_schedule(self, n_layers: int, seq_len: int) -> list[float]:
        """Fraction of the original ``seq_len`` tokens alive after each layer; the default cascade schedule
        and its length-adaptive rule are described at :func:`recipe_values.token_keep_schedule`."""
        return recipe_values.token_keep_schedule(self, n_layers, seq_len)

    def token_keep_counts(self, n_layers: int, seq_len: int) -> list[int]:
        """:meth:`token_keep_schedule` as token counts (:func:`keep_count` of ``seq_len``)."""
        return recipe_values.token_keep_counts(self, n_layers, seq_len)

    def head_keep_schedule(self, n_layers: int, n_heads: int) -> list[int]:
        """Number of head units alive after each layer (see :func:`recipe_values.head_keep_schedule`)."""
        return recipe_values.head_keep_schedule(self, n_layers, n_heads)

    def head_units(self, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """(number of prunable units, query heads per unit) for this model under ``head_unit``."""
        if self.head_unit == "kv":
            return n_kv_heads, n_heads // n_kv_heads
        return n_heads, 1

    def kv_budget_tokens(self, context_len: int) -> int | None:
        """The decode-time KV budget in tokens for a prompt of ``context_len`` tokens (None: no budget)."""
        if not self.has_kv_budget:
            return None
        if self.kv_tokens is not None:
            if self.kv_tokens > context_len:
                raise _err("kv_tokens", f"{self.kv_tokens} tokens is larger than the context of {context_len} tokens")
            budget = self.kv_tokens
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
    "kv_tokens": _parse_int,
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

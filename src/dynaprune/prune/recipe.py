"""What to prune: a set of techniques, its string form for the CLI, its ``@FILE`` form and its JSON form.

A recipe is a comma-separated list of ``key=value`` items; nothing set (``""`` or ``"dense"``) is the
dense model. ``str(recipe)`` is the canonical form (keys in the registry's order, defaults left out)
and parses back to an equal recipe. Every user mistake raises :class:`DynapruneError` naming the key.

This parser knows no key: each technique (``prune/techniques/``, ``prune/scorers/``) declares its keys,
their parsing and validation, and ``prune/registry.py`` maps keys to techniques. A recipe also reads
any key as an attribute (``recipe.token``, ``recipe.quant``; the key's default when its technique is
off) and forwards the methods techniques export (``recipe.token_keep_schedule(...)``).

Build one from a string (``Recipe.parse("token=0.5,quant=4+4@0.1")``), from technique dataclasses
(``Recipe(TokenPruning(token=0.5), Quantization("4+4@0.1"))``) or from keys (``Recipe(token=0.5)``).

Recipe files: ``@PATH`` anywhere a recipe string is accepted reads the recipe from a text file (what
``dynaprune calibrate`` writes): ``#`` starts a comment, blank lines are skipped, and the remaining
lines are joined with commas, so one ``key=value`` a line works as well as one line with all of them.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from dynaprune.errors import DynapruneError
from dynaprune.prune import registry
from dynaprune.prune.keys import err, format_value, keep_count, keep_counts, parse_float
from dynaprune.prune.scorers.base import TokenScorer
from dynaprune.prune.scorers.spatten import SpAttenScore
from dynaprune.prune.technique import Technique
from dynaprune.prune.techniques.kv_bytes import KV_BYTES, expand_kv_bytes
from dynaprune.prune.techniques.progressive_quant import QuantSetting
from dynaprune.prune.techniques.token_cascade import DEFAULT_TOKEN_ADAPT, DEFAULT_TOKEN_REF_LEN

__all__ = ["KEYS", "DEFAULT_TOKEN_ADAPT", "DEFAULT_TOKEN_REF_LEN", "QuantSetting", "Recipe", "keep_count",
           "keep_counts", "read_recipe_file"]

KEYS: tuple[str, ...] = tuple(registry.KEYS)


def _build(owner: type[Technique], values: dict[str, Any]) -> Technique:
    if owner is TokenScorer:
        name = values["score"]
        if name not in registry.SCORERS:
            raise err("score", f"{name!r} is not one of {', '.join(registry.SCORERS)}")
        return registry.SCORERS[name]()
    return owner(**values)


def _unknown_key(key: str) -> DynapruneError:
    """One message for an unknown key in every form (string, ``Recipe(**keys)``, JSON): the closest key."""
    hint = difflib.get_close_matches(key, KEYS, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    return DynapruneError(f"unknown recipe key '{key}'{did_you_mean}; known keys: {', '.join(KEYS)}")


def _first_key(technique: Technique) -> str:
    values = technique.key_values()
    return next(k.name for k in technique.keys if values[k.name] != k.default)


class Recipe:
    """Everything that is pruned or quantized in one run: techniques (at most one per role), each a
    frozen dataclass of knobs. Immutable and hashable; equal recipes have equal strings."""

    __slots__ = ("techniques", "kv_bytes_request")
    techniques: tuple[Technique, ...]
    kv_bytes_request: tuple[float, str] | None  # kv_bytes=F as asked: (F, the model shape it expanded for)

    def __init__(self, *techniques: Technique, kv_bytes_shape: str | None = None, **keys: Any) -> None:
        """``kv_bytes_shape``: the model shape (``kv_bytes.shape_key``) whose choices ``kv_bytes=F`` expands
        to; None: the choices file's default (SmolLM2-135M). ``for_model`` re-expands once it is known."""
        by_owner: dict[type[Technique], dict[str, Any]] = {}
        request = None
        if KV_BYTES in keys:  # kv_bytes=F: its composition
            request = (float(keys[KV_BYTES]), kv_bytes_shape)
        keys = expand_kv_bytes(keys, lambda k, raw: registry.KEYS[k].parse(k, raw), kv_bytes_shape)
        object.__setattr__(self, "kv_bytes_request", request)
        for key, value in keys.items():
            if key not in registry.KEYS:
                raise _unknown_key(key)
            by_owner.setdefault(registry.OWNER[key], {})[key] = value
        built = []
        for technique in techniques:
            if not isinstance(technique, Technique):
                raise DynapruneError(f"a recipe is made of techniques, got {technique!r}")
            built.append(technique)
        built += [_build(owner, values) for owner, values in by_owner.items()]
        built = [t for t in built if t.enabled]
        key_order = {name: i for i, name in enumerate(KEYS)}
        built.sort(key=lambda t: key_order[t.keys[0].name])
        for a, b in zip(built, built[1:], strict=False):
            if a.role == b.role:
                raise DynapruneError(f"recipe keys '{_first_key(a)}' and '{_first_key(b)}' set two techniques "
                                     f"of one role ({a.role}); keep one")
        object.__setattr__(self, "techniques", tuple(built))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Techniques that are each valid but cannot run together."""
        for technique in self.techniques:
            for role, why in technique.excludes.items():
                other = next((t for t in self.techniques if t.role == role), None)
                if other is not None and getattr(technique, "active", True):
                    raise DynapruneError(f"recipe keys '{_first_key(other)}' and '{_first_key(technique)}' "
                                         f"cannot be combined: {why}")
            technique.check_with(self)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Recipe is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.techniques == other.techniques

    def __hash__(self) -> int:
        return hash(self.techniques)

    def __repr__(self) -> str:
        return f"Recipe.parse({str(self)!r})"

    def __getattr__(self, name: str) -> Any:
        """A key's value (its default when its technique is off), or a method a technique exports."""
        if name.startswith("__") or name == "techniques":
            raise AttributeError(name)
        if name in registry.KEYS:
            technique = self.technique(registry.OWNER[name])
            return technique.key_values()[name] if technique is not None else registry.KEYS[name].default
        if name in registry.EXPORTS:
            owner = registry.EXPORTS[name]
            return getattr(self.technique(owner) or owner(), name)
        raise AttributeError(f"'Recipe' has no attribute {name!r}")

    def replace(self, **keys: Any) -> Recipe:
        """This recipe with some keys changed (None unsets a key), checked like a new recipe."""
        values = dict(self.to_items())
        values.update(keys)
        return Recipe(**{k: v for k, v in values.items() if v is not None})

    def for_shape(self, shape: str) -> Recipe:
        """This recipe with ``kv_bytes=F`` expanded to the choices of a model ``shape`` (``kv_bytes.
        shape_key``), not the default model's; itself when it has no kv_bytes or already expanded so."""
        if self.kv_bytes_request is None or self.kv_bytes_request[1] == shape:
            return self
        fraction = self.kv_bytes_request[0]
        composed = set(Recipe(kv_bytes=fraction, kv_bytes_shape=self.kv_bytes_request[1]).to_items())
        rest = {k: v for k, v in self.to_items() if (k, v) not in composed}
        return Recipe(kv_bytes_shape=shape, kv_bytes=fraction, **rest)

    def technique(self, kind: type[Technique]) -> Technique | None:
        """The recipe's technique of this class (or of a subclass), None when it is off."""
        return next((t for t in self.techniques if isinstance(t, kind)), None)

    @property
    def scorer(self) -> TokenScorer:
        """The token scorer (``score=``; SpAtten's cumulative importance by default)."""
        found = self.technique(TokenScorer)
        return found if found is not None else SpAttenScore()

    @property
    def is_dense(self) -> bool:
        """No key set: the run is the plain dense model (``str(recipe) == "dense"``)."""
        return not self.techniques

    def validate_for(self, n_layers: int, n_heads: int, n_kv_heads: int, context_len: int | None = None) -> None:
        """The checks that need the model (layers, heads) or the context length (the KV budget)."""
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"bad model shape: {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads")
        for technique in self.techniques:
            technique.validate_for(n_layers, n_heads, n_kv_heads, context_len)

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
            if key not in registry.KEYS and key != KV_BYTES:
                raise _unknown_key(key)
            if not sep or not raw:
                raise err(key, f"needs a value: write {key}=VALUE")
            if key in values:
                raise err(key, "is given twice")
            values[key] = parse_float(key, raw) if key == KV_BYTES else registry.KEYS[key].parse(key, raw)
        return cls(**values)

    def __str__(self) -> str:
        items = [f"{key}={format_value(value)}" for key, value in self.to_items()]
        return ",".join(items) if items else "dense"

    def to_items(self) -> list[tuple[str, Any]]:
        """(key, value) for every key that differs from the default, in canonical order."""
        out = []
        for technique in self.techniques:
            values = technique.key_values()
            out += [(k.name, values[k.name]) for k in technique.keys if values[k.name] != k.default]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the keys that are set (schedules as [[layer, fraction], ...])."""
        out: dict[str, Any] = {}
        for key, value in self.to_items():
            kind = registry.KEYS[key].json
            if kind == "schedule":
                out[key] = [[layer, fraction] for layer, fraction in value]
            elif kind == "text":
                out[key] = format_value(value)
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
            if key not in registry.KEYS:
                raise _unknown_key(key)
            if isinstance(value, str) and "," in value:
                raise err(key, f"value {value!r} contains a comma")
            if registry.KEYS[key].json == "schedule" and isinstance(value, list | tuple):
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


def _json_scalar(key: str, pair: Any, i: int) -> Any:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise err(key, f"each entry is [layer, fraction], got {pair!r}")
    value = pair[i]
    return repr(value) if isinstance(value, float) else value


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

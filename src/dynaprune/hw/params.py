"""``--param key=value`` overrides for the accelerator configs (and ``energy.<constant>``), typed and checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from dynaprune.errors import DynapruneError
from dynaprune.hw.energy import EnergyTable
from dynaprune.hw.hdp import HdpConfig
from dynaprune.hw.spatten import SpAttenConfig

ARCHS: dict[str, type] = {"spatten": SpAttenConfig, "hdp": HdpConfig}
_TRUE = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def config_class(arch: str) -> type:
    if arch not in ARCHS:
        raise DynapruneError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch]


def _convert(name: str, raw: str, like: Any) -> Any:
    text = raw.strip()
    try:
        if isinstance(like, bool):
            return _TRUE[text.lower()]
        if isinstance(like, int):
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        return float(text)
    except (ValueError, KeyError):
        kind = "true/false" if isinstance(like, bool) else "an integer" if isinstance(like, int) else "a number"
        raise DynapruneError(f"parameter {name}: {raw!r} is not {kind}") from None


def split_assignment(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise DynapruneError(f"parameter {item!r} must look like key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise DynapruneError(f"parameter {item!r} has no name before '='")
    return key, value


def parse_overrides(arch: str, items: Sequence[str]) -> dict[str, Any]:
    """Typed overrides from ``key=value`` strings; a key that names no parameter is an error."""
    cls = config_class(arch)
    base, energy = cls(), EnergyTable()
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, raw = split_assignment(item)
        if key.startswith("energy."):
            name = key.split(".", 1)[1]
            if name not in {f.name for f in dataclasses.fields(EnergyTable)}:
                known_e = ", ".join(f"energy.{f.name}" for f in dataclasses.fields(EnergyTable))
                raise DynapruneError(f"unknown parameter {key!r}; energy constants: {known_e}")
            out[key] = _convert(key, raw, getattr(energy, name))
        elif key in known:
            out[key] = _convert(key, raw, getattr(base, key))
        else:
            raise DynapruneError(f"unknown parameter {key!r} for --arch {arch}; known: {', '.join(sorted(known))}")
    return out


def build_configs(arch: str, overrides: dict[str, Any]) -> tuple[Any, EnergyTable]:
    """(architecture config, energy table) with the overrides applied (each validated by its dataclass)."""
    cls = config_class(arch)
    plain = {k: v for k, v in overrides.items() if not k.startswith("energy.")}
    energy = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("energy.")}
    for name, v in energy.items():
        if v < 0:
            raise DynapruneError(f"energy.{name} must be >= 0, got {v}")
    return cls(**plain), EnergyTable(**energy)

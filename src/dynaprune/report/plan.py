"""What the demo runs: a sweep config itself (``runs:``, like ``configs/demo.yaml``) or a list of sweep
configs (``configs:``, like ``configs/demo-full.yaml``). A list item is a path (it must exist) or a
glob such as ``configs/smollm2-*.yaml`` (matching nothing is fine: the list grows with the configs)."""

from __future__ import annotations

import glob
from pathlib import Path

import yaml

from dynaprune.errors import DynapruneError


def sweep_configs(path: str | Path, base: Path | None = None) -> list[Path]:
    """The sweep configs a demo config stands for, in order, each once."""
    path = Path(path)
    base = base or Path.cwd()
    if not path.is_file():
        raise DynapruneError(f"demo config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DynapruneError(f"{path}: not valid YAML ({e})") from None
    if isinstance(cfg, dict) and "runs" in cfg:
        return [path]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("configs"), list) or not cfg["configs"]:
        raise DynapruneError(f"{path}: needs a 'runs:' list (a sweep) or a 'configs:' list of sweep configs")
    found: list[Path] = []
    for item in cfg["configs"]:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(str(base / item)))
            found += [m.relative_to(base) if m.is_relative_to(base) else m for m in matches]
        elif (base / item).is_file():
            found.append(Path(item))
        else:
            raise DynapruneError(f"{path}: listed sweep config not found: {item}")
    return list(dict.fromkeys(found))

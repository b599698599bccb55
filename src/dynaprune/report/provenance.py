"""Where every number of the report came from: per results file its checksum, the commands and dates
its runs recorded (``command`` and ``finished`` of each line, written by the sweep; "not recorded" for
older lines), the software versions, and how the report itself was built."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

NOT_RECORDED = "not recorded"


@dataclass
class SourceFile:
    path: str
    sha256: str
    rows: int
    commands: list[str]
    dates: str  # "first .. last" finished time of its runs
    versions: list[str]  # distinct version sets, as sorted JSON


def describe_sources(paths: list[Path], rows: list[dict]) -> list[SourceFile]:
    out = []
    for path in paths:
        mine = [r for r in rows if r.get("_source") == str(path)]
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        commands = sorted({str(r.get("command") or NOT_RECORDED) for r in mine})
        finished = sorted(str(r["finished"]) for r in mine if r.get("finished"))
        if not finished:
            dates = NOT_RECORDED if mine else "-"
        else:
            dates = finished[0] if finished[0] == finished[-1] else f"{finished[0]} .. {finished[-1]}"
            if len(finished) < len(mine):
                dates += f" ({len(mine) - len(finished)} run(s) {NOT_RECORDED})"
        versions = sorted({json.dumps(r.get("versions") or {}, sort_keys=True) for r in mine})
        out.append(SourceFile(str(path), digest, len(mine), commands, dates, versions))
    return out


def report_build(command: str) -> dict[str, str]:
    """How this report was built: the command, the date and the reporting software."""
    from dynaprune import __version__

    return {
        "command": command or NOT_RECORDED,
        "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dynaprune": __version__,
        "python": platform.python_version(),
    }


def run_ref(row: dict) -> str:
    """A short reference of one result row: its run id (a line of its results file) and config line."""
    ref = str(row.get("run_id") or Path(str(row.get("_source", "?"))).name)
    return ref + (f" (config line {row['config_line']})" if row.get("config_line") else "")

"""Rows of ``benchmarks/results/peers/kvpress.json`` and the K/V bytes formula, as pure functions.

No dependency on dynaprune, kvpress or transformers: the peers' venv (``run_kvpress.py``) writes rows
with these helpers and the main suite checks them (``tests/bench/test_peers_schema.py``) without kvpress.

The bytes axis (issue 14, item 4): ``kv_bytes_vs_fp16`` = the K/V bytes the continuation reads for the
context, over the bytes of a dense fp16 cache of the whole context (2 tensors x layers x KV heads x
head_dim x context tokens x 2 bytes). Every tensor the cache holds for the context after the prefill is
counted: integer codes at their real packed size, and every floating-point tensor (kept K/V rows, the
fp residual window, scales, zero-points) at 2 bytes per element, the dtype it would have in an fp16
model, which is what the denominator assumes (these runs use fp32 weights so that dense equals ours, and
quanto's scales then are fp32; ``kv_bytes_as_held_vs_fp16`` counts them at their real size too).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FP16_BYTES = 2
SPLITS = ("test", "valid")
PEERS = ("dense", "kvpress", "quantized-cache", "kvpress+quantized-cache")
ROW_KEYS = ("peer", "press", "options", "split", "perplexity", "tokens_kept_share", "kv_bytes_vs_fp16",
            "kv_bytes_as_held_vs_fp16", "seconds", "versions")


@dataclass(frozen=True)
class HeldTensor:
    """One tensor the cache holds for the context: ``kind`` is ``codes`` (integer codes, counted at
    ``nbytes``, their real packed size) or ``float`` (K/V rows, scales, zero-points: counted at 2 bytes
    per element in ``kv_bytes``)."""

    kind: str
    numel: int
    nbytes: int


def fp16_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, batch: int = 1) -> int:
    """Bytes of a dense fp16 K and V cache of ``tokens`` tokens."""
    return 2 * layers * batch * kv_heads * head_dim * tokens * FP16_BYTES


def kv_bytes(held: Iterable[HeldTensor], as_held: bool = False) -> int:
    """Bytes of the tensors in ``held``: codes at their real size, floats at 2 bytes per element
    (``as_held``: at their real size)."""
    total = 0
    for t in held:
        if t.kind not in ("codes", "float"):
            raise ValueError(f"unknown held tensor kind {t.kind!r}")
        total += t.nbytes if (t.kind == "codes" or as_held) else t.numel * FP16_BYTES
    return total


def packed_code_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits packed densely."""
    return math.ceil(numel * bits / 8)


def group_quant_ratio(bits: int, group: int, params_per_group: int = 2) -> float:
    """kv_bytes_vs_fp16 of a cache quantized to ``bits`` with one fp16 scale and zero-point per group of
    ``group`` elements: ``bits/16 + params*16/(group*16)``; 4 bits, groups of 64: 0.28125."""
    return bits / 16 + params_per_group / group


def compression_ratio_for_keep(keep_share: float) -> float:
    """kvpress's ``compression_ratio`` (the share of the context's K/V dropped) keeping ``keep_share``."""
    if not 0.0 < keep_share <= 1.0:
        raise ValueError(f"keep share must be in (0, 1], got {keep_share}")
    return 1.0 - keep_share


def row_key(row: dict[str, Any]) -> str:
    """What makes a row unique (a resumed run skips rows whose key is already in the file)."""
    return json.dumps([row["peer"], row["press"], row["options"], row["split"]], sort_keys=True)


def validate_row(row: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem of ``row``."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row misses {missing}")
    if row["peer"] not in PEERS:
        raise ValueError(f"unknown peer {row['peer']!r}")
    if row["split"] not in SPLITS:
        raise ValueError(f"unknown split {row['split']!r}")
    if not isinstance(row["options"], dict):
        raise ValueError("options must be an object")
    ppl = row["perplexity"]
    if not (isinstance(ppl, float | int) and math.isfinite(ppl) and ppl >= 1.0):
        raise ValueError(f"perplexity must be a finite number >= 1, got {ppl!r}")
    share = row["tokens_kept_share"]
    if not 0.0 < share <= 1.0:
        raise ValueError(f"tokens_kept_share must be in (0, 1], got {share}")
    for key in ("kv_bytes_vs_fp16", "kv_bytes_as_held_vs_fp16"):
        if not 0.0 < row[key] <= 2.0:
            raise ValueError(f"{key} must be in (0, 2], got {row[key]}")
    if row["kv_bytes_vs_fp16"] > row["kv_bytes_as_held_vs_fp16"] + 1e-12:
        raise ValueError("kv_bytes_vs_fp16 counts floats at 2 bytes: it cannot exceed the bytes as held")
    for lib in ("kvpress", "transformers", "torch"):
        if lib not in row["versions"]:
            raise ValueError(f"versions misses {lib}")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows already in ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def write_rows_atomic(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` atomically (a temp file renamed over it)."""
    for row in rows:
        validate_row(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

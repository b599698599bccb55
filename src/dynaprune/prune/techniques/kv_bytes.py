"""``kv_bytes=F``: the best composition of KV eviction and the packed quantized cache we know within F of
the fp16 K/V bytes of the context (issue 14 item 5; eviction share x K/V bits and group x allocation x
score).

The recipe expands to the composition (``kv``, ``score``, ``kv_alloc``, ``kv_bits`` or ``kv_key_bits`` /
``kv_value_bits``, ``kv_group``): the point of ``kv_bytes_choices.json`` with the largest ``kv_bytes`` not
above F, chosen on WikiText-2 VALID (never test) by ``calibrate/kv_bytes.py`` (``benchmarks/kv_bytes.py
search``; ``dynaprune tune`` re-derives it for another model or text). The choices are keyed by model
shape; a recipe is parsed before the model is known, so it expands with the shape named ``default``
(SmolLM2-135M) unless ``DYNAPRUNE_KV_BYTES`` names a choices file written by ``dynaprune tune``. The
eviction share is sized for a 1536-token context (whole key groups packed, the tail in fp16): on other
contexts the bytes can differ by the fp16 tail (< one key group).

Short prompts (MT-Bench's are tens of tokens): a choice's protected recent window (``recent=32``) expands
to ``recent_max=32`` (``prune/techniques/kv_budget.py``): where a prompt's budget cannot hold the sinks
and 32 recent tokens, the window shrinks to what is left beside the sinks instead of the run being
refused; the windows used are in the run's summary (``kv_recent``: [smallest, largest]). An explicit
``recent=N`` (without kv_bytes) keeps its rule: a budget with no room for it is refused.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from dynaprune.prune import keys as K

KV_BYTES = "kv_bytes"  # the recipe key (expanded by prune/recipe.py before the registry sees it)
CHOICES_NAME = "kv_bytes_choices.json"
ENV_FILE = "DYNAPRUNE_KV_BYTES"  # a choices file of `dynaprune tune`, used instead of the shipped one


def check_kv_bytes(key: str, value: Any) -> float:
    value = K.as_float(key, value)
    if not 0.0 < value <= 1.0:
        raise K.err(key, f"{K.fmt_float(value)} is outside (0, 1]: kv_bytes is the share of the fp16 K/V bytes "
                         "of the context the cache may hold, e.g. kv_bytes=0.25")
    return value


def shape_key(layers: int, heads: int, kv_heads: int, head_dim: int) -> str:
    return f"layers={layers},heads={heads},kv_heads={kv_heads},head_dim={head_dim}"


def load_choices() -> dict:
    """The choices file: ``$DYNAPRUNE_KV_BYTES`` if set, else the one shipped in the package."""
    override = os.environ.get(ENV_FILE)
    if override:
        try:
            return json.loads(Path(override).read_text())
        except (OSError, ValueError) as e:
            raise K.err("kv_bytes", f"cannot read {ENV_FILE}={override}: {e}") from None
    shipped = resources.files("dynaprune.prune.techniques").joinpath(CHOICES_NAME)
    if not shipped.is_file():
        raise K.err("kv_bytes", f"no {CHOICES_NAME} in this install: run `dynaprune tune` and set {ENV_FILE}")
    return json.loads(shipped.read_text())


def resolve_kv_bytes(fraction: float, shape: str | None = None) -> dict:
    """The shipped choice with the largest ``kv_bytes`` <= ``fraction`` for a model shape (default: the
    file's ``default`` shape)."""
    data = load_choices()
    models = data["models"]
    name = shape if shape in models else data["default"]
    choices = sorted(models[name]["choices"], key=lambda c: c["kv_bytes"])
    fitting = [c for c in choices if c["kv_bytes"] <= fraction + 1e-9]
    if not fitting:
        raise K.err("kv_bytes", f"no known composition holds <= {K.fmt_float(fraction)} of the fp16 K/V bytes "
                                f"(the smallest known: kv_bytes={K.fmt_float(choices[0]['kv_bytes'])})")
    return fitting[-1]


def expand_kv_bytes(values: dict[str, Any], parse: Any, shape: str | None = None) -> dict[str, Any]:
    """Recipe keys with ``kv_bytes`` replaced by the keys of its composition (refused beside them), from
    the choices of model ``shape`` (None or unknown: the file's default)."""
    if "kv_bytes" not in values:
        return values
    fraction = check_kv_bytes("kv_bytes", values["kv_bytes"])
    choice = resolve_kv_bytes(fraction, shape)
    pairs = (item.partition("=") for item in choice["recipe"].split(","))
    expanded = {ADAPTED.get(k, k): parse(ADAPTED.get(k, k), v) for k, _, v in pairs}
    clash = next((k for k in values if k in expanded or k in COMPOSED_KEYS), None)
    if clash is not None:
        raise K.err(clash, f"kv_bytes={K.fmt_float(fraction)} picks {clash} itself ({choice['recipe']}); "
                           "set either kv_bytes or the keys it composes")
    return {**{k: v for k, v in values.items() if k != "kv_bytes"}, **expanded}


COMPOSED_KEYS = ("kv", "kv_tokens", "score", "kv_alloc", "kv_depth", "kv_bits", "kv_key_bits", "kv_value_bits",
                 "kv_group", "kv_value_group", "kv_residual", "kv_scale_bits", "kv_rotate", "sink", "recent",
                 "recent_max")
ADAPTED = {"recent": "recent_max"}  # a choice's recent window shrinks to fit a short prompt's budget


def write_choices(path: Path, shape: str, found: dict, *, source: str, command: str, default: bool) -> None:
    """Merge a search's choices for one model shape into a choices file (atomic)."""
    data = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    data["what"] = ("kv_bytes=F -> the composition (eviction share x K/V bits and group x allocation x score) "
                    "with the lowest VALID perplexity among those holding <= F of the fp16 K/V bytes")
    data["models"][shape] = {"source": source, "command": command, "split": "valid",
                             "context": found["context"], "continuation": found["continuation"],
                             "chunks": found["chunks"], "dense_perplexity": found.get("dense_perplexity"),
                             "searched": found.get("searched", "see calibrate/kv_bytes.py"),
                             "choices": found["choices"]}
    if default or "default" not in data:
        data["default"] = shape
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)

"""What a pruning context did, per layer and in total: the ``cost.pruning`` record of a result.

Every fraction is a ratio of two counts that the summary also carries, so the summaries of several
contexts (one per batch of a task run) merge exactly: counts are summed and the fractions recomputed
from the sums, i.e. weighted by the rows, bits or pairs each context covered.

Bits fetched (SpAtten Sec. III-D, progressive quantization; Sec. III-C, local value pruning) are
counted over the same operand rows in numerator and denominator, per computed head: Q over the real
query rows, K over the key rows visible to at least one query, V over the key rows visible to at least
one query (dense) or, with local value pruning, the rows some real query kept (the union over the
queries that share the fetch). Each row is D numbers at its width: 16 when the technique leaves the
operand alone, M (+ L where a row, for K a head, needed its LSBs) for progressive quantization, B for
static quantization, and M + L for V (quantized statically at the full width). The quantization is
simulated (fake-quantized floats); these are the bits an accelerator would fetch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynaprune.prune import registry
from dynaprune.prune.technique import ROLES

# counts summed over a run's layers and carried in the summary; each fraction is a ratio of two of them
BIT_COUNTS = ("query_bits_fetched", "query_bits_dense16", "key_bits_fetched", "key_bits_dense16",
              "value_bits_fetched", "value_bits_dense16")
ROW_COUNTS = ("rows", "rows_needing_lsb", "value_rows_used", "value_rows_dense", "value_rows_fetched",
              "value_rows_fetched_dense")
FRACTIONS = {  # name: (numerator counts, denominator counts, when it applies)
    "lsb_row_fraction": (("rows_needing_lsb",), ("rows",), "quant"),
    "key_bits_fetched_vs_fp16": (("key_bits_fetched",), ("key_bits_dense16",), "quant"),
    "query_bits_fetched_vs_fp16": (("query_bits_fetched",), ("query_bits_dense16",), "bits"),
    "value_bits_fetched_vs_fp16": (("value_bits_fetched",), ("value_bits_dense16",), "bits"),
    "bits_fetched_vs_fp16": (("query_bits_fetched", "key_bits_fetched", "value_bits_fetched"),
                             ("query_bits_dense16", "key_bits_dense16", "value_bits_dense16"), "bits"),
    "value_rows_kept": (("value_rows_fetched",), ("value_rows_fetched_dense",), "value"),  # V rows fetched
    "value_rows_used_kept": (("value_rows_used",), ("value_rows_dense",), "value"),  # (query, V row) products
}


@dataclass
class LayerStats:
    """What one layer did, summed over the calls of a run (rows = (batch, head, real query) rows)."""

    tokens_in: int = 0  # real query tokens entering the layer
    heads_alive: int = 0  # query heads computed (last call)
    rows: int = 0
    rows_needing_lsb: int = 0
    query_bits_fetched: int = 0
    query_bits_dense16: int = 0  # the same Q rows at 16 bits
    key_bits_fetched: int = 0
    key_bits_dense16: int = 0  # the same K rows at 16 bits
    value_bits_fetched: int = 0
    value_bits_dense16: int = 0  # every visible V row at 16 bits
    value_rows_used: int = 0  # (head, query, V row) products kept by local value pruning
    value_rows_dense: int = 0  # the same over every visible key
    value_rows_fetched: int = 0  # (head, V row) fetched: kept by at least one real query
    value_rows_fetched_dense: int = 0  # (head, V row) visible to at least one real query
    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # a stage's own counters, by stage name


def _fractions(counts: dict[str, int], enabled: set[str]) -> dict[str, float]:
    out = {}
    for name, (num, den, when) in FRACTIONS.items():
        if when in enabled:
            d = sum(counts.get(k, 0) for k in den)
            out[name] = sum(counts.get(k, 0) for k in num) / d if d else 1.0
    return out


def summarize(layer_stats: dict[int, LayerStats], enabled: set[str]) -> dict:
    """Per-layer tokens and heads alive and, for the ``enabled`` groups of fractions (``quant``, ``value``,
    ``bits``: what the stages ask for), the counts above summed over layers and the fractions they give."""
    layers = sorted(layer_stats)
    s = layer_stats
    out: dict = {
        "tokens_per_layer": [s[i].tokens_in for i in layers],
        "heads_per_layer": [s[i].heads_alive for i in layers],
    }
    if enabled:
        counts = {k: sum(getattr(s[i], k) for i in layers) for k in (*BIT_COUNTS, *ROW_COUNTS)}
        out["counts"] = counts
        out["enabled"] = sorted(enabled)
        out.update(_fractions(counts, enabled))
    return out


def merge_summaries(contexts: list) -> dict:
    """Summaries of the pruning contexts of one task run, merged: per-layer lists and counts summed,
    fractions recomputed from the summed counts (weighted by the rows / bits they cover); each technique
    merges its own figures (``Technique.merge_summary``)."""
    summaries = [c.summary() for c in contexts if getattr(c, "layer_stats", None) is not None]
    if not summaries:
        return {}
    merged: dict = {"calls": len(summaries)}
    lists = [s["tokens_per_layer"] for s in summaries]
    width = max(len(x) for x in lists)
    merged["tokens_per_layer"] = [sum(x[i] for x in lists if i < len(x)) for i in range(width)]
    merged["heads_per_layer_last_call"] = summaries[-1]["heads_per_layer"]
    counted = [s for s in summaries if "counts" in s]
    if counted:
        counts = {k: sum(s["counts"].get(k, 0) for s in counted) for k in (*BIT_COUNTS, *ROW_COUNTS)}
        enabled = set().union(*(s["enabled"] for s in counted))
        merged["counts"] = counts
        merged.update(_fractions(counts, enabled))
    for technique in sorted(registry.TECHNIQUES, key=lambda t: ROLES.index(t.role)):
        technique.merge_summary(summaries, merged)
    return merged

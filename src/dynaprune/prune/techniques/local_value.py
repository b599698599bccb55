"""Local value pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-C): ``value=K``.

After the softmax each head and query keeps only the fraction K of its V rows with the largest
probabilities (not renormalized: the small products are skipped). Role: value selector (it replaces
``probs @ v``). Cost: the V rows fetched (the union over the queries of a call) and the (query, V row) products
against dense (the summary's ``value`` and ``bits`` counts: ``value_rows_kept``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from dynaprune.prune import keys as K
from dynaprune.prune.technique import Stage, Technique
from dynaprune.prune.values import local_value_attention


@dataclass(frozen=True)
class ValuePruning(Technique):
    """``value``: fraction of V rows kept per head and query."""

    value: float | None = None

    role = "values"
    keys = (K.Key("value", K.parse_float, K.ratio),)

    def stage(self, run) -> Stage | None:
        return LocalValueStage(self, run) if self.value is not None else None


class LocalValueStage(Stage):
    name = "value"
    explicit = True
    summary_counts = frozenset({"value", "bits"})

    def combine(self, call, probs, v):
        result = local_value_attention(probs, v, self.technique.value, key_mask=call.mask, query_mask=call.query_mask)
        stats = self.run.layer_stats[call.layer]
        for name in ("value_rows_used", "value_rows_dense", "value_rows_fetched", "value_rows_fetched_dense"):
            setattr(stats, name, getattr(stats, name) + getattr(result, name.replace("value", "v")))
        call.fetched_values = result.fetched
        return result.output

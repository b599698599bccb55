"""Local value pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-C): ``value=K``.

After the softmax each head and query keeps only the fraction K of its V rows with the largest
probabilities (not renormalized: the small products are skipped). Role: value selector (it replaces
``probs @ v``). Cost: the V rows used against the dense V rows, reported as ``value_rows_kept``.
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

    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        LocalValueStage.merge(summaries, merged)

    def stage(self, run) -> Stage | None:
        return LocalValueStage(self, run) if self.value is not None else None


class LocalValueStage(Stage):
    name = "value"
    explicit = True

    def combine(self, call, probs, v):
        result = local_value_attention(probs, v, self.technique.value, key_mask=call.mask)
        counts = self.run.counts(call.layer, self.name)
        counts["used"] = counts.get("used", 0) + result.v_rows_used
        counts["dense"] = counts.get("dense", 0) + result.v_rows_dense
        return result.output

    def summary(self, out, layers) -> None:
        out["value_rows_kept"] = self.total(layers, "used") / max(1, self.total(layers, "dense"))

    @staticmethod
    def merge(summaries: list[dict], merged: dict) -> None:
        values = [s["value_rows_kept"] for s in summaries if "value_rows_kept" in s]
        if values:
            merged["value_rows_kept"] = sum(values) / len(values)

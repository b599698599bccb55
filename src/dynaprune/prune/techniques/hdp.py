"""Hybrid Dynamic Pruning (HDP, 2024; see ``prune/hdp/``): ``block=RHO`` or ``block_sparsity=S``,
``block_size``, ``block_score``, ``block_keep_first``, ``hdp_head=TAU``, ``approx``, ``fixed=I.F``.

Q and K in fixed point; the integer scores decide row-balanced block pruning (Mechanism 1) and early
head pruning (Mechanism 2); ``approx`` drops the fraction x fraction term (Mechanism 3). Role:
attention kernel: it computes the attention of the alive heads itself, so it cannot compose with a
probability transform (``quant``) or a value selector (``value``). On when any of block,
block_sparsity, hdp_head or fixed is set. Cost: the (query, key) pairs of kept blocks of kept heads
(``head_pairs`` of the work counter) beside its integer pass (``int_head_pairs``), the QK^T passes the
emulation runs, and the ``hdp`` counts of the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynaprune.prune import keys as K
from dynaprune.prune.hdp import BLOCK_SCORES, DEFAULT_BLOCK_SCORE, HDPConfig, hdp_attention
from dynaprune.prune.technique import Stage, Technique

HDP_COUNTS = ("blocks_kept", "blocks_valid", "pairs_kept", "pairs_valid", "head_kept", "qk_int_mults",
              "qk_frac_mults", "skipped_by_head", "skipped_by_block", "skipped_by_near_zero", "frac_frac_dropped",
              "pv_mults")


def check_sparsity(key: str, value: Any) -> float:
    value = K.as_float(key, value)
    if not 0.0 <= value < 1.0:
        raise K.err(key, f"{K.fmt_float(value)} is outside [0, 1)")
    return value


def parse_fixed(key: str, raw: str) -> tuple[int, int]:
    return K.parse_pair(key, raw, "I.F (integer bits . fraction bits, e.g. fixed=8.8)")


def check_fixed(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        value = parse_fixed(key, value)
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise K.err(key, f"must be I.F (integer and fraction bits), got {value!r}")
    int_bits, frac_bits = (K.as_int(key, v) for v in value)
    if not (1 <= int_bits <= 16 and 1 <= frac_bits <= 16 and int_bits + frac_bits <= 16):
        raise K.err(key, f"{int_bits}.{frac_bits}: I and F must be 1..16 with I + F <= 16")
    return (int_bits, frac_bits)


@dataclass(frozen=True)
class HybridDynamicPruning(Technique):
    """HDP's knobs, named as their recipe keys (see ``prune/hdp/config.py`` for each)."""

    block: float | None = None
    block_sparsity: float | None = None
    block_size: int | None = None
    block_score: str = DEFAULT_BLOCK_SCORE  # max, chosen on STS-B train (abs_sum is the paper's)
    block_keep_first: bool = False
    hdp_head: float | None = None
    approx: bool = False
    fixed: tuple[int, int] | None = None

    role = "kernel"
    keys = (
        K.Key("block", K.parse_float, K.number),
        K.Key("block_sparsity", K.parse_float, check_sparsity),
        K.Key("block_size", K.parse_int, K.at_least(1, integer=True)),
        K.Key("block_score", K.parse_word, K.choice(*BLOCK_SCORES), default=DEFAULT_BLOCK_SCORE),
        K.Key("block_keep_first", K.parse_onoff, K.onoff, default=False, json="text"),
        K.Key("hdp_head", K.parse_float, K.at_least(0.0, integer=False)),
        K.Key("approx", K.parse_onoff, K.onoff, default=False, json="text"),
        K.Key("fixed", parse_fixed, check_fixed, json="text"),
    )
    excludes = {"probs": "HDP computes the attention itself from fixed-point Q and K",
                "values": "HDP computes the attention itself (probs x V of its kept blocks)"}

    def check(self) -> None:
        if self.block is not None and self.block_sparsity is not None:
            raise K.err("block_sparsity", "set either block (a threshold ratio) or block_sparsity (a target)")
        no_blocks = self.block is None and self.block_sparsity is None
        if self.block_size is not None and no_blocks:
            raise K.err("block_size", "block_size needs block or block_sparsity")
        for name, default in (("block_score", DEFAULT_BLOCK_SCORE), ("block_keep_first", False)):
            if getattr(self, name) != default and no_blocks:
                raise K.err(name, f"{name} tunes block pruning; it needs block or block_sparsity")

    @property
    def active(self) -> bool:
        """Whether HDP runs (``approx`` alone changes nothing)."""
        return any(x is not None for x in (self.block, self.block_sparsity, self.hdp_head, self.fixed))

    def config(self) -> HDPConfig | None:
        if not self.active:
            return None
        int_bits, frac_bits = self.fixed or (8, 8)
        return HDPConfig(int_bits=int_bits, frac_bits=frac_bits, block_size=self.block_size or 2,
                         block_ratio=self.block, block_sparsity=self.block_sparsity, head_threshold=self.hdp_head,
                         approx=self.approx, block_score=self.block_score, keep_first_block=self.block_keep_first)

    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        HDPStage.merge(summaries, merged)

    def stage(self, run) -> Stage | None:
        return HDPStage(self, run) if self.active else None


class HDPStage(Stage):
    name = "hdp"
    explicit = True

    def __init__(self, technique: HybridDynamicPruning, run) -> None:
        super().__init__(technique, run)
        self.hdp = technique.config()
        self.last = None  # the HDP stats of the last call, for its trace entry

    def attention(self, call):
        out, stats = hdp_attention(call.q, call.k, call.v, self.hdp, scale=call.scale, causal=call.causal,
                                   key_padding_mask=call.key_padding_mask, query_padding_mask=call.query_mask,
                                   measure_error=False)
        counts = {name: float(getattr(stats, name).sum()) for name in HDP_COUNTS}
        counts["heads_total"] = float(stats.head_kept.numel())
        totals = self.run.counts(call.layer, self.name)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0.0) + value
        self.last = stats
        call.int_pairs = int(counts["qk_int_mults"]) // call.q.shape[-1]  # the integer pass, every valid pair
        call.qk_passes = qk_passes(self.hdp)
        return out, int(counts["pairs_kept"])

    def trace(self, entry: dict, queries: int) -> None:
        hdp, self.last = self.last, None
        if hdp is not None:  # per head, the share of pairs its blocks kept, and which heads survived
            share = (hdp.pairs_kept[0].double() / hdp.pairs_valid[0].double().clamp(min=1)).tolist()
            entry["hdp"] = {"kept_share": share, "head_kept": hdp.head_kept[0].tolist()}

    def summary(self, out, layers) -> None:
        totals: dict[str, float] = {}
        for i in layers:
            for key, value in self.run.counts(i, self.name).items():
                totals[key] = totals.get(key, 0.0) + value
        out["hdp"] = hdp_sparsities(totals)

    @staticmethod
    def merge(summaries: list[dict], merged: dict) -> None:
        hdp = [s["hdp"] for s in summaries if "hdp" in s]
        if hdp:
            totals = {k: sum(h.get(k, 0.0) for h in hdp) for k in hdp[0] if not k.endswith("sparsity")}
            merged["hdp"] = hdp_sparsities(totals)


def qk_passes(config: HDPConfig) -> int:
    """Full-rectangle QK^T matmuls our HDP emulation runs (``prune/hdp``): the integer pass, the
    approximate scores (integer + two cross terms, + the fraction x fraction term without approx)
    and, with approx, the near-zero count."""
    return 1 + (3 if config.approx else 4) + (1 if config.approx and config.near_zero else 0)


def hdp_sparsities(totals: dict[str, float]) -> dict[str, float]:
    """HDP count totals with the block, pair and head sparsities they imply added."""
    return {
        **totals,
        "block_sparsity": 1 - totals["blocks_kept"] / max(1.0, totals["blocks_valid"]),
        "pair_sparsity": 1 - totals["pairs_kept"] / max(1.0, totals["pairs_valid"]),
        "head_sparsity": 1 - totals["head_kept"] / max(1.0, totals["heads_total"]),
    }

"""Progressive quantization (SpAtten, Wang et al. HPCA 2021, Sec. III-D): ``quant=M+L@T``,
``quant=M+L@rateR`` or ``quant=B``, with ``quant_group=G``.

K is quantized per channel over groups of G tokens and V per token over groups of G channels (KIVI's
layout, asymmetric, fp16 scales and zero-points; ``prune/quant.py``): the MSBs a round-to-nearest M-bit
group quantization, the LSBs an L-bit refinement of its residual within one MSB step. The
probabilities are computed from the key MSBs; a row (batch, head, query) whose max probability is below
T (a flat distribution, where quantization error matters) is recomputed with MSB + LSB, and its output
uses the V MSB + LSB (the other rows the V MSBs). Q stays in full precision (computed on chip). ``quant=B``:
static B-bit K and V. ``quant=M+L@rateR``: T is the threshold calibrated on WikiText-2 valid so that a
share R of the rows fetch LSBs (``lsb_thresholds.json``, re-derived by ``dynaprune calibrate --lsb-rate``),
for the model shapes and settings shipped there. ``quant_group`` (default 64, or head_dim if smaller)
must divide head_dim. ``quant_rotate=k|v|kv``: K and/or V Hadamard-rotated before they are quantized
(``prune/hadamard.py``). ``quant_value_residual=on``: a causal query reads the values of its incomplete
key group in full precision too (KIVI's residual, keys and values). The paper's settings are 4+4 ...
12+4; any M, L >= 1 with M + L <= 16 is accepted.
Cost: the Q/K/V bits fetched (scales and zero-points included; keys of a not yet complete group in full
precision) and the rows needing LSBs (``lsb_row_fraction``, ``bits_fetched_vs_fp16``, ...); a QK^T pass
more when a row needed its LSBs. ``storage: simulated``: the cache keeps fp tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.quant import (
    SCALE_ZERO_BITS,
    attention_probs,
    group_sizes,
    progressive_output,
    progressive_probs,
    quantize_key_channels,
    quantize_value_tokens,
    quantized_key_slots,
    residual_keys,
    residual_output,
)
from dynaprune.prune.technique import Stage, Technique

PAPER_QUANT_SETTINGS = ((4, 4), (6, 4), (8, 4), (10, 4), (12, 4))
THRESHOLDS_FILE = "lsb_thresholds.json"
# the quantizer a calibrated table was measured with (tables of an earlier one are not used)
QUANTIZER = "msb: round-to-nearest M-bit group quantization; lsb: L-bit mid-rise refinement of its residual"
HISTOGRAM_BINS = 20000  # max-probability histogram of a calibration run (bins of 5e-5)
_QUANT_RE = re.compile(r"^(\d+)\+(\d+)(?:@(rate)?(.*))?$")


@dataclass(frozen=True)
class QuantSetting:
    """``quant=B`` (static, ``lsb_bits == 0``), ``quant=M+L@T`` or ``quant=M+L@rateR`` (progressive)."""

    bits: int  # static bits, or the MSB bits of a progressive setting
    lsb_bits: int = 0
    threshold: float | None = None  # progressive: LSBs fetched when a row's max prob < threshold
    lsb_rate: float | None = None  # progressive: the threshold calibrated for this share of LSB rows

    @property
    def progressive(self) -> bool:
        return self.lsb_bits > 0

    @property
    def total_bits(self) -> int:
        return self.bits + self.lsb_bits

    def __str__(self) -> str:
        if not self.progressive:
            return str(self.bits)
        if self.lsb_rate is not None:
            return f"{self.bits}+{self.lsb_bits}@rate{K.fmt_float(self.lsb_rate)}"
        return f"{self.bits}+{self.lsb_bits}@{K.fmt_float(self.threshold)}"


def parse_quant(key: str, raw: str) -> QuantSetting:
    if raw.isdigit():
        return QuantSetting(int(raw))
    match = _QUANT_RE.match(raw)
    if not match:
        raise K.err(key, f"{raw!r} is not B (static bits), M+L@T or M+L@rateR (e.g. quant=4+4@0.1)")
    msb, lsb, rate, threshold = match.groups()
    if int(lsb) == 0:  # M+0 is no progressive setting; said so rather than read as static M bits
        raise K.err(key, f"{raw!r} has no LSB bits: progressive is M+L@T with L >= 1, static is quant=B")
    if threshold is None:  # the bit widths are checked first, so the suggested form is itself valid
        return check_quant(key, QuantSetting(int(msb), int(lsb)))
    value = K.parse_float(key, threshold)
    return QuantSetting(int(msb), int(lsb), None, value) if rate else QuantSetting(int(msb), int(lsb), value)


def check_quant(key: str, value: Any) -> QuantSetting:
    if isinstance(value, str):
        value = parse_quant(key, value)
    if not isinstance(value, QuantSetting):
        raise K.err(key, f"must be B, M+L@T or M+L@rateR, got {value!r}")
    bits, lsb = K.as_int(key, value.bits), K.as_int(key, value.lsb_bits)
    if not 1 <= bits <= 16:
        raise K.err(key, f"{bits} bits is outside 1..16")
    if lsb == 0:
        if value.threshold is not None or value.lsb_rate is not None:
            raise K.err(key, "a threshold needs MSB+LSB bits: quant=M+L@T")
        return QuantSetting(bits)
    if not 1 <= lsb <= 16 or bits + lsb > 16:
        raise K.err(key, f"MSB + LSB = {bits}+{lsb} must be 1..16 bits each and at most 16 in total "
                         "(e.g. quant=12+4@0.1)")
    if value.lsb_rate is not None:
        rate = K.as_float(key, value.lsb_rate)
        if not 0.0 < rate < 1.0:
            raise K.err(key, f"LSB rate {K.fmt_float(rate)} is outside (0, 1)")
        return QuantSetting(bits, lsb, None, rate)
    if value.threshold is None:
        raise K.err(key, f"progressive quantization needs a threshold: quant={bits}+{lsb}@0.1 "
                         "(or a calibrated share of LSB rows, written @rateR, e.g. @rate0.05)")
    threshold = K.as_float(key, value.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise K.err(key, f"threshold {K.fmt_float(threshold)} is outside [0, 1]")
    return QuantSetting(bits, lsb, threshold)


# ---------------------------------------------------------------------- calibrated thresholds
@cache
def shipped_thresholds() -> tuple[dict, ...]:
    """The calibrated (LSB rate -> threshold) tables shipped with the package (``lsb_thresholds.json``)."""
    text = resources.files("dynaprune.prune.techniques").joinpath(THRESHOLDS_FILE).read_text()
    return tuple(json.loads(text)["tables"])


def shape_signature(shape: Any) -> dict[str, int]:
    """What identifies a model for a calibrated table (the cost shape's sizes)."""
    return {name: int(getattr(shape, name)) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim")}


def threshold_for_rate(table: dict, rate: float) -> float:
    """The threshold giving ``rate`` of LSB rows by the table (linear between its points)."""
    rates, thresholds = table["rates"], table["thresholds"]
    if not rates[0] <= rate <= rates[-1]:
        raise K.err("quant", f"LSB rate {K.fmt_float(rate)} is outside the calibrated {rates[0]:g}..{rates[-1]:g}")
    for i in range(1, len(rates)):
        if rate <= rates[i]:
            share = (rate - rates[i - 1]) / (rates[i] - rates[i - 1]) if rates[i] > rates[i - 1] else 1.0
            return thresholds[i - 1] + share * (thresholds[i] - thresholds[i - 1])
    return thresholds[-1]


def resolve_threshold(setting: QuantSetting, group: int, shape: Any,
                      tables: tuple[dict, ...] | None = None, rotate: str = "", value_residual: bool = False) -> float:
    """The threshold of ``quant=M+L@rateR`` for this model shape, group, rotation and value residual
    (refused where none is shipped)."""
    signature = shape_signature(shape)
    for table in shipped_thresholds() if tables is None else tables:
        if (table["shape"] == signature and table["msb_bits"] == setting.bits
                and table["lsb_bits"] == setting.lsb_bits and table["group"] == group
                and table.get("rotate", "") == rotate and table.get("value_residual", False) == value_residual
                and table.get("quantizer") == QUANTIZER):
            return threshold_for_rate(table, setting.lsb_rate)
    options = (f",quant_rotate={rotate}" if rotate else "") + (",quant_value_residual=on" if value_residual else "")
    raise K.err("quant", f"no calibrated threshold for {setting.bits}+{setting.lsb_bits}{options} "
                         f"with quant_group={group} "
                         f"on a model of shape {signature}: run `dynaprune calibrate MODEL --lsb-rate "
                         f"{K.fmt_float(setting.lsb_rate)} --quant {setting.bits}+{setting.lsb_bits}` and use its "
                         "threshold (quant=M+L@T)")


@dataclass(frozen=True)
class Quantization(Technique):
    """``quant``: a :class:`QuantSetting` (or its string form); ``quant_group``: tokens per key group
    and channels per value group."""

    quant: QuantSetting | None = None
    quant_group: int | None = None
    quant_rotate: str | None = None
    quant_value_residual: bool | None = None

    role = "probs"
    keys = (K.Key("quant", parse_quant, check_quant, json="text"),
            K.Key("quant_group", K.parse_int, K.at_least(1, integer=True)),
            K.Key("quant_rotate", K.parse_word, K.choice("k", "v", "kv")),
            K.Key("quant_value_residual", K.parse_onoff, K.onoff))

    def check(self) -> None:
        for key in ("quant_group", "quant_rotate", "quant_value_residual"):
            if getattr(self, key) is not None and self.quant is None:
                raise K.err(key, "needs quant=B or quant=M+L@T")

    def stage(self, run) -> Stage | None:
        return QuantStage(self, run) if self.quant is not None else None

    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        for name in ("lsb_threshold", "quant_groups", "quant_rotate"):  # the same in every context of one run
            found = next((s[name] for s in summaries if name in s), None)
            if found is not None:
                merged[name] = found


class QuantStage(Stage):
    name = "quant"
    explicit = True
    summary_counts = frozenset({"quant", "bits"})

    def __init__(self, technique: Quantization, run) -> None:
        super().__init__(technique, run)
        head_dim = run.shape.head_dim
        if technique.quant_group is not None and head_dim % technique.quant_group:
            raise K.err("quant_group", f"{technique.quant_group} does not divide head_dim={head_dim}: values are "
                                       "quantized per token in groups of channels")
        self.key_group, self.value_group = group_sizes(head_dim, technique.quant_group)
        self.rotate = technique.quant_rotate or ""
        if self.rotate and head_dim & (head_dim - 1):
            raise K.err("quant_rotate", f"a Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
        self.value_residual = bool(technique.quant_value_residual)
        quant = technique.quant
        self.lsb_threshold = quant.threshold
        if quant.lsb_rate is not None:
            self.lsb_threshold = resolve_threshold(quant, self.key_group, run.shape, rotate=self.rotate,
                                                   value_residual=self.value_residual)
        # with local value pruning (its own probs x V) V is read at M + L for every row
        self.value_progressive = quant.progressive and getattr(run.recipe, "value", None) is None
        self.last_needs_lsb = None  # (B, H, Lq) of the last call, for its trace entry and the V rows
        self.last_residual = 0
        self.max_prob_histogram: torch.Tensor | None = None  # set by a calibration run to record the rows
        self._values = None
        self._slots = None  # the last call's quantized key slots (the value residual reads the others fp)
        self._v_fp = None
        run.work.storage = "simulated"  # fake-quantized floats: no packed codes are stored

    def probs(self, call):
        quant, q, k = self.technique.quant, call.q, call.k
        key_valid = call.mask.any(dim=-2) if call.mask is not None else None
        keys = quantize_key_channels(k, quant.bits, quant.lsb_bits, self.key_group, key_valid, "k" in self.rotate)
        slots = quantized_key_slots(q.shape[2], k.shape[2], self.key_group, call.causal, q.device)
        self._slots = slots
        self.last_residual = residual_keys(k.shape[2], self.key_group, call.causal)
        self.last_needs_lsb = None
        if not quant.progressive:
            return attention_probs(q, keys.full, k, call.scale, call.mask, slots).nan_to_num(0.0)
        result = progressive_probs(q, keys, k, call.scale, self.lsb_threshold, call.mask, slots)
        if self.max_prob_histogram is not None:
            self._record(result.max_prob, call.query_mask)
        self.last_needs_lsb = call.needs_lsb = result.needs_lsb
        call.qk_passes = 1 + int(bool(result.needs_lsb.any()))
        return result.probs.nan_to_num(0.0)

    def _record(self, max_prob: torch.Tensor, query_mask: torch.Tensor | None) -> None:
        rows = max_prob if query_mask is None else max_prob[query_mask.bool()[:, None, :].expand_as(max_prob)]
        rows = rows[torch.isfinite(rows)].float().cpu()
        self.max_prob_histogram += torch.histc(rows, bins=HISTOGRAM_BINS, min=0.0, max=1.0)

    def values(self, call, v):
        quant = self.technique.quant
        values = quantize_value_tokens(v, quant.bits, quant.lsb_bits if self.value_progressive else 0,
                                       self.value_group, "v" in self.rotate)
        self._values = values
        self._v_fp = v if self.value_residual else None
        return values.full

    def combine(self, call, probs, v):
        values, self._values = self._values, None
        v_fp, self._v_fp = self._v_fp, None
        if values is None or not (self.value_progressive or v_fp is not None):
            return None
        if not self.value_progressive:
            return residual_output(probs @ values.full, probs, values.full, v_fp, self._slots)
        out = progressive_output(probs, values, self.last_needs_lsb)
        if v_fp is None:
            return out
        # a row read the MSB (+ LSB) values; in its residual slots the fp values instead
        with_msb = residual_output(out, probs, values.msb_only, v_fp, self._slots)
        lsb = self.last_needs_lsb
        if lsb is None or not bool(lsb.any()):
            return with_msb
        return torch.where(lsb[..., None], residual_output(out, probs, values.full, v_fp, self._slots), with_msb)

    def bit_widths(self) -> dict[str, Any]:
        quant = self.technique.quant
        value_bits = quant.bits if self.value_progressive else quant.total_bits
        return {"key_bits": quant.bits, "lsb_bits": quant.lsb_bits, "value_bits": value_bits,
                "value_lsb_bits": quant.lsb_bits if self.value_progressive else 0, "query_bits": 16,
                "key_overhead": SCALE_ZERO_BITS / self.key_group, "value_overhead": SCALE_ZERO_BITS / self.value_group,
                "key_residual": self.last_residual,
                "value_residual": self.last_residual if self.value_residual else 0}

    def summary(self, out: dict, layers: list[int]) -> None:
        if self.technique.quant.progressive:
            out["lsb_threshold"] = self.lsb_threshold
        out["quant_groups"] = {"key_tokens": self.key_group, "value_channels": self.value_group}
        if self.rotate:
            out["quant_rotate"] = self.rotate

    def trace(self, entry: dict, queries: int) -> None:
        lsb, self.last_needs_lsb = self.last_needs_lsb, None
        entry["needs_lsb"] = lsb[0, :, -queries:].tolist() if lsb is not None else None

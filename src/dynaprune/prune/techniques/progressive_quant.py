"""Progressive quantization (SpAtten, Wang et al. HPCA 2021, Sec. III-D): ``quant=M+L@T`` or ``quant=B``.

Q and K are quantized to M + L bits and the probabilities computed with the MSBs only; a row whose max
probability is below T (a flat distribution, where quantization error matters) is recomputed with MSB +
LSB. V is quantized to M + L bits. ``quant=B``: static B-bit quantization. The paper's settings are
4+4, 6+4, 8+4, 10+4 and 12+4; any M, L >= 1 with M + L <= 16 is accepted. Role: probability transform.
Cost: the Q/K/V bits fetched at these widths and the rows needing LSBs (the summary's ``quant`` and
``bits`` counts: ``lsb_row_fraction``, ``key_bits_fetched_vs_fp16``, ...); a QK^T pass more when a row
needed its LSBs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dynaprune.prune import keys as K
from dynaprune.prune.quant import progressive_attention_probs, quantized_attention_probs, quantized_values
from dynaprune.prune.technique import Stage, Technique

PAPER_QUANT_SETTINGS = ((4, 4), (6, 4), (8, 4), (10, 4), (12, 4))
_QUANT_RE = re.compile(r"^(\d+)\+(\d+)(?:@(.*))?$")


@dataclass(frozen=True)
class QuantSetting:
    """``quant=B`` (static, ``lsb_bits == 0``) or ``quant=M+L@T`` (progressive, Sec. III-D)."""

    bits: int  # static bits, or the MSB bits of a progressive setting
    lsb_bits: int = 0
    threshold: float | None = None  # progressive only: LSBs fetched when a row's max prob < threshold

    @property
    def progressive(self) -> bool:
        return self.lsb_bits > 0

    @property
    def total_bits(self) -> int:
        return self.bits + self.lsb_bits

    def __str__(self) -> str:
        if not self.progressive:
            return str(self.bits)
        return f"{self.bits}+{self.lsb_bits}@{K.fmt_float(self.threshold)}"


def parse_quant(key: str, raw: str) -> QuantSetting:
    if raw.isdigit():
        return QuantSetting(int(raw))
    match = _QUANT_RE.match(raw)
    if not match:
        raise K.err(key, f"{raw!r} is not B (static bits) or M+L@T (e.g. quant=4+4@0.1)")
    msb, lsb, threshold = match.groups()
    if int(lsb) == 0:  # M+0 is no progressive setting; said so rather than read as static M bits
        raise K.err(key, f"{raw!r} has no LSB bits: progressive is M+L@T with L >= 1, static is quant=B")
    if threshold is None:  # the bit widths are checked first, so the suggested form is itself valid
        return check_quant(key, QuantSetting(int(msb), int(lsb)))
    return QuantSetting(int(msb), int(lsb), K.parse_float(key, threshold))


def check_quant(key: str, value: Any) -> QuantSetting:
    if isinstance(value, str):
        value = parse_quant(key, value)
    if not isinstance(value, QuantSetting):
        raise K.err(key, f"must be B or M+L@T, got {value!r}")
    bits, lsb = K.as_int(key, value.bits), K.as_int(key, value.lsb_bits)
    if not 1 <= bits <= 16:
        raise K.err(key, f"{bits} bits is outside 1..16")
    if lsb == 0:
        if value.threshold is not None:
            raise K.err(key, "a threshold needs MSB+LSB bits: quant=M+L@T")
        return QuantSetting(bits)
    if not 1 <= lsb <= 16 or bits + lsb > 16:
        raise K.err(key, f"MSB + LSB = {bits}+{lsb} must be 1..16 bits each and at most 16 in total "
                         "(e.g. quant=12+4@0.1)")
    if value.threshold is None:
        raise K.err(key, f"progressive quantization needs a threshold: quant={bits}+{lsb}@0.1")
    threshold = K.as_float(key, value.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise K.err(key, f"threshold {K.fmt_float(threshold)} is outside [0, 1]")
    return QuantSetting(bits, lsb, threshold)


@dataclass(frozen=True)
class Quantization(Technique):
    """``quant``: a :class:`QuantSetting` (or its string form)."""

    quant: QuantSetting | None = None

    role = "probs"
    keys = (K.Key("quant", parse_quant, check_quant, json="text"),)

    def stage(self, run) -> Stage | None:
        return QuantStage(self, run) if self.quant is not None else None


class QuantStage(Stage):
    name = "quant"
    explicit = True
    summary_counts = frozenset({"quant", "bits"})

    def __init__(self, technique: Quantization, run) -> None:
        super().__init__(technique, run)
        self.last_needs_lsb = None  # (B, H, Lq) of the last call, for its trace entry
        run.work.storage = "simulated"  # fake-quantized floats: no packed codes are stored

    def probs(self, call):
        quant, q, k = self.technique.quant, call.q, call.k
        if not quant.progressive:
            return quantized_attention_probs(q, k, call.scale, quant.bits, call.mask).nan_to_num(0.0)
        result = progressive_attention_probs(q, k, call.scale, quant.bits, quant.lsb_bits, quant.threshold, call.mask)
        self.last_needs_lsb = call.needs_lsb = result.needs_lsb
        call.qk_passes = 1 + int(result.rows_needing_lsb > 0)
        return result.probs.nan_to_num(0.0)

    def values(self, call, v):
        return quantized_values(v, self.technique.quant.total_bits).values

    def bit_widths(self) -> dict[str, int]:
        quant = self.technique.quant  # V is quantized at M + L
        return {"key_bits": quant.bits, "lsb_bits": quant.lsb_bits, "value_bits": quant.total_bits}

    def trace(self, entry: dict, queries: int) -> None:
        lsb, self.last_needs_lsb = self.last_needs_lsb, None
        entry["needs_lsb"] = lsb[0, :, -queries:].tolist() if lsb is not None else None

"""SpAtten's zero eliminator (Section IV-C, Fig. 10): a prefix sum, then one shifter layer per bit,
compacts the kept lanes to the front in order; its pipeline depth and cycle count."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dynaprune.errors import DynapruneError


def zero_eliminator_stages(width: int) -> int:
    """Pipeline stages of a zero eliminator of ``width`` lanes: a prefix sum, then log2(width) shifts."""
    return 1 + max(0, math.ceil(math.log2(width))) if width > 1 else 1


def zero_eliminator_cycles(lines: int, width: int) -> int:
    """Cycles to push ``lines`` vectors of ``width`` lanes through the pipelined eliminator."""
    return 0 if lines <= 0 else lines + zero_eliminator_stages(width) - 1

def zero_eliminate(values: Sequence[float], keep: Sequence[bool]) -> tuple[list[float], int]:
    """Compact the kept lanes to the front, in order (Section IV-C, Fig. 10); returns (lanes, stages).

    A prefix sum gives each lane the number of dropped lanes before it (``zero_cnt``); shifter layer s
    moves a lane left by 2**s when bit s of its ``zero_cnt`` is set. Layers go from the least to the most
    significant bit, which never makes two kept lanes collide (asserted).
    """
    if len(values) != len(keep):
        raise DynapruneError("zero eliminator: values and keep flags differ in length")
    n = len(values)
    zero_cnt, dropped = [], 0
    for flag in keep:
        zero_cnt.append(dropped)
        dropped += not flag
    triples = zip(values, zero_cnt, keep, strict=True)
    lanes: list[tuple[float, int] | None] = [(v, c) if f else None for v, c, f in triples]
    layers = max(0, math.ceil(math.log2(n))) if n > 1 else 0
    for s in range(layers):
        shifted: list[tuple[float, int] | None] = [None] * n
        for i, lane in enumerate(lanes):
            if lane is None:
                continue
            j = i - (1 << s) if lane[1] >> s & 1 else i
            assert shifted[j] is None, "zero eliminator collision"
            shifted[j] = lane
        lanes = shifted
    out = [lane[0] for lane in lanes if lane is not None]
    assert all(lane is not None for lane in lanes[: len(out)]), "zero eliminator left a gap"
    return out, 1 + layers


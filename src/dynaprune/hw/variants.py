"""The same workload with techniques switched off: the baselines of SpAtten's Fig. 20 and DRAM ratios.

Every function returns a new, validated ``Trace``; none reads anything but the trace itself.
  * ``unquantized(trace, bits)``: every tensor fetched at ``bits`` (default 12, SpAtten's datapath
    width), no progressive quantization (no LSB refetch);
  * ``without_value_pruning(trace)``: every kept token's value is fetched (local V pruning off);
  * ``with_all_heads(trace)``: rows restored for heads that cascade head pruning removed (a head is
    missing when its (iteration, layer) has fewer heads than the trace's widest layer); restored rows
    copy the layer's first row;
  * ``unpruned(trace)``: all heads, all tokens (key and value counts = sentence length), no top-k.
"""

from __future__ import annotations

import numpy as np

from dynaprune.hw.trace import COLUMNS, Trace


def unquantized(trace: Trace, bits: int = 12) -> Trace:
    return trace.replace(quant_key_bit=bits, quant_query_bit=bits, quant_value_bit=bits, if_requant=False,
                         auto_requant_incre=-1, auto_requant_thres=-1.0)


def without_value_pruning(trace: Trace) -> Trace:
    return trace.replace(value_fetch_num=trace["key_fetch_num"])


def with_all_heads(trace: Trace) -> Trace:
    heads = int(trace["head_id"].max()) + 1
    it, layer, head = trace["iteration_id"], trace["layer_id"], trace["head_id"]
    change = np.ones(len(trace), dtype=bool)
    change[1:] = (it[1:] != it[:-1]) | (layer[1:] != layer[:-1])
    starts = np.nonzero(change)[0]
    ends = np.append(starts[1:], len(trace))
    if all(e - s == heads for s, e in zip(starts, ends, strict=True)):
        return trace
    take, new_head = [], []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        present = dict(zip(head[s:e].tolist(), range(s, e), strict=True))
        for h in range(heads):
            take.append(present.get(h, s))
            new_head.append(h)
    idx = np.asarray(take)
    cols = {c: trace[c][idx].copy() for c in COLUMNS}
    cols["head_id"] = np.asarray(new_head, dtype=cols["head_id"].dtype)
    # a restored head carries no pruning decision of its own
    is_copy = np.asarray([head[t] != h for t, h in zip(take, new_head, strict=True)])
    cols["if_topk"][is_copy] = False
    cols["topk"][is_copy] = -1
    return Trace(cols, trace.config, trace.source)


def unpruned(trace: Trace) -> Trace:
    full = with_all_heads(trace)
    L = full["sentence_length_L"]
    return full.replace(key_fetch_num=L, value_fetch_num=L, if_topk=False, topk=-1)

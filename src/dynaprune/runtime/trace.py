"""Workload traces of our own runs, in the SpAtten CSV schema that ``hw/`` simulates.

A ``PruningContext(..., trace=True)`` records, for the first input of its batch, every attention call:
the heads computed, the keys each query attended (after cascade pruning and KV eviction), which rows
needed their LSBs, and how many tokens the cascade kept after the layer. ``trace_rows`` turns that into
one row per (iteration, layer, head, query): for a decode step a single query per head, for an encoder
or a prefill (SpAtten's summarization stage) one row per query, consecutive, so the simulators reuse
the fetched K/V across them. HDP runs: heads pruned early have no rows, block pruning shows as the kept
share of each head's keys, and the fixed-point word I.F is written as I key bits plus F "LSB" bits.
Rows are keyed by query head, so with GQA a K/V group is counted once per query head it serves.
A packed K/V cache (``kv_bits`` / ``kv_key_bits`` / ``kv_value_bits``) is written as its key and value
bits (the group scales and zero-points, about 1/8 bit an element at groups of 64-128 with 8-bit scales,
are not in the schema); the query stays unquantized (-1), as it is computed on chip.
"""

from __future__ import annotations

from pathlib import Path

from dynaprune.hw.trace import TraceRow, write_trace
from dynaprune.prune.keys import keep_count
from dynaprune.prune.techniques.kv_quant import KVQuantization
from dynaprune.runtime.pruning import PruningContext


def trace_rows(ctx: PruningContext) -> list[TraceRow]:
    if ctx.trace_calls is None:
        raise ValueError("this context was not created with trace=True")
    recipe = ctx.recipe
    quant = recipe.quant
    key_bits = quant.bits if quant is not None else -1
    total_bits = quant.total_bits if quant is not None else -1
    progressive = quant is not None and quant.progressive
    accumulate = recipe.prunes_tokens or recipe.has_kv_budget
    value_bits = total_bits
    if getattr(ctx, "hdp", None) is not None:  # HDP's fixed-point word: integer bits as "MSBs", fraction bits as "LSBs"
        key_bits, total_bits = ctx.hdp.int_bits, ctx.hdp.int_bits + ctx.hdp.frac_bits
        value_bits = total_bits
    kv_store = recipe.technique(KVQuantization)
    if kv_store is not None and quant is None:  # a packed K/V cache: K and V fetched at their stored bits
        key_bits, value_bits = kv_store.key_bits, kv_store.value_bits
    rows: list[TraceRow] = []
    for call in ctx.trace_calls:
        last_head = len(call["heads"]) - 1
        hdp = call.get("hdp")
        for slot, head in enumerate(call["heads"]):
            if hdp is not None and not hdp["head_kept"][slot]:
                continue  # pruned early by HDP: the simulator reads a missing head as pruned
            n_queries = len(call["keys_per_query"])
            for i, keys in enumerate(call["keys_per_query"]):
                if hdp is not None:  # block pruning: the kept share of this head's pairs
                    keys = max(1, round(hdp["kept_share"][slot] * keys))
                values = keep_count(recipe.value, keys) if recipe.value is not None else keys
                requant = bool(call["needs_lsb"][slot][i]) if call["needs_lsb"] is not None else False
                topk_row = call["topk"] is not None and slot == last_head and i == n_queries - 1
                rows.append(TraceRow(
                    iteration_id=call["iteration"], layer_id=call["layer"], head_id=head,
                    embedding_length_D=call["D"], sentence_length_L=max(call["L"], keys), key_fetch_num=keys,
                    quant_key_bit=key_bits, quant_query_bit=total_bits,
                    auto_requant_thres=ctx.lsb_threshold if progressive else -1.0,  # a rate resolved
                    if_requant=requant, auto_requant_incre=quant.lsb_bits if progressive else -1,
                    value_fetch_num=values, quant_value_bit=value_bits,
                    if_accumulate_importance=accumulate, if_topk=topk_row,
                    topk=call["topk"] if topk_row else -1,
                ))
    return rows


def write_run_trace(path: str | Path, ctx: PruningContext, config: str | None = None) -> Path:
    """Write the trace of a traced run (see module docstring) atomically."""
    return write_trace(path, trace_rows(ctx), config=config or f"dynaprune {ctx.recipe}".replace(",", ";"))

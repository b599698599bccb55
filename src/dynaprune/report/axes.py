"""The four measures of work kept that the report plots a metric against, read from one result row.

- ``flops_kept``: FLOPs really done / dense FLOPs (``runtime/cost.py`` ``work_cost``, gathered work).
- ``attention_kept``: attention FLOPs (QK^T and PV) really done / dense (``work_cost``): where HDP's
  block and head pruning show (on short inputs attention is a small share of all FLOPs).
- ``kv_bytes_kept``: K/V bytes read / dense K/V bytes, both at 16 bits (``work_cost``).
- ``bits_kept``: bits fetched / dense fp16 bits: the K/V bytes kept, times the share of heads computed
  (token-weighted over layers; multi-head models only: with grouped K/V heads a pruned query head need
  not spare its K/V), times the bits each remaining operand row is fetched at. Results since issue 12
  carry ``bits_fetched_vs_fp16`` (``runtime/summary.py``): Q, K and V bits counted over the same rows
  at 16 bits (padding excluded from both), V over the rows value pruning really fetches (the union
  over queries), each operand at its own width. Older results carry only the K bits (whose fp16
  denominator counted padding keys) and the V rows *used*; they are drawn with the old estimate
  ``(key_bits_fetched_vs_fp16 + value_rows_kept) / 2``. What a technique does not touch counts at
  16 bits. Block pruning (HDP) skips score blocks, not fetches, so it leaves this axis alone. The
  quantization is simulated (``cost.storage``): these are the bits an accelerator would fetch.
- Under HDP ``attention_kept`` and ``flops_kept`` model the accelerator (integer pass + kept pairs,
  ``cost.figure_kinds``); what our emulation computed is ``attention_flops_computed_kept``.

A result without a cost record (a dense run on an old file) counts as 1.0 on every axis.
"""

from __future__ import annotations

AXES: dict[str, str] = {
    "flops_kept": "fraction of FLOPs kept (real, gathered work)",
    "attention_kept": "fraction of attention FLOPs kept (QK, PV)",
    "kv_bytes_kept": "fraction of K/V bytes kept (fp16)",
    "bits_kept": "bits fetched (fraction of dense fp16)",
}
SHORT: dict[str, str] = {"flops_kept": "FLOPs kept", "attention_kept": "attention kept",
                         "kv_bytes_kept": "K/V bytes kept", "bits_kept": "bits fetched"}


def head_share(cost: dict) -> float:
    """Share of (token, head) work left by head pruning: sum over layers of tokens x heads alive,
    over the same with every head; 1.0 without head counts or with grouped K/V heads."""
    pruning = cost.get("pruning") or {}
    tokens = pruning.get("tokens_per_layer") or []
    heads = pruning.get("heads_per_layer_last_call") or pruning.get("heads_per_layer") or []
    shape = cost.get("shape") or {}
    n_heads, kv_heads = shape.get("heads"), shape.get("kv_heads")
    if not tokens or len(heads) != len(tokens) or not n_heads or kv_heads != n_heads:
        return 1.0
    total = sum(tokens) * n_heads
    return sum(t * h for t, h in zip(tokens, heads, strict=True)) / total if total else 1.0


def work_axes(row: dict) -> dict[str, float]:
    """``{"flops_kept", "attention_kept", "kv_bytes_kept", "bits_kept"}`` of one result row (see the module
    docstring)."""
    cost = row.get("cost") or {}
    pruning = cost.get("pruning") or {}
    kv = float(cost.get("kv_bytes_kept", 1.0))
    if "bits_fetched_vs_fp16" in pruning:
        bits = float(pruning["bits_fetched_vs_fp16"])
    else:  # a result from before issue 12 (see the module docstring)
        bits = (float(pruning.get("key_bits_fetched_vs_fp16", 1.0)) + float(pruning.get("value_rows_kept", 1.0))) / 2
    return {
        "flops_kept": float(cost.get("flops_kept", 1.0)),
        "attention_kept": float(cost.get("attention_flops_kept", 1.0)),
        "kv_bytes_kept": kv,
        "bits_kept": kv * head_share(cost) * bits,
    }

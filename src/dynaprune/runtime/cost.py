"""Dense work and memory of a forward pass, per component, so pruned figures can sit beside them.

FLOPs count a multiply-add as 2. Per layer and sequence of L tokens (d = hidden size, Hq query heads,
Hkv KV heads, h = head dim, f = FFN width, V = vocabulary):
  projections  2 L d (Hq h) [Q] + 2 * 2 L d (Hkv h) [K, V] + 2 L (Hq h) d [O]; a pruned head's Q and O
               are skipped, and its K and V when its whole KV group is pruned (runtime/head_skipping.py)
  attention    QK: 2 Hq h P, PV: 2 Hq h P, with P the number of (query, key) pairs attended:
               L^2 for an encoder, L (L + 1) / 2 for a causal decoder (plus the cached keys).
  ffn          2 L d f per matrix (2 matrices for BERT/GPT-2, 3 for Llama's gated MLP)
  lm_head      2 d V per position whose logits are computed (decoders; our encoders have no head)
  token_merge  token_policy=merge: key similarity and size-weighted merge (prune/merge.py merge_flops)
K/V bytes: what the K and V cache of those tokens holds at 16 bits (the accelerators' dense baseline).

Two views of a run (``work_cost``):
- ``flops_useful`` / ``flops_kept``: the work the algorithm needs on the real tokens. Under HDP this is
  a *model* of the accelerator's work, not what our emulation ran: the integer pass over every valid
  pair of every head it scores (``attn_qk_int``, an I-bit multiply counted as one MAC: an upper bound)
  plus QK^T and PV of the pairs of kept blocks of kept heads. ``figure_kinds`` says which ratios are
  ``modelled`` and which ``executed``.
- ``flops_computed`` / ``flops_computed_kept``: what our tensors really computed: padded positions,
  masked scores (the whole Lq x Lk rectangle unless SDPA's causal kernel skipped the upper triangle),
  every pass of an emulation (HDP's float64 masked passes, a progressive recompute), over the same
  dense useful FLOPs. A dense run on a padded batch computes more than 1.0 of it.

One bytes axis for K/V (``kv_bytes_vs_fp16``): the bytes of the KV cache each forward after the prompt
finds there, i.e. what it reads FOR THE CONTEXT (packed codes, fp16 scales and zero-points, and tokens
not packed at 2 bytes an element), over a fp16 cache of every token appended so far (nothing evicted,
nothing packed), summed over those forwards (a ratio of sums: bytes read over dense bytes read). Under
``lm --protocol continue`` that is the compressed context cache the continuation reads (what kvpress's
budgets mean); under ``stream`` and ``generate`` the cache held at each decode step. Runs that decode
nothing from a cache (encoders, ``window``) fall back to ``kv_bytes_kept``. ``kv_bytes_held_vs_fp16``:
the same count after the last forward. ``kv_bytes_kept`` (older) is another figure: the keys every
attention call read, the continuation's own included, at 16 bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dynaprune.runtime.attention import WorkCounter, windowed_pairs


@dataclass(frozen=True)
class CostShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    ffn_matrices: int  # 2 for a plain MLP, 3 for a gated (SwiGLU) MLP
    causal: bool
    vocab: int = 0  # LM-head outputs (0: no head, as in our encoders)
    # a statically pruned checkpoint (static/shapes.py): query heads / FFN width of each layer; None = uniform
    layer_heads: tuple[int, ...] | None = None
    layer_ffn: tuple[int, ...] | None = None
    # sliding-window layers (Gemma 3): keys a query of each layer sees at most, 0 = all; None = no window
    layer_windows: tuple[int, ...] | None = None

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] or None if self.layer_windows is not None else None

    def reference_layer(self, layer: int) -> int:
        """The first layer with ``layer``'s window: whose dense (query, key) pairs stand for it (a sliding
        layer attends fewer pairs than a global one of the same tokens)."""
        return 0 if self.layer_windows is None else self.layer_windows.index(self.layer_windows[layer])

    def heads_of(self, layer: int) -> int:
        return self.heads if self.layer_heads is None else self.layer_heads[layer]

    def ffn_of(self, layer: int) -> int:
        return self.ffn if self.layer_ffn is None else self.layer_ffn[layer]

    def kv_heads_of(self, layer: int) -> int:
        """Multi-head attention (BERT) loses a pruned head's K and V too; grouped-query (Llama) keeps them."""
        if self.layer_heads is not None and self.kv_heads == self.heads:
            return self.layer_heads[layer]
        return self.kv_heads


def _first(cfg, *names: str) -> int:
    for n in names:
        if hasattr(cfg, n):
            return int(getattr(cfg, n))
    raise AttributeError(f"config has none of {names}")


def cost_shape(model) -> CostShape:
    """Read the shape from one of our models' configs."""
    cfg = model.config
    hidden = _first(cfg, "hidden", "hidden_size", "dim", "n_embd")
    heads = _first(cfg, "heads", "n_heads", "num_heads", "num_attention_heads", "n_head")
    kind = type(model).__name__.lower()
    gated = "llama" in kind or "gemma" in kind
    try:
        kv_heads = _first(cfg, "kv_heads", "n_kv_heads", "num_kv_heads", "num_key_value_heads")
    except AttributeError:
        kv_heads = heads
    try:
        head_dim = _first(cfg, "head_dim")
    except AttributeError:
        head_dim = hidden // heads
    try:
        ffn = _first(cfg, "intermediate", "intermediate_size", "ffn", "n_inner", "ffn_dim", "ffn_hidden")
    except AttributeError:
        ffn = 4 * hidden
    layer_heads, layer_ffn = getattr(cfg, "layer_heads", None), getattr(cfg, "layer_intermediate", None)
    n_layers = _first(cfg, "layers", "n_layers", "num_layers", "num_hidden_layers", "n_layer")
    windows = None
    if callable(getattr(cfg, "window", None)):  # models/gemma3.py: sliding-window layers
        windows = tuple(cfg.window(i) or 0 for i in range(n_layers))
    return CostShape(
        layers=n_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        ffn_matrices=3 if gated else 2,
        causal="bert" not in kind,
        vocab=_first(cfg, "vocab", "vocab_size", "n_vocab") if hasattr(model, "generate") else 0,
        layer_heads=tuple(int(h) for h in layer_heads) if layer_heads is not None else None,
        layer_ffn=tuple(int(f) for f in layer_ffn) if layer_ffn is not None else None,
        layer_windows=windows if windows is not None and any(windows) else None,
    )


def dense_cost(shape: CostShape, lengths: list[int], cached: list[int] | None = None) -> dict:
    """Dense FLOPs per component and K/V bytes for sequences of the given lengths.

    ``cached`` gives, per sequence, keys already in a KV cache that the new tokens also attend to.
    """
    cached = cached or [0] * len(lengths)
    tokens = sum(lengths)
    if shape.causal:
        pairs = sum(n * (n + 1) // 2 + n * c for n, c in zip(lengths, cached, strict=True))
    else:
        pairs = sum(n * n for n in lengths)
    flops = {"proj_qkvo": 0, "attn_qk_int": 0, "attn_qk": 0, "attn_pv": 0, "ffn": 0}
    for layer in range(shape.layers):  # per layer: a statically pruned model's widths differ
        qdim, kvdim = shape.heads_of(layer) * shape.head_dim, shape.kv_heads_of(layer) * shape.head_dim
        if shape.causal and shape.window_of(layer) is not None:  # a sliding layer: each query sees <= window keys
            pairs = sum(int(windowed_pairs(torch.tensor(n + c), torch.tensor(n), shape.window_of(layer)))
                        for n, c in zip(lengths, cached, strict=True))
        elif shape.causal:
            pairs = sum(n * (n + 1) // 2 + n * c for n, c in zip(lengths, cached, strict=True))
        flops["proj_qkvo"] += 2 * tokens * shape.hidden * (2 * qdim + 2 * kvdim)
        flops["attn_qk"] += 2 * qdim * pairs
        flops["attn_pv"] += 2 * qdim * pairs
        flops["ffn"] += 2 * tokens * shape.hidden * shape.ffn_of(layer) * shape.ffn_matrices
    flops["lm_head"] = 2 * tokens * shape.hidden * shape.vocab  # every position's logits
    flops["token_merge"] = 0
    flops["total"] = sum(flops.values())
    kv_tokens = tokens + sum(cached)
    return {
        "shape": asdict(shape),
        "tokens": tokens,
        "dense_flops": flops,
        "dense_kv_bytes_fp16": 2 * 2 * kv_tokens * shape.head_dim * sum(map(shape.kv_heads_of, range(shape.layers))),
    }


def _flops(shape: CostShape, tokens: int, head_pairs: int, q_head_tokens: int, kv_head_tokens: int,
           int_head_pairs: int = 0, pv_head_pairs: int | None = None, layer: int = 0) -> dict[str, int]:
    """``q_head_tokens`` / ``kv_head_tokens``: tokens x query (KV) heads whose projections ran; ``layer``
    picks the FFN width of a statically pruned model."""
    return {
        "proj_qkvo": 2 * shape.hidden * shape.head_dim * (2 * q_head_tokens + 2 * kv_head_tokens),
        "attn_qk_int": 2 * shape.head_dim * int_head_pairs,
        "attn_qk": 2 * shape.head_dim * head_pairs,
        "attn_pv": 2 * shape.head_dim * (head_pairs if pv_head_pairs is None else pv_head_pairs),
        "ffn": 2 * tokens * shape.hidden * shape.ffn_of(layer) * shape.ffn_matrices,
    }


_ATTENTION = ("attn_qk_int", "attn_qk", "attn_pv")


def _attention(flops: dict[str, int]) -> int:
    return sum(flops.get(k, 0) for k in _ATTENTION)


def work_cost(shape: CostShape, work: WorkCounter, dense: WorkCounter | None = None) -> dict:
    """FLOPs per component and K/V bytes of the work a run really did, beside the dense figures.

    The dense reference is ``dense`` when given (e.g. the same inputs run without pruning), else the
    first layer's work repeated over every layer, with its (query, key) pairs and keys counted as if no
    K/V had been evicted: exact for token and head pruning, which never prune before the first layer,
    and for KV budgets, which the counter tracks beside the real pairs. Sliding-window layers (Gemma 3):
    a layer's pairs and keys are those of the first layer with its window (``CostShape.reference_layer``),
    exact unless tokens were pruned before that layer (then pass ``dense``). See the module docstring for
    the useful (modelled under HDP) and computed views.
    """
    layers = range(shape.layers)
    head_flops = 2 * shape.hidden * shape.vocab  # per position

    def totals(counter: WorkCounter, replicate_first: bool) -> dict:
        flops = {"proj_qkvo": 0, "attn_qk_int": 0, "attn_qk": 0, "attn_pv": 0, "ffn": 0}
        kv_bytes = 0
        for layer in layers:
            src = 0 if replicate_first else layer
            tokens = counter.tokens.get(src, 0)
            int_pairs = 0
            if replicate_first:  # the dense reference: layer 0 as if no K/V had been evicted, every head
                ref = shape.reference_layer(layer)  # pairs and keys: the first layer of the same window
                head_pairs = counter.dense_pairs.get(ref, 0) * shape.heads_of(layer)
                keys = counter.dense_keys.get(ref, 0)
                q_head_tokens, kv_head_tokens = tokens * shape.heads_of(layer), tokens * shape.kv_heads_of(layer)
            else:
                head_pairs, keys = counter.head_pairs.get(src, 0), counter.keys.get(src, 0)
                int_pairs = counter.int_head_pairs.get(src, 0)
                # pruned heads skip their projections; a counter without these figures ran every head
                q_head_tokens = counter.q_head_tokens.get(src, tokens * shape.heads_of(layer))
                kv_head_tokens = counter.kv_head_tokens.get(src, tokens * shape.kv_heads_of(layer))
            for key, value in _flops(shape, tokens, head_pairs, q_head_tokens, kv_head_tokens, int_pairs,
                                     layer=layer).items():
                flops[key] += value
            kv_bytes += keys * 2 * 2 * shape.kv_heads_of(layer) * shape.head_dim  # K and V of one token, fp16
        head_tokens = counter.lm_head_tokens_dense if replicate_first else counter.lm_head_tokens
        flops["lm_head"] = head_flops * head_tokens
        flops["token_merge"] = 0 if replicate_first else sum(counter.merge_flops.values())
        flops["total"] = sum(flops.values())
        return {"flops": flops, "kv_bytes_read_fp16": kv_bytes,
                "tokens_per_layer": [counter.tokens.get(0 if replicate_first else i, 0) for i in layers]}

    actual = totals(work, replicate_first=False)
    reference = totals(dense, replicate_first=False) if dense is not None else totals(work, replicate_first=True)
    dense_total, dense_attention = max(1, reference["flops"]["total"]), max(1, _attention(reference["flops"]))
    modelled = "modelled" if work.int_head_pairs else "executed"
    out = {
        "shape": asdict(shape),
        "dense": reference,
        "actual": actual,
        "flops_useful": actual["flops"]["total"],
        "flops_kept": actual["flops"]["total"] / dense_total,
        "attention_flops_kept": _attention(actual["flops"]) / dense_attention,
        "kv_bytes_kept": actual["kv_bytes_read_fp16"] / max(1, reference["kv_bytes_read_fp16"]),
        "figure_kinds": {"flops_kept": modelled, "attention_flops_kept": modelled, "kv_bytes_kept": "executed"},
    }
    if work.tokens_computed:
        computed = _computed_flops(shape, work)
        out["computed"] = {"flops": computed}
        out["flops_computed"] = computed["total"]
        out["flops_computed_kept"] = computed["total"] / dense_total
        out["attention_flops_computed_kept"] = _attention(computed) / dense_attention
        out["figure_kinds"].update(flops_computed_kept="executed", attention_flops_computed_kept="executed")
    out.update(_kv_bytes_axis(work, out["kv_bytes_kept"]))
    out["figure_kinds"].update(kv_bytes_vs_fp16="executed", kv_bytes_held_vs_fp16="executed")
    if work.storage is not None:
        out["storage"] = work.storage  # quantized values are simulated: bytes above are at fp16 width
    return out


def _computed_flops(shape: CostShape, work: WorkCounter) -> dict[str, int]:
    """FLOPs of the tensors a run really computed (``WorkCounter.add_computed``), LM head included."""
    flops = {"proj_qkvo": 0, "attn_qk_int": 0, "attn_qk": 0, "attn_pv": 0, "ffn": 0}
    for layer in range(shape.layers):
        part = _flops(shape, work.tokens_computed.get(layer, 0), work.qk_head_pairs_computed.get(layer, 0),
                      work.q_head_tokens_computed.get(layer, 0), work.kv_head_tokens_computed.get(layer, 0),
                      pv_head_pairs=work.pv_head_pairs_computed.get(layer, 0), layer=layer)
        for key, value in part.items():
            flops[key] += value
    flops["lm_head"] = 2 * shape.hidden * shape.vocab * work.lm_head_tokens_computed
    flops["token_merge"] = sum(work.merge_flops.values())
    flops["total"] = sum(flops.values())
    return flops


def _kv_bytes_axis(work: WorkCounter, kv_bytes_kept: float) -> dict:
    """``kv_bytes_vs_fp16`` and ``kv_bytes_held_vs_fp16`` (module docstring); ``kv_bytes_axis`` says what
    was counted."""
    if not work.kv_read_bytes_dense:  # no forward read a cache after a prompt (or a dense RunContext)
        return {"kv_bytes_vs_fp16": kv_bytes_kept, "kv_bytes_held_vs_fp16": kv_bytes_kept,
                "kv_bytes_axis": "attention K/V reads at fp16 (no KV cache read after a prompt)"}
    return {
        "kv_bytes_vs_fp16": work.kv_read_bytes / work.kv_read_bytes_dense,
        "kv_bytes_held_vs_fp16": work.kv_held_bytes / max(1, work.kv_held_bytes_dense),
        "kv_bytes_axis": "KV cache read by each forward after the prompt, over a fp16 cache of every token",
    }

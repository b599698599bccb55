"""The search behind ``kv_bytes=F`` (issue 14 item 5): the composition of KV eviction (share kept,
allocation, score) and the packed quantized cache (K / V bits, group) with the lowest perplexity on a
validation text among those holding <= F of the fp16 K/V bytes of the context.

For each F and each (key bits, value bits, group) the eviction share is the largest one whose bytes fit
(whole key groups packed, the tail in fp16: ``eviction_share``). Stage 1 ranks the bit/group choices
with ``score=h2o,kv_alloc=head``; stage 2 tries the best of each F with ``kv_alloc=ada`` and
``score=observed``. Each chunk's context is prefilled once per scorer (per-KV-head state, nothing
evicted); every config evicts and packs a copy of that cache with the real stages and teacher-forces
the continuation on it (``lm --protocol continue``). Used by ``benchmarks/kv_bytes.py`` (the shipped
``kv_bytes_choices.json``) and ``dynaprune tune``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynaprune.prune.keys import keep_count
from dynaprune.runtime.pruning import make_context

# bit pairs (key, value) tried per F, pruned with kv-quant.json (VALID): below 3 bits quantization alone
# costs > +15%; 5 bits is within 0.1% of dense, so more bits only shrink the eviction share (at F = 0.25,
# 6 bits leaves 60% of the tokens); keys are the more sensitive, so K >= V
BIT_PAIRS = {0.25: ((3, 3), (4, 3), (4, 4), (5, 4)),
             0.125: ((3, 3), (4, 3), (4, 4)),
             0.0625: ((3, 3), (4, 3), (4, 4))}
GROUPS = (32, 64, 128)
MAX_VALUE_GROUP = 64  # values are grouped per token over channels: <= head_dim


def bit_pairs(fraction: float) -> tuple[tuple[int, int], ...]:
    """The (key, value) bits tried for a target: the table's nearest F at or above it."""
    above = [f for f in BIT_PAIRS if f >= fraction - 1e-9]
    return BIT_PAIRS[min(above)] if above else BIT_PAIRS[0.25]


def token_share(key_bits: int, value_bits: int, group: int, value_group: int) -> float:
    """Bytes of one packed token vs fp16: K codes + a fp16 scale and zero per channel per ``group`` tokens,
    V codes + a fp16 scale and zero per ``value_group`` channels."""
    return ((key_bits + 32 / group) + (value_bits + 32 / value_group)) / 32


def eviction_share(fraction: float, key_bits: int, value_bits: int, group: int, value_group: int,
                   context: int) -> float | None:
    """The largest share of ``context`` whose cache (whole groups packed, the rest fp16) fits ``fraction``;
    written with 4 decimals, rounded down, so ``keep_count`` gives back the token count. None: not even 1."""
    share = token_share(key_bits, value_bits, group, value_group)
    for n in range(context, 0, -1):
        packed = n // group * group
        if (packed * share + (n - packed)) / context <= fraction:
            kv = math.floor(n / context * 1e4) / 1e4
            return kv if keep_count(kv, context) == n else None
    return None


def recipe_of(c: dict) -> str:
    """The recipe string of a composition."""
    bits = f"kv_bits={c['key_bits']}" if c["key_bits"] == c["value_bits"] else \
        f"kv_key_bits={c['key_bits']},kv_value_bits={c['value_bits']}"
    value_group = f",kv_value_group={c['value_group']}" if c["value_group"] != c["group"] else ""
    kv = f"kv={c['kv']}," if c["kv"] < 1 else ""
    alloc = f",kv_alloc={c['alloc']}" if c["alloc"] != "layer" else ""
    return f"{kv}score={c['score']}{alloc},{bits},kv_group={c['group']}{value_group}" if kv else \
        f"{bits},kv_group={c['group']}{value_group}"


def stage1(fraction: float, context: int, head_dim: int) -> list[dict]:
    out = []
    for (kb, vb) in bit_pairs(fraction):
        for group in GROUPS:
            value_group = min(group, MAX_VALUE_GROUP, head_dim)
            kv = eviction_share(fraction, kb, vb, group, value_group, context)
            if kv is None or kv < 0.05:
                continue
            out.append({"kv": min(kv, 1.0), "key_bits": kb, "value_bits": vb, "group": group,
                        "value_group": value_group, "alloc": "head", "score": "h2o"})
    return out


def prefill_chunks(model, ids: torch.Tensor, context: int, continuation: int, chunks: int,
                   scorer: str) -> list[tuple]:
    """(cache after the prompt, scorer state, logits predicting the first continuation token, continuation)."""
    size = context + continuation
    out = []
    with torch.inference_mode():
        for i in range(0, min(len(ids) - size + 1, chunks * size), size):
            piece = ids[i:i + size]
            cache = model.new_cache(1, size)
            ctx = make_context(f"kv_tokens={context},score={scorer},kv_alloc=head", model)
            ctx.reconstruction = (model, piece[None, :context])  # read only by a scorer that reconstructs
            last = model(piece[None, :context], cache=cache, ctx=ctx, last_only=True)[0]
            out.append((cache, _kv_stage(ctx).scores, last, piece[context:]))
    return out


def _kv_stage(ctx):
    return next(s for s in ctx.stages if s.name == "kv")


def evaluate(model, prefilled: list[tuple], recipe: str) -> dict:
    """Perplexity of the continuation and K/V bytes vs fp16 after the prompt's eviction and packing."""
    nll, tokens, held, dense = 0.0, 0, 0, 0
    with torch.inference_mode():
        for cache, state, last, cont in prefilled:
            ctx, c = make_context(recipe, model), copy.deepcopy(cache)
            kv = next((s for s in getattr(ctx, "stages", ()) if s.name == "kv"), None)
            if kv is not None:
                kv.scores = copy.deepcopy(state)
            ctx.begin_forward(c)
            ctx.end_forward(c)  # the prompt's end of forward: eviction, then packing
            held += c.bytes_held(fp_bytes=2)
            dense += c.dense_fp16_bytes()
            rest = model(cont[None, :-1], cache=c)[0]  # reads the evicted, packed cache
            nll += float(F.cross_entropy(torch.cat([last, rest]).float(), cont, reduction="sum"))
            tokens += len(cont)
    return {"perplexity": math.exp(nll / tokens), "kv_bytes_vs_fp16": held / dense}


def search(model, text: str | Path, fractions: list[float], *, chunks: int = 2, context: int = 1536,
           continuation: int = 512, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The best composition per F on ``text`` (see the module docstring), with every config tried."""
    from dynaprune.eval.lm import read_tokens
    from dynaprune.runtime.cost import cost_shape

    head_dim = cost_shape(model).head_dim
    ids = torch.tensor(read_tokens(model, text, None))
    prefilled: dict[str, list] = {}

    def run(c: dict) -> dict:
        if c["score"] not in prefilled:
            prefilled[c["score"]] = prefill_chunks(model, ids, context, continuation, chunks, c["score"])
        row = {**c, "recipe": recipe_of(c), **evaluate(model, prefilled[c["score"]], recipe_of(c))}
        progress(f"{row['recipe']}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f}")
        return row

    out: dict[str, Any] = {"context": context, "continuation": continuation, "chunks": chunks, "choices": [],
                           "tried": {}}
    prefilled["h2o"] = prefill_chunks(model, ids, context, continuation, chunks, "h2o")
    out["dense_perplexity"] = round(evaluate(model, prefilled["h2o"], "")["perplexity"], 4)
    progress(f"dense: {out['dense_perplexity']}")
    for fraction in fractions:
        rows = [run(c) for c in stage1(fraction, context, head_dim)]
        fits = [r for r in rows if r["kv_bytes_vs_fp16"] <= fraction + 1e-9]
        for b in sorted(fits, key=lambda r: r["perplexity"])[:1]:
            if b["kv"] < 1:
                for alloc, score in (("ada", "h2o"), ("head", "observed"), ("ada", "observed")):
                    rows.append(run({**{k: b[k] for k in ("kv", "key_bits", "value_bits", "group", "value_group")},
                                     "alloc": alloc, "score": score}))
        for r in rows:  # every row tried is recorded; only those within F can win
            r["fits"] = r["kv_bytes_vs_fp16"] <= fraction + 1e-9
        winner = min((r for r in rows if r["fits"]), key=lambda r: r["perplexity"])
        out["tried"][str(fraction)] = rows
        out["choices"].append({"kv_bytes": fraction, "recipe": winner["recipe"],
                               "valid_perplexity": round(winner["perplexity"], 4),
                               "measured_kv_bytes_vs_fp16": round(winner["kv_bytes_vs_fp16"], 5)})
    return out

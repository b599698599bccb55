"""The search behind ``kv_bytes=F`` (issue 14 item 5): the composition of KV eviction (share kept,
allocation, score) and the packed quantized cache (K / V bits, groups, scale width, rotation) with the
lowest perplexity on a validation text among those holding <= F of the fp16 K/V bytes of the context.

For each F and each quantizer the eviction share is the largest one whose bytes fit, measured on a real
packed cache (whole key groups packed, the tail in fp16: ``eviction_share``); an allocation that pads
heads to the layer's widest (``ada``, ``global``: padding inside the packed prefix is stored) is refitted
from its measured bytes (``REFITS``). Stage 1 ranks bits x key group under ``EVICTION`` (the best
eviction on VALID alone); stage 2 tries the best ``STAGE2_TOP`` with 8-bit scales, Hadamard rotation and
groups of 32; stage 3 the best with the other evictions (``ALTERNATIVES``). Each chunk's context is
prefilled once per scorer (per-KV-head state, nothing evicted; ``score=kvzip``'s reconstruction included);
every config evicts and packs a copy of that cache with the real stages and teacher-forces the
continuation on it (``lm --protocol continue``). Used by ``benchmarks/kv_bytes.py`` (the shipped
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

from dynaprune.prune.groupquant import KVQuantSpec
from dynaprune.prune.keys import keep_count
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.reconstruction import Reconstruction

# (key, value) bits: 2..8, keys the more sensitive so K >= V; groups of tokens per key channel
BIT_PAIRS = ((2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 4), (6, 4), (8, 8))
GROUPS = (128,)  # stage 1; 64 in stage 2
MAX_VALUE_GROUP = 64  # values are grouped per token over channels: <= head_dim
# (score, kv_alloc) of stage 1: KVzip with one ranking over all layers (the best eviction alone on VALID,
# kv-evict.json), each layer's heads keeping one count: kv_alloc=global pads heads to the layer's widest
# and a packed cache stores that padding (0.26 of the fp16 bytes for 0.25 at 4 bits, twice F at 0.0625)
EVICTION = ("kvzip", "global_layer")
RECENT = 32  # the recent window of stage 1's eviction (kvzip,global: 13.230 with it, 13.267 without, VALID 25%)
ALTERNATIVES: tuple[tuple[str, str], ...] = ()  # none on this loaded machine; e.g. (("h2o", "head"),)
STAGE2_TOP = 2
STAGE2 = ({"scale_bits": 8}, {"rotate": "kv"}, {"group": 64})
REFITS = 1  # re-evaluations of a padded allocation whose measured bytes overshoot F
PADDED = ("ada", "global")


def spec_of(c: dict) -> KVQuantSpec:
    return KVQuantSpec(c["key_bits"], c["value_bits"], c["group"], c["value_group"], c.get("scale_bits", 16),
                       c.get("rotate", ""))


def packed_bytes(spec: KVQuantSpec, n: int, head_dim: int) -> int:
    """fp16-axis bytes of one KV head holding ``n`` tokens, whole key groups packed (a real packed cache)."""
    from dynaprune.runtime.kvcache import KVCache

    cache = KVCache(1, 1, 1, head_dim, max(n, 1))
    cache.update(0, torch.randn(1, 1, n, head_dim, generator=torch.Generator().manual_seed(0)),
                 torch.randn(1, 1, n, head_dim, generator=torch.Generator().manual_seed(1)))
    packed = n // spec.key_group * spec.key_group
    if packed:
        cache.pack_prefix(0, packed, spec)
    return cache.bytes_held(fp_bytes=2)


def eviction_share(fraction: float, spec: KVQuantSpec, context: int, head_dim: int,
                   aligned: bool = False) -> float | None:
    """The largest share of ``context`` whose cache fits ``fraction`` of the fp16 bytes; written with 4
    decimals, rounded down, so ``keep_count`` gives back the token count. None: not even 1 token.
    ``aligned``: every kept token is packed (``kv_alloc=global_layer`` keeps whole key groups per layer,
    its total rounded down to them): the bytes of a whole-group cache per token."""
    dense = 2 * context * head_dim * 2
    if aligned:
        whole = max(1, context // spec.key_group) * spec.key_group
        n = min(context, int(fraction * dense * whole / packed_bytes(spec, whole, head_dim)))
        return _share(n, context)
    low, high = 0, context  # bytes grow with n: the largest n that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        if packed_bytes(spec, mid, head_dim) <= fraction * dense:
            low = mid
        else:
            high = mid - 1
    return _share(low, context)


def _share(n: int, context: int) -> float | None:
    """The 4-decimal share of ``context`` that ``keep_count`` turns back into ``n`` tokens (or fewer)."""
    for m in range(n, 0, -1):
        kv = math.floor(m / context * 1e4) / 1e4
        if kv > 0 and keep_count(kv, context) == m:
            return kv
    return None


def recipe_of(c: dict) -> str:
    """The recipe string of a composition."""
    bits = f"kv_bits={c['key_bits']}" if c["key_bits"] == c["value_bits"] else \
        f"kv_key_bits={c['key_bits']},kv_value_bits={c['value_bits']}"
    value_group = f",kv_value_group={c['value_group']}" if c["value_group"] != c["group"] else ""
    extra = (f",kv_scale_bits={c['scale_bits']}" if c.get("scale_bits", 16) != 16 else "") + \
        (f",kv_rotate={c['rotate']}" if c.get("rotate") else "")
    quant = f"{bits},kv_group={c['group']}{value_group}{extra}"
    if c["kv"] >= 1:
        return quant
    alloc = f",kv_alloc={c['alloc']}" if c["alloc"] != "layer" else ""
    recent = f",recent={c['recent']}" if c.get("recent") is not None else ""
    return f"kv={c['kv']},score={c['score']}{alloc}{recent},{quant}"


def composition(fraction: float, context: int, head_dim: int, base: dict, **change: Any) -> dict | None:
    """``base`` with ``change`` and the largest eviction share that fits (None: nothing fits)."""
    c = {**base, **change}
    c["value_group"] = min(c["group"], MAX_VALUE_GROUP, head_dim)
    kv = eviction_share(fraction, spec_of(c), context, head_dim, aligned=c["alloc"] == "global_layer")
    return None if kv is None or kv < 0.02 else {**c, "kv": min(kv, 1.0)}


def described() -> str:
    return (f"per F, the largest eviction share that fits (measured bytes; padded allocations refitted): stage 1 "
            f"bits (K, V) in {list(BIT_PAIRS)} x key group {list(GROUPS)} under score={EVICTION[0]},"
            f"kv_alloc={EVICTION[1]},recent={RECENT}; stage 2 the best {STAGE2_TOP} with {list(STAGE2)}; "
            f"stage 3 the best with {[f'score={s},kv_alloc={a}' for s, a in ALTERNATIVES]}")


def stage1(fraction: float, context: int, head_dim: int) -> list[dict]:
    score, alloc = EVICTION
    base = {"scale_bits": 16, "rotate": "", "alloc": alloc, "score": score, "recent": RECENT}
    out = []
    for kb, vb in BIT_PAIRS:
        for group in GROUPS:
            c = composition(fraction, context, head_dim, base, key_bits=kb, value_bits=vb, group=group)
            if c is not None:
                out.append(c)
    return out


def prefill_chunks(model, ids: torch.Tensor, context: int, continuation: int, chunks: int,
                   scorer: str, store: Path | None = None) -> list[tuple]:
    """(cache after the prompt, scorer state, logits predicting the first continuation token, continuation).
    ``store``: a file holding them (read when it exists, written otherwise; keyed by the caller)."""
    if store is not None and store.is_file():
        return torch.load(store, weights_only=False)
    out = _prefill_chunks(model, ids, context, continuation, chunks, scorer)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, store.with_name(store.name + ".tmp"))
        store.with_name(store.name + ".tmp").replace(store)
    return out


def _prefill_chunks(model, ids: torch.Tensor, context: int, continuation: int, chunks: int,
                    scorer: str) -> list[tuple]:
    # a model trained with <bos> first (Gemma: ``requires_bos``) reads each chunk after it, as eval.lm's
    # continue protocol does: the prompt is then <bos> + ``context`` tokens
    bos = [model.tokenizer.bos_token_id] if getattr(model, "requires_bos", False) else []
    size = context + continuation
    prompt = context + len(bos)
    out = []
    with torch.inference_mode():
        for i in range(0, min(len(ids) - size + 1, chunks * size), size):
            piece = torch.cat([torch.tensor(bos, dtype=ids.dtype), ids[i:i + size]])
            cache = model.new_cache(1, size + len(bos))
            ctx = make_context(f"kv_tokens={prompt},score={scorer},kv_alloc=head", model)
            ctx.reconstruction = Reconstruction(model, piece[None, :prompt])  # read only by a scorer that reconstructs
            last = model(piece[None, :prompt], cache=cache, ctx=ctx, last_only=True)[0]
            out.append((cache, _kv_stage(ctx).scores, last, piece[prompt:]))
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
           continuation: int = 512, progress: Callable[[str], None] = lambda m: None,
           store: Path | None = None) -> dict[str, Any]:
    """The best composition per F on ``text`` (see the module docstring), with every config tried."""
    from dynaprune.eval.lm import read_tokens
    from dynaprune.runtime.cost import cost_shape

    head_dim = cost_shape(model).head_dim
    ids = torch.tensor(read_tokens(model, text, None))
    prefilled: dict[str, list] = {}

    def stored(score: str) -> Path | None:
        return None if store is None else store / f"{Path(text).stem}-{score}-{chunks}x{context}+{continuation}.pt"

    def measure(c: dict) -> dict:
        if c["score"] not in prefilled:
            prefilled[c["score"]] = prefill_chunks(model, ids, context, continuation, chunks, c["score"],
                                                   stored(c["score"]))
        row = {**c, "recipe": recipe_of(c), **evaluate(model, prefilled[c["score"]], recipe_of(c))}
        progress(f"{row['recipe']}: {row['perplexity']:.4f} at {row['kv_bytes_vs_fp16']:.4f}")
        return row

    def run(c: dict | None, fraction: float, rows: list[dict]) -> None:
        """Measure ``c``; a padded allocation over F is refitted from its measured bytes."""
        if c is None:
            return
        row = measure(c)
        rows.append(row)
        for _ in range(REFITS if c["alloc"] in PADDED and c["kv"] < 1 else 0):
            if row["kv_bytes_vs_fp16"] <= fraction + 1e-9:
                break
            kv = math.floor(row["kv"] * fraction / row["kv_bytes_vs_fp16"] * 0.995 * 1e4) / 1e4
            row = measure({**c, "kv": kv})
            rows.append(row)

    def best(rows: list[dict], fraction: float, n: int = 1) -> list[dict]:
        fits = sorted((r for r in rows if r["kv_bytes_vs_fp16"] <= fraction + 1e-9), key=lambda r: r["perplexity"])
        return fits[:n]

    out: dict[str, Any] = {"context": context, "continuation": continuation, "chunks": chunks, "choices": [],
                           "searched": described(), "tried": {}}
    first = EVICTION[0]
    prefilled[first] = prefill_chunks(model, ids, context, continuation, chunks, first, stored(first))
    out["dense_perplexity"] = round(evaluate(model, prefilled[first], "")["perplexity"], 4)
    progress(f"dense: {out['dense_perplexity']}")
    keep = ("key_bits", "value_bits", "group", "scale_bits", "rotate", "alloc", "score", "recent")
    for fraction in fractions:
        rows: list[dict] = []
        for c in stage1(fraction, context, head_dim):
            run(c, fraction, rows)
        for b in best(rows, fraction, STAGE2_TOP):
            for change in STAGE2:
                run(composition(fraction, context, head_dim, {k: b[k] for k in keep}, **change), fraction, rows)
        for b in best(rows, fraction):
            for score, alloc in ALTERNATIVES if b["kv"] < 1 else ():
                run(composition(fraction, context, head_dim, {k: b[k] for k in keep}, score=score, alloc=alloc,
                                recent=None), fraction, rows)
        for r in rows:  # every row tried is recorded; only those within F can win
            r["fits"] = r["kv_bytes_vs_fp16"] <= fraction + 1e-9
        winner = best(rows, fraction)[0]
        out["tried"][str(fraction)] = rows
        out["choices"].append({"kv_bytes": fraction, "recipe": winner["recipe"],
                               "valid_perplexity": round(winner["perplexity"], 4),
                               "measured_kv_bytes_vs_fp16": round(winner["kv_bytes_vs_fp16"], 5)})
    return out

"""Which recipe keys can act where: a key that would change nothing is refused before any model work.

A KV budget (``kv``, ``kv_tokens`` and what needs one: ``sink``, ``recent``, ``score=h2o|streaming``) evicts
entries of a decoder's KV cache *between* forwards. It changes nothing on an encoder (no KV cache, every
token attends to every token in one pass) or on a single prefill: ``dynaprune run``, ``lm --protocol
window`` (each window scored in one forward), ``calibrate`` (attention statistics of one forward each).
Accepting it there silently would label a dense run as pruned. Where it acts, a run records the budget
in tokens it held (:func:`kv_budget_summary`), whether the recipe gave a share (``kv``) or a count.
"""

from __future__ import annotations

from dynaprune.errors import DynapruneError
from dynaprune.prune.recipe import Recipe

ENCODER_TASKS = ("sts", "classify", "sst2")  # sentence embeddings: encoder models only
DECODING = {"lm": ("continue", "stream"), "generate": None}  # task -> protocols that decode (None: all)
KV_STORE_KEYS = ("kv_bits", "kv_key_bits", "kv_value_bits", "kv_group", "kv_value_group", "kv_residual")


def kv_budget_key(recipe: Recipe) -> str | None:
    """The key that sets the recipe's KV budget (``kv`` or ``kv_tokens``), None without one."""
    return "kv" if recipe.kv is not None else "kv_tokens" if recipe.kv_tokens is not None else None


def check_recipe_applies(recipe: Recipe, where: str, *, protocol: str | None = None) -> None:
    """Refuse keys that have no effect ``where``: a task name (``sts``, ``lm``, ...), ``run`` or
    ``calibrate``; ``protocol`` is the ``lm`` protocol."""
    key = kv_budget_key(recipe)
    why = "a KV-cache budget evicts between the forwards of a decoder; "
    if key is None:  # a quantized KV cache (kv_quant.py) packs between forwards too
        key = next((k for k in KV_STORE_KEYS if getattr(recipe, k) is not None), None)
        why = "a quantized KV cache packs the cached tokens between the forwards of a decoder; "
    if key is None:
        return
    if where in ENCODER_TASKS:
        raise DynapruneError(f"recipe key '{key}': {why}task {where} runs an encoder (no KV cache), "
                             "so it would have no effect")
    if where in DECODING:
        protocols = DECODING[where]
        if protocols is None or protocol in protocols:
            return
        raise DynapruneError(f"recipe key '{key}': {why}lm --protocol {protocol} scores each window in one forward, "
                             f"so it would have no effect; use --protocol {' or '.join(protocols)}")
    command = {"run": "dynaprune run", "calibrate": "dynaprune calibrate"}.get(where, where)
    raise DynapruneError(f"recipe key '{key}': {why}{command} runs a single prefill, so it would have no effect "
                         "(decode with `dynaprune eval ... generate` or `lm --protocol continue|stream`)")


def kv_budget_summary(contexts: list, extra: dict | None) -> dict:
    """``kv_budget_tokens`` of a run: the one budget every context held, or its range when prompts of
    different lengths gave different budgets (a share of each prompt); a budget already recorded wins."""
    if extra and extra.get("kv_budget_tokens") is not None:
        return {}
    budgets = sorted({c.kv_budget for c in contexts if getattr(c, "kv_budget", None) is not None})
    if not budgets:
        return {"kv_budget_tokens": None}
    if len(budgets) == 1:
        return {"kv_budget_tokens": budgets[0]}
    return {"kv_budget_tokens": {"min": budgets[0], "max": budgets[-1]}}

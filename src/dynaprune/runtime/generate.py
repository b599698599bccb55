"""The prefill + decode loop shared by the decoders (Llama family, GPT-2).

A model needs ``forward(ids, cache=, ctx=, attention_mask=, last_only=)``, ``new_cache(batch, max_len)``,
``.config.max_positions`` and ``.tokenizer``. Batches are left-padded, so every row's last prompt token
sits in the last column and decode steps append in lock-step; padded cache slots stay masked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.reconstruction import Reconstruction

# chat "end of turn" tokens of common templates, stop tokens by default when the vocabulary has them
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class GenerationResult:
    prompt_ids: list[int] | list[list[int]]
    new_ids: list[int] | list[list[int]]  # includes the stop token when one ended the row
    text: str | list[str]  # the new tokens decoded, special tokens skipped
    stop_reason: str | list[str]  # "stop_token" or "max_new_tokens"
    seconds: float
    prefill_seconds: float
    decode_tokens_per_s: float  # tokens of all active rows per second of decode steps (after the first)
    # what the call cost (runtime/run_cost.py): flops_kept, kv_bytes_kept, kv_bytes_vs_fp16, kv_budget_tokens,
    # bits_fetched_vs_fp16 where counted, the pruning summary under "pruning"
    cost: dict = field(default_factory=dict)


def default_stop_tokens(tokenizer: Any) -> set[int]:
    if tokenizer is None:
        return set()
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    stops.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    return stops


def encode_prompts(model: Any, prompt: Any, chat: bool) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt and whether the input was a batch."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        prompts, batched = [prompt], False
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, batched = list(prompt), True
    elif isinstance(prompt, list) and prompt and (
        all(isinstance(p, int) for p in prompt) or all(isinstance(p, list) and p for p in prompt)
    ):
        if chat:
            raise DynapruneError("chat=True needs text prompts, not token ids")
        batched = isinstance(prompt[0], list)
        return ([list(p) for p in prompt] if batched else [list(prompt)]), batched
    else:
        raise DynapruneError(
            "prompt must be a non-empty str, list of str, list of token ids, or list of lists of token ids"
        )
    if tok is None:
        raise DynapruneError(f"model {getattr(model, 'name', '?')} has no tokenizer; pass token ids")
    out = []
    for p in prompts:
        if chat:
            if not getattr(tok, "chat_template", None):
                raise DynapruneError(f"the tokenizer of {getattr(model, 'name', '?')} has no chat template")
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids  # the template already has them
        else:
            ids = tok(p).input_ids
        if not ids:
            raise DynapruneError("empty prompt")
        out.append(ids)
    return out, batched


def kv_budget(ctx: RunContext | None, context_len: int) -> int | None:
    """The KV budget in tokens a context will hold the cache to after a prompt of ``context_len`` tokens:
    the budget already set on the context (``ctx.kv_budget``), else the recipe's ``kv`` for that prompt;
    None when the context has no budget (dense, or a recipe without ``kv``)."""
    recipe = getattr(ctx, "recipe", None)
    if recipe is None or not getattr(recipe, "has_kv_budget", False):
        return None
    preset = getattr(ctx, "kv_budget", None)
    return int(preset) if preset is not None else recipe.kv_budget_tokens(context_len)


def cache_capacity(total: int, first: int, step: int, budget: int | None) -> int:
    """Slots a KV cache needs for ``total`` tokens fed as a first forward of ``first`` tokens then
    forwards of at most ``step`` tokens, when every forward ends with eviction to ``budget`` tokens
    (None: nothing is evicted, so every token needs a slot). Bounded by the budget, not by ``total``:
    the cache stores each token's original position beside it, so slots are reused after compaction."""
    if budget is None:
        return total
    return min(total, max(first, budget + step))


def revive_after_first_token(model: Any, cache: Any, ctx: RunContext | None) -> int:
    """LazyLLM's revival (``prefill_revive``, ``runtime/revival.py``) once the first token's logits exist:
    the aux cache's pruned tokens run through the later layers into ``cache`` and their work joins
    ``ctx``'s counter (deferred work: after the time to first token, inside the run's FLOPs). Returns
    the tokens revived (0: nothing pending)."""
    from dynaprune.runtime.revival import pending_revival, revive

    stage = pending_revival(ctx) if ctx is not None else None
    if stage is None:
        return 0
    run = revive(model, cache, ctx)
    if run is None:
        return 0
    from dynaprune.runtime.cost import cost_shape

    shape, work = cost_shape(model), run.work
    for layer, n in work.tokens.items():  # a plain context leaves the projected heads at their defaults, which
        work.q_head_tokens.setdefault(layer, n * shape.heads_of(layer))  # a merge into a counting one would
        work.kv_head_tokens.setdefault(layer, n * shape.kv_heads_of(layer))  # drop
    ctx.work.merge(work)
    return stage.tokens_revived


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from (B, V) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # tokens entirely beyond the nucleus
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate(
    model: Any,
    prompt: str | list[int] | list[str] | list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: list[int] | set[int] | None = None,
    chat: bool = False,
    ctx: RunContext | None = None,
    recipe: Any = None,
) -> GenerationResult:
    """Generate from one prompt (str or token ids) or a batch (list of str / of id lists, left-padded).

    Greedy at ``temperature`` 0, else sampling (nucleus when ``top_p`` < 1) from a generator seeded
    with ``seed``. ``stop_tokens`` default to the tokenizer's EOS and chat end-of-turn tokens;
    ``chat`` applies the tokenizer's chat template (one user turn, generation prompt added).
    ``recipe`` (a Recipe or its string, e.g. ``"kv=0.25,score=h2o"``) runs the call under one fresh
    pruning context, checked against the model before any model work; ``ctx`` gives a context yourself
    (not both). The result's ``cost`` says what the call kept (see ``GenerationResult.cost``).
    Under a KV budget (``kv=`` recipe) the cache is allocated for the budget plus one
    token, not for the whole generation: its memory is bounded for any ``max_new_tokens``.
    """
    if recipe is not None and ctx is not None:
        raise DynapruneError("give recipe= or ctx=, not both (a recipe makes its own context)")
    from dynaprune.runtime.pruning import make_context

    ctx = make_context(recipe, model) if ctx is None else ctx  # dense: a plain counting RunContext
    if max_new_tokens < 1:
        raise DynapruneError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise DynapruneError(f"temperature must be >= 0 (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        raise DynapruneError(f"top_p must be in (0, 1] (got {top_p})")
    prompts, batched = encode_prompts(model, prompt, chat)
    longest = max(len(p) for p in prompts)
    limit = model.config.max_positions
    if longest + max_new_tokens > limit:
        raise DynapruneError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's {limit} positions"
        )
    stops = set(default_stop_tokens(model.tokenizer) if stop_tokens is None else stop_tokens)
    device = next(model.parameters()).device
    b = len(prompts)
    pad = 0  # any id: padded slots are masked
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    new: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    reasons = ["max_new_tokens"] * b
    steps = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        # under a KV budget the cache never holds more than budget + the one token a step adds
        capacity = cache_capacity(longest + max_new_tokens, longest, 1, kv_budget(ctx, longest))
        cache = model.new_cache(b, capacity)
        if hasattr(ctx, "reconstruction"):  # a KV scorer that re-reads the prompt (score=kvzip)
            ctx.reconstruction = Reconstruction(model, ids)
        logits = model(ids, cache=cache, ctx=ctx, attention_mask=mask, last_only=True)
        t1 = time.perf_counter()
        revive_after_first_token(model, cache, ctx)  # prefill_revive: deferred work, in the decode time
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1].float(), temperature, top_p, gen)
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                new[r].append(t)
                if t in stops:
                    done[r], reasons[r] = True, "stop_token"
            if all(done) or i == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=cache, ctx=ctx)  # finished rows keep stepping (ignored)
            steps += 1
        t2 = time.perf_counter()
    tok = model.tokenizer
    texts = [tok.decode(n, skip_special_tokens=True) if tok is not None else "" for n in new]
    from dynaprune.runtime.run_cost import call_cost

    return GenerationResult(
        prompt_ids=prompts if batched else prompts[0],
        new_ids=new if batched else new[0],
        text=texts if batched else texts[0],
        stop_reason=reasons if batched else reasons[0],
        seconds=t2 - t0,
        prefill_seconds=t1 - t0,
        decode_tokens_per_s=(steps * b / (t2 - t1)) if steps and t2 > t1 else 0.0,
        cost=call_cost(model, [ctx]),
    )

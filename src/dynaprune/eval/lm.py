"""Language-modelling task: perplexity of a decoder on a text file.

Three protocols:
- ``window``: the text's tokens (no special tokens) cut into non-overlapping windows of ``window``
  tokens, each scored independently (loss on every position but the first of each window).
- ``continue``: chunks of ``context + continuation`` tokens; the context is prefilled into a KV cache
  (where pruning of the prompt acts), then the continuation is teacher-forced on that cache at its
  original positions, and perplexity is measured over the continuation only. ``stepwise=True`` feeds
  the continuation one token at a time, as generation does (slower; same numbers when dense).
- ``stream``: token-by-token decoding over streams of ``stream_tokens`` tokens, as H2O and
  StreamingLLM evaluate: a first forward of ``prefill`` tokens (default 1), then one forward per
  token, each followed by the context's KV eviction; perplexity over every predicted token (all but
  the first of each stream). ``batch_size`` streams are decoded side by side (one context per batch,
  eviction per row): decoding one token is memory-bound on the weights, so a batch of B streams costs
  little more per step than one. The KV budget holds throughout: ``kv=F`` with F < 1 is a fraction of the
  stream length (``keep_count(F, stream_tokens)``), ``kv_tokens=N`` is N tokens. The cache is allocated for
  budget + 1 tokens (the whole stream without a budget), so memory is bounded for any stream length.
  Dense, it equals ``window`` with ``window=stream_tokens`` over the same tokens.

Token pruning under ``window`` (``token=K``): a pruned token's hidden state never reaches the last layer,
so it has no logits. Only the positions that survive are scored (each predicts the token after it, at
its original position); the metric records ``scored_tokens`` against ``target_tokens`` (every position
a dense window scores), so a pruned perplexity is never mistaken for one over the whole text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError
from dynaprune.eval.result import TaskResult
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.generate import cache_capacity, kv_budget, revive_after_first_token
from dynaprune.runtime.reconstruction import Reconstruction

PROTOCOLS = ("window", "continue", "stream")


def read_tokens(model: Any, text_path: str | Path, max_tokens: int | None) -> list[int]:
    path = Path(text_path)
    if not path.is_file():
        raise DynapruneError(f"{path}: no such text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DynapruneError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DynapruneError(f"{path}: the text file is empty")
    if model.tokenizer is None:
        raise DynapruneError(f"model {model.name} has no tokenizer")
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    return ids[:max_tokens] if max_tokens is not None else ids


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` (L,) under ``logits`` (L, V)."""
    return float(F.cross_entropy(logits.float(), targets, reduction="sum"))


def _surviving_positions(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Make ``ctx`` remember the original positions (and mask) of the tokens alive after each layer;
    returns the dict it fills. The models carry ``positions`` through ``between_layers``, gathered as
    tokens are pruned, so after the last layer it names the rows of the logits."""
    seen: dict[str, torch.Tensor] = {}
    inner = ctx.between_layers

    def between_layers(layer: int, hidden: torch.Tensor, keep: dict[str, torch.Tensor]):
        hidden, keep = inner(layer, hidden, keep)
        seen.update(positions=keep["positions"], mask=keep.get("mask"))
        return hidden, keep

    ctx.between_layers = between_layers  # on this instance only (a fresh context per window)
    return seen


def _window_nll(model: Any, piece: torch.Tensor, ctx: RunContext | None) -> tuple[float, int]:
    """Summed NLL and number of targets scored in one window: every position but the last predicts
    the next token; under token pruning only the positions alive at the last layer do."""
    if ctx is None:
        logits = model(piece[None])[0]
        return _nll(logits[:-1], piece[1:]), len(piece) - 1
    seen = _surviving_positions(ctx)
    logits = model(piece[None], ctx=ctx)[0]
    positions = seen["positions"][0]
    scored = positions < len(piece) - 1  # the last position has no next token inside the window
    if seen["mask"] is not None:
        scored &= seen["mask"][0]
    return _nll(logits[scored], piece[positions[scored] + 1]), int(scored.sum())


def _stream_nll(
    model: Any, streams: torch.Tensor, ctx: RunContext | None, prefill: int
) -> tuple[float, int | None, int]:
    """Summed NLL of ``streams[:, 1:]`` (B, N) decoding the streams token by token, side by side,
    under ``ctx`` (its KV eviction acting after every forward), with the budget fixed from the stream
    length; returns (nll, budget in tokens or None, cache capacity in tokens)."""
    b, n = streams.shape
    budget = kv_budget(ctx, n)
    if budget is not None:
        ctx.kv_budget = budget  # of the whole stream, not of the first forward
    capacity = cache_capacity(n, prefill, 1, budget)
    cache = model.new_cache(b, capacity)
    if hasattr(ctx, "reconstruction"):  # a KV scorer that re-reads the prompt (score=kvzip)
        ctx.reconstruction = Reconstruction(model, streams[:, :prefill])
    logits = model(streams[:, :prefill], cache=cache, ctx=ctx)  # (B, prefill, V)
    total = _nll(logits[:, :-1].reshape(-1, logits.shape[-1]), streams[:, 1:prefill].reshape(-1))
    last = logits[:, -1]
    for i in range(prefill, n):  # one forward per token: the stream itself
        total += _nll(last, streams[:, i])
        if i < n - 1:
            last = model(streams[:, i:i + 1], cache=cache, ctx=ctx)[:, -1]
    return total, budget, capacity


def evaluate_lm(
    model: Any,
    text_path: str | Path,
    *,
    protocol: str = "window",
    window: int = 1024,
    max_tokens: int | None = None,
    context: int = 1536,
    continuation: int = 512,
    max_examples: int | None = None,
    ctx_factory: Callable[[], RunContext] | None = None,
    progress: Callable[[int, int], None] | None = None,
    stepwise: bool = False,
    stream_tokens: int = 4096,
    prefill: int = 1,
    batch_size: int = 8,
) -> TaskResult:
    """Perplexity of ``model`` on the text at ``text_path``; ``ctx_factory`` makes one fresh RunContext
    per window/chunk/stream (None: dense); ``progress(done, total)`` is called after each one
    (see the module docstring for the protocols)."""
    if protocol not in PROTOCOLS:
        raise DynapruneError(f"unknown lm protocol {protocol!r} ({', '.join(PROTOCOLS)})")
    if max_tokens is not None and max_tokens <= 0:
        raise DynapruneError(f"max_tokens must be > 0 (got {max_tokens})")
    if max_examples is not None and max_examples <= 0:
        raise DynapruneError(f"max_examples must be > 0 (got {max_examples})")
    limit = model.config.max_positions
    if protocol == "window":
        if window < 2:
            raise DynapruneError(f"window must be >= 2 tokens (got {window})")
        if window > limit:
            raise DynapruneError(f"window of {window} tokens exceeds the model's {limit} positions")
    elif protocol == "stream":
        if stream_tokens < 2:
            raise DynapruneError(f"stream_tokens must be >= 2 (got {stream_tokens})")
        if stream_tokens > limit:
            raise DynapruneError(f"a stream of {stream_tokens} tokens exceeds the model's {limit} positions")
        if not 1 <= prefill <= stream_tokens:
            raise DynapruneError(f"prefill must be in [1, stream_tokens={stream_tokens}] (got {prefill})")
        if batch_size < 1:
            raise DynapruneError(f"batch_size must be >= 1 (got {batch_size})")
    else:
        if context < 1 or continuation < 1:
            raise DynapruneError(f"context and continuation must be >= 1 (got {context}, {continuation})")
        if context + continuation > limit:
            raise DynapruneError(
                f"context + continuation = {context + continuation} tokens exceeds the model's {limit} positions"
            )
    ids = read_tokens(model, text_path, max_tokens)
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    new_ctx = ctx_factory or (lambda: None)

    if protocol == "window":
        pieces = [tokens[i:i + window] for i in range(0, len(tokens), window)]
        pieces = [p for p in pieces if len(p) >= 2]  # a last window of 1 token predicts nothing
    elif protocol == "stream":
        pieces = [tokens[i:i + stream_tokens] for i in range(0, len(tokens) - stream_tokens + 1, stream_tokens)]
    else:
        size = context + continuation
        pieces = [tokens[i:i + size] for i in range(0, len(tokens) - size + 1, size)]
    if max_examples is not None:
        pieces = pieces[:max_examples]
    # a model trained with <bos> first (Gemma: ``requires_bos``) reads every example after it; it is only read
    bos = 1 if getattr(model, "requires_bos", False) else 0
    if bos:
        head = tokens.new_tensor([model.tokenizer.bos_token_id])
        pieces = [torch.cat([head, p]) for p in pieces]
    if not pieces:
        need = {"window": 2, "stream": stream_tokens}.get(protocol, context + continuation)
        raise DynapruneError(f"{text_path}: {len(ids)} tokens, fewer than the {need} one example needs")

    nll, count, targets, revived = 0.0, 0, 0, 0
    budget = capacity = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        if protocol == "stream":  # batches of streams side by side, one context per batch
            for start in range(0, len(pieces), batch_size):
                batch = torch.stack(pieces[start:start + batch_size])
                batch_nll, budget, capacity = _stream_nll(model, batch, new_ctx(), prefill)
                nll += batch_nll
                count += batch.numel() - len(batch)
                if progress is not None:
                    progress(start + len(batch), len(pieces))
        else:
            for done, piece in enumerate(pieces, 1):
                ctx = new_ctx()
                if protocol == "window":
                    window_nll, scored = _window_nll(model, piece, ctx)
                    nll += window_nll
                    count += scored
                    targets += len(piece) - 1
                else:
                    prompt, cont = piece[:context + bos], piece[context + bos:]
                    cache = model.new_cache(1, len(piece))
                    if hasattr(ctx, "reconstruction"):  # a KV scorer that re-reads the prompt (score=kvzip)
                        ctx.reconstruction = Reconstruction(model, prompt[None])
                    last = model(prompt[None], cache=cache, ctx=ctx, last_only=True)[0]  # predicts cont[0]
                    revived += revive_after_first_token(model, cache, ctx)
                    if stepwise:
                        rest = [model(cont[None, i:i + 1], cache=cache, ctx=ctx)[0] for i in range(len(cont) - 1)]
                    else:  # teacher forcing: all continuation tokens in one pass over the cache
                        rest = [model(cont[None, :-1], cache=cache, ctx=ctx)[0]] if len(cont) > 1 else []
                    logits = torch.cat([last, *rest])
                    nll += _nll(logits, cont)
                    count += len(cont)
                if progress is not None:
                    progress(done, len(pieces))
    seconds = time.perf_counter() - t0
    if count == 0:
        raise DynapruneError("no position survived token pruning to be scored; keep more tokens")
    mean = nll / count
    metric: dict[str, Any] = {"name": "perplexity", "value": math.exp(mean), "nll": mean, "tokens": count}
    extra: dict[str, Any] = {"protocol": protocol, "tokens_read": len(ids)}
    if protocol == "window":
        extra["window"] = window
        # tokens = scored_tokens: the targets scored; fewer than target_tokens when tokens were pruned
        metric.update(scored_tokens=count, target_tokens=targets)
        if count < targets:
            extra["scored_on"] = "positions whose hidden state survives token pruning to the last layer"
    elif protocol == "stream":
        steps = -(-len(pieces) // batch_size) * (stream_tokens - prefill)  # forwards, all batches
        extra.update(stream_tokens=stream_tokens, prefill=prefill, batch_size=batch_size, kv_budget_tokens=budget,
                     cache_capacity=capacity, seconds_per_token=seconds / (len(pieces) * stream_tokens),
                     seconds_per_step=seconds / max(1, steps))
    else:
        extra.update(context=context, continuation=continuation, stepwise=stepwise)
        if revived:  # prefill_revive: deferred work after the first token, counted in the run's FLOPs
            extra["tokens_revived"] = revived
    return TaskResult(
        model=getattr(model, "name", type(model).__name__),
        task="lm",
        data=str(text_path),
        n=len(pieces),
        metric=metric,
        cost={},
        seconds=seconds,
        extra=extra,
    )

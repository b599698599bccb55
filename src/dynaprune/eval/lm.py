"""Language-modelling task: perplexity of a decoder on a text file.

Two protocols:
- ``window``: the text's tokens (no special tokens) cut into non-overlapping windows of ``window``
  tokens, each scored independently (loss on every position but the first of each window).
- ``continue``: chunks of ``context + continuation`` tokens; the context is prefilled into a KV cache
  (where pruning of the prompt acts), then the continuation is teacher-forced on that cache at its
  original positions, and perplexity is measured over the continuation only. ``stepwise=True`` feeds
  the continuation one token at a time, as generation does (slower; same numbers when dense).
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
) -> TaskResult:
    """Perplexity of ``model`` on the text at ``text_path``; ``ctx_factory`` makes one fresh RunContext
    per window/chunk (None: dense); ``progress(done, total)`` is called after each one."""
    if protocol not in ("window", "continue"):
        raise DynapruneError(f"unknown lm protocol {protocol!r} (window or continue)")
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
    else:
        size = context + continuation
        pieces = [tokens[i:i + size] for i in range(0, len(tokens) - size + 1, size)]
    if max_examples is not None:
        pieces = pieces[:max_examples]
    if not pieces:
        need = 2 if protocol == "window" else context + continuation
        raise DynapruneError(f"{text_path}: {len(ids)} tokens, fewer than the {need} one example needs")

    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for done, piece in enumerate(pieces, 1):
            ctx = new_ctx()
            if protocol == "window":
                logits = model(piece[None], ctx=ctx)[0]
                nll += _nll(logits[:-1], piece[1:])
                count += len(piece) - 1
            else:
                prompt, cont = piece[:context], piece[context:]
                cache = model.new_cache(1, len(piece))
                last = model(prompt[None], cache=cache, ctx=ctx, last_only=True)[0]  # predicts cont[0]
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
    mean = nll / count
    extra: dict[str, Any] = {"protocol": protocol, "tokens_read": len(ids)}
    if protocol == "window":
        extra["window"] = window
    else:
        extra.update(context=context, continuation=continuation, stepwise=stepwise)
    return TaskResult(
        model=getattr(model, "name", type(model).__name__),
        task="lm",
        data=str(text_path),
        n=len(pieces),
        metric={"name": "perplexity", "value": math.exp(mean), "nll": mean, "tokens": count},
        cost={},
        seconds=seconds,
        extra=extra,
    )

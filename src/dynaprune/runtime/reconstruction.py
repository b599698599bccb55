"""KVzip's context-reconstruction pass (Kim et al. 2025, Sec. 3.2), the model-running half of
``score=kvzip`` (``prune/scorers/kvzip.py`` holds the score and its FLOPs): after the prompt's prefill the
model runs once more on ``PROMPT`` + ``SUFFIX`` + the context, attending to a scratch copy of the cached
context K/V, and each layer records the reconstruction queries' max attention to the context keys.

A context whose repeat would run past the model's last position is reconstructed in chunks
(:func:`reconstruction_chunks`). A caller that runs a prompt under a reconstructing scorer hands the pass
over before the forward:
``ctx.reconstruction = Reconstruction(model, prompt_ids)``; the KV stage calls it on the prompt's cache.

Sliding-window layers (Gemma 3, ``cache.windows``): such a layer's cache holds only the context's last
``window - 1`` tokens after the prompt (the model evicted the rest); the pass copies each layer as it is
and its queries attend within the window by position (the repeat follows the context's positions, so the
slots are consecutive positions), so a layer's scores cover the tokens that layer holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.scorers.kvzip import max_attention
from dynaprune.runtime.attention import RunContext

PROMPT = "\n\nRepeat the previous context exactly."  # KVzip's (kvpress's) first-chunk instruction
SUFFIX = "\n"  # kvpress's suffix for a model run without a chat template


class ReconstructionContext(RunContext):
    """Dense attention (the model's own output is unchanged) that records, per layer, the reconstruction
    queries' max attention to the layer's cached context keys (the keys before the repeat's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        if key_padding_mask is not None:
            raise DynapruneError("score=kvzip reconstructs unpadded contexts only")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        self.scores[layer] = max_attention(q, k, scale, k.shape[2] - q.shape[2], window)
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window)


def repeat_ids(model, context_ids: torch.Tensor) -> torch.Tensor:
    """(B, Lr): ``PROMPT`` + ``SUFFIX`` + the context (the prompt alone when the model has no tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return context_ids
    extra = tokenizer(PROMPT + SUFFIX, add_special_tokens=False).input_ids
    head = torch.tensor(extra, dtype=context_ids.dtype, device=context_ids.device)
    return torch.cat([head[None].expand(context_ids.shape[0], -1), context_ids], dim=1)


def check_prompt_cache(cache, n_context: int) -> None:
    """The prompt's whole cache, before eviction or packing: every full-attention layer holds the
    ``n_context`` tokens, a sliding-window layer the last ``min(n_context, window - 1)`` of them, in
    position order (what the reconstruction's positions and window mask assume)."""
    if any(p is not None for p in cache.packed) or any(h is not None for h in cache.head_positions):
        raise DynapruneError("score=kvzip reconstructs the prompt's full cache (before eviction or packing)")
    windows = getattr(cache, "windows", {})
    end = cache.next_position[:, None]
    for layer in range(cache.n_layers):
        n = cache.lengths[layer]
        want = n_context if layer not in windows else min(n_context, windows[layer] - 1)
        positions = cache.cached_positions(layer).to(end.device, torch.long)
        consecutive = torch.arange(n, device=end.device)[None] + end - n
        if n != want or not torch.equal(positions, consecutive):
            raise DynapruneError(f"score=kvzip: layer {layer} holds {n} cached tokens, not the prompt's last {want} "
                                 f"of {n_context} in order (the prompt's full cache, before eviction or packing)")


def scratch_cache(model, cache, extra: int):
    """A copy of the (unevicted, unpacked) prompt cache with room for ``extra`` more tokens."""
    out = model.new_cache(cache.batch, max(cache.lengths) + extra)
    for layer in range(cache.n_layers):
        n = cache.lengths[layer]
        out.k[layer][:, :, :n] = cache.k[layer][:, :, :n]
        out.v[layer][:, :, :n] = cache.v[layer][:, :, :n]
        out.positions[layer][:, :n] = cache.positions[layer][:, :n]
        out.valid[layer][:, :n] = cache.valid[layer][:, :n]
        out.lengths[layer] = n
        out.appended[layer] = cache.appended[layer]
    out.next_position.copy_(cache.next_position)
    return out


def reconstruct(model, context_ids: torch.Tensor, cache) -> dict[int, torch.Tensor]:
    """KVzip's scores (B, Hkv, L_l) per layer of the cached context (``cache`` is left as it was); L_l:
    the tokens layer l holds (the whole context, or a sliding layer's window of it)."""
    if any(cache.has_padding):
        raise DynapruneError("score=kvzip reconstructs unpadded contexts only (batch rows of one length)")
    n = max(cache.lengths)
    if context_ids.shape[-1] != n:
        raise DynapruneError(f"score=kvzip: {context_ids.shape[-1]} prompt ids for a cache of {n} tokens")
    check_prompt_cache(cache, n)
    scores: dict[int, torch.Tensor] = {}
    for chunk in reconstruction_chunks(model, n):
        ids = repeat_ids(model, context_ids[:, chunk])
        ctx = ReconstructionContext()
        with torch.inference_mode():
            model(ids, cache=scratch_cache(model, cache, ids.shape[1]), ctx=ctx, last_only=True)
        for layer, s in ctx.scores.items():  # max over every chunk's queries
            scores[layer] = s if layer not in scores else torch.maximum(scores[layer], s)
    return scores


def reconstruction_chunks(model, n_context: int) -> list[slice]:
    """The context in one piece, or, when the repeat would run past the model's last position (a 4k context
    repeated after itself on an 8k model), in equal chunks that fit (KVzip, Sec. 3.3: chunked scoring): each
    chunk is repeated alone after the context, on a fresh copy of the prompt's cache, and a key's score is
    its max over all chunks' queries."""
    limit = getattr(getattr(model, "config", None), "max_positions", None)
    head = repeat_ids(model, torch.zeros(1, 0, dtype=torch.long)).shape[1]
    room = n_context + head + n_context if limit is None else limit - n_context - head
    if room >= n_context:
        return [slice(0, n_context)]
    if room < 1:
        raise DynapruneError(f"score=kvzip: a context of {n_context} tokens leaves no room to repeat any of it "
                             f"within the model's {limit} positions")
    pieces = -(-n_context // room)
    size = -(-n_context // pieces)
    return [slice(a, min(n_context, a + size)) for a in range(0, n_context, size)]


@dataclass(frozen=True)
class Reconstruction:
    """The pass for one prompt: ``(cache) -> (scores (B, Hkv, Lc) per layer, the pass's token count)``."""

    model: object
    context_ids: torch.Tensor

    def __call__(self, cache) -> tuple[dict[int, torch.Tensor], int]:
        scores = reconstruct(self.model, self.context_ids, cache)
        head = repeat_ids(self.model, self.context_ids[:, :0]).shape[1]
        chunks = reconstruction_chunks(self.model, self.context_ids.shape[1])
        # the tokens the pass ran (a chunked pass repeats the instruction per chunk; its FLOPs are counted as
        # one pass of them all, an upper bound: each chunk attends only to its own repeat)
        return scores, len(chunks) * head + self.context_ids.shape[1]

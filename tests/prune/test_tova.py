"""TOVA (score=tova): each layer keeps the tokens the last query attends to most (averaged over heads),
checked against attention computed by hand from the layer's q and k."""

from __future__ import annotations

import pytest
import torch
from kv_oracle import tiny_llama

from dynaprune.errors import DynapruneError
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.pruning import PruningContext, make_context


def last_query_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """By hand: softmax of the last query's scores over every key (it sees them all), mean over heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhd,bhkd->bhk", q[:, :, -1].double(), k.double()) * scale
    return scores.softmax(-1).mean(1)  # (B, Lk)


class HandOracle(RunContext):
    """Dense attention that also keeps each layer's by-hand last-query attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attention: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        self.attention[layer] = last_query_attention(q, k, scale)
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window=window)


class Watched(PruningContext):
    """The TOVA run, also keeping each layer's by-hand attention and cached positions of the last call."""

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        self.seen = getattr(self, "seen", {})
        self.seen[layer] = (last_query_attention(q, k, scale), self.cache.cached_positions(layer).clone())
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window=window)


def expected_positions(attention: torch.Tensor, positions: torch.Tensor, budget: int) -> list[int]:
    """The newest token (protected) and the budget - 1 others with the largest attention (ties: earlier)."""
    scores = attention[0, :-1]
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[: budget - 1]
    return sorted([int(positions[0, i]) for i in order] + [int(positions[0, -1])])


def test_prefill_keeps_the_last_querys_top_tokens_per_layer():
    model, budget, n = tiny_llama(), 8, 24
    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(3))
    oracle = HandOracle()
    with torch.inference_mode():
        model(ids, ctx=oracle)
        ctx = make_context(f"kv_tokens={budget},score=tova", model)
        cache = model.new_cache(1, n + 4)
        model(ids, cache=cache, ctx=ctx)
    for layer in range(model.config.layers):
        want = expected_positions(oracle.attention[layer], torch.arange(n)[None], budget)
        assert cache.cached_positions(layer)[0].tolist() == want, layer
    assert len({tuple(cache.cached_positions(i)[0].tolist()) for i in range(3)}) > 1  # per layer


def test_decode_steps_evict_the_token_the_new_query_attends_least():
    model, budget, n = tiny_llama(), 6, 16
    ids = torch.randint(1, 60, (1, n + 3), generator=torch.Generator().manual_seed(4))
    recipe = Recipe.parse(f"kv_tokens={budget},score=tova")
    ctx = Watched(recipe, make_context(recipe, model).shape, protect_first=0, protect_last=1)
    cache = model.new_cache(1, n + 4)
    with torch.inference_mode():
        model(ids[:, :n], cache=cache, ctx=ctx)
        for t in range(n, n + 3):
            model(ids[:, t : t + 1], cache=cache, ctx=ctx)
            for layer in range(model.config.layers):
                attention, positions = ctx.seen[layer]  # the cache the new token attended, itself included
                assert positions[0, -1] == t and positions.shape[1] == budget + 1
                want = expected_positions(attention, positions, budget)
                assert cache.cached_positions(layer)[0].tolist() == want, (t, layer)


def test_tova_is_a_kv_eviction_method():
    assert str(Recipe.parse("kv=0.5,score=tova")) == "kv=0.5,score=tova"
    with pytest.raises(DynapruneError, match="score=tova is a KV-cache eviction method; it needs kv"):
        Recipe.parse("score=tova")
    with pytest.raises(DynapruneError, match="score=tova has no cascade"):
        Recipe.parse("token=0.5,kv=0.5,score=tova")

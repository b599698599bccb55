"""Shared by the KV scorer / allocation tests: a tiny GQA Llama and a dense context that keeps each
layer's q and k, so the tests recompute attention by hand (float64) as an independent oracle."""

from __future__ import annotations

import torch

from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.attention import RunContext


def tiny_llama(layers: int = 3, max_positions: int = 128) -> Llama:
    cfg = LlamaConfig(vocab=60, hidden=48, layers=layers, heads=6, kv_heads=2, head_dim=8, intermediate=64,
                      max_positions=max_positions)
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


class QKOracle(RunContext):
    """Dense attention that keeps each layer's q (B, Hq, L, D) and k (B, Hkv, L, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v, key_padding_mask, causal, scale, window=None):
        self.qk[layer] = (q.clone(), k.clone())
        return super().attend(layer, q, k, v, key_padding_mask, causal, scale, window=window)


def causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """By hand, float64: (B, Hq, L, L) causal softmax of a prefill, K repeated for its query heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    scores = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def top_positions(scores: list[float], budget: int, protected: set[int]) -> list[int]:
    """Protected tokens plus the highest-scoring others up to ``budget`` (ties: the earlier), sorted."""
    rest = sorted((i for i in range(len(scores)) if i not in protected), key=lambda i: (-scores[i], i))
    return sorted(list(protected) + rest[: budget - len(protected)])


def prefill(model: Llama, recipe: str, n: int, seed: int = 3):
    """Oracle q/k and the pruned cache after one prefill of ``n`` random tokens under ``recipe``."""
    from dynaprune.runtime.pruning import make_context

    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(seed))
    oracle = QKOracle()
    with torch.inference_mode():
        model(ids, ctx=oracle)
        cache = model.new_cache(1, n + 4)
        model(ids, cache=cache, ctx=make_context(recipe, model))
    return oracle, cache


def run_with_reconstruction(model, ids: torch.Tensor, recipe: str, room: int = 4):
    """One prompt forward under ``recipe`` with the context's reconstruction set (what ``score=kvzip``
    reads): (cache, context)."""
    from dynaprune.runtime.pruning import make_context
    from dynaprune.runtime.reconstruction import Reconstruction

    cache, ctx = model.new_cache(1, ids.shape[1] + room), make_context(recipe, model)
    ctx.reconstruction = Reconstruction(model, ids)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=ctx)
    return cache, ctx

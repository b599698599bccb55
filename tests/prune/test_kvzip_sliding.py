"""score=kvzip on a model with sliding-window layers (a tiny random Gemma 3): the reconstruction pass
respects the window (a repeat query at position p sees only keys at positions in (p - window, p]), each
layer is scored over the tokens it holds (a sliding layer: the context's last window - 1), against a
brute-force oracle: the dense model run on the context followed by its repeat, the windowed causal softmax
recomputed by hand (float64) from each layer's q and k, the max over the repeat's queries and each KV
head's query heads."""

from __future__ import annotations

import pytest
import torch
from kv_oracle import QKOracle, run_with_reconstruction

from dynaprune.errors import DynapruneError
from dynaprune.models.gemma3 import Gemma3, Gemma3Config
from dynaprune.prune.scorers.kvzip import reconstruction_flops
from dynaprune.runtime.cost import cost_shape
from dynaprune.runtime.reconstruction import Reconstruction

CFG = Gemma3Config(vocab=97, hidden=64, layers=6, heads=4, kv_heads=2, head_dim=16, intermediate=96,
                   rms_eps=1e-6, sliding_window=8, pattern=3, query_scalar=12.0, max_positions=256)
N, WINDOW, GROUP = 20, 8, 2


def tiny() -> Gemma3:
    torch.manual_seed(0)
    model = Gemma3(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.2))
    return model


def ids_of(seed: int = 3) -> torch.Tensor:
    return torch.randint(1, CFG.vocab, (1, N), generator=torch.Generator().manual_seed(seed))


def windowed_probs(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """By hand, float64: (Hq, L, L) causal softmax of a prefill at positions 0..L-1, a query at p seeing
    keys in (p - window, p] (all earlier ones without a window)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    scores = (q.double() @ k.transpose(-1, -2) * CFG.query_scalar ** -0.5)[0]
    n = q.shape[2]
    p = torch.arange(n)
    seen = (p[None, :] <= p[:, None]) & ((p[None, :] > p[:, None] - window) if window else True)
    return scores.masked_fill(~seen, float("-inf")).softmax(-1)


def oracle_scores(model, ids: torch.Tensor, windowed: bool = True) -> list[torch.Tensor]:
    """(Hkv, L_l) per layer: the repeat's (the context again: no tokenizer) max attention to the context
    keys the layer holds after the prompt (a sliding layer: the last window - 1)."""
    oracle = QKOracle()
    with torch.inference_mode():
        model(torch.cat([ids, ids], 1), ctx=oracle)
    out = []
    for layer in range(CFG.layers):
        window = CFG.window(layer)
        probs = windowed_probs(*oracle.qk[layer], window if windowed else None)  # (Hq, 2N, 2N)
        held = N if window is None else window - 1
        best = probs[:, N:, N - held:N].amax(1)  # (Hq, held)
        out.append(best.view(CFG.kv_heads, GROUP, held).amax(1))
    return out


def run(model, ids: torch.Tensor, recipe: str):
    return run_with_reconstruction(model, ids, recipe, room=8)


def test_sliding_layers_are_scored_within_their_window():
    model, ids = tiny(), ids_of()
    cache, ctx = run(model, ids, f"kv_tokens={N},score=kvzip,kv_alloc=head")  # nothing evicted: scores only
    want, unwindowed = oracle_scores(model, ids), oracle_scores(model, ids, windowed=False)
    for layer in range(CFG.layers):
        got = ctx.scores.by_layer[layer][0].double()
        assert got.shape == want[layer].shape
        torch.testing.assert_close(got, want[layer], atol=1e-5, rtol=1e-4)
        if CFG.is_sliding(layer) and layer > 0:  # not vacuous: ignoring the window gives other scores
            assert (got - unwindowed[layer]).abs().max() > 1e-3
    assert cache.lengths == [N if CFG.window(i) is None else WINDOW - 1 for i in range(CFG.layers)]
    assert int(cache.next_position[0]) == N  # the repeat's K/V are not left in the cache
    shape = cost_shape(model)
    assert ctx.summary()["kv_reconstruction_flops"] == reconstruction_flops(shape, N, N)


def test_reconstruction_flops_count_windowed_pairs_by_hand():
    shape = cost_shape(tiny())
    linear = 6 * (2 * 64 * 16 * (2 * 4 + 2 * 2) + 2 * 3 * 64 * 96)
    full = N * N + N * (N + 1) // 2
    windowed = sum(min(WINDOW - 1 + i + 1, WINDOW) for i in range(N))  # every repeat query sees a window
    assert windowed == N * WINDOW
    attention = 6 * 4 * 16 * (2 * full + 4 * windowed)  # 2 global layers, 4 sliding
    assert reconstruction_flops(shape, N, N) == linear * N + attention


@pytest.mark.parametrize("budget", [4, 9])
def test_global_layer_budget_spreads_over_sliding_and_global_layers(budget):
    model, ids = tiny(), ids_of(5)
    cache, ctx = run(model, ids, f"kv_tokens={budget},score=kvzip,kv_alloc=global_layer,sink=1")
    widths = cache.lengths
    assert sum(widths) <= budget * CFG.layers
    assert all(w <= WINDOW - 1 for i, w in enumerate(widths) if CFG.is_sliding(i))
    want = oracle_scores(model, ids)
    for layer in range(CFG.layers):  # every head keeps its own top tokens of what the layer held
        held = N if CFG.window(layer) is None else WINDOW - 1
        first = N - held
        for h in range(CFG.kv_heads):
            scores = want[layer][h].tolist()
            rest = sorted(range(1, held), key=lambda i: (-scores[i], i))[: widths[layer] - 1]
            kept = cache.head_cached_positions(layer)[0, h].tolist()
            assert kept == [first + i for i in sorted([0, *rest])], (layer, h)
    with torch.inference_mode():  # the continuation runs on the evicted cache; scores stay aligned
        out = model(ids[:, :6], cache=cache, ctx=ctx)
    assert torch.isfinite(out).all()
    for layer in range(CFG.layers):
        assert ctx.scores.by_layer[layer].shape[-1] == cache.lengths[layer]


def test_an_evicted_cache_is_refused_naming_kvzip():
    model, ids = tiny(), ids_of()
    cache, _ = run(model, ids, "kv_tokens=6,score=kvzip,kv_alloc=head")
    with pytest.raises(DynapruneError, match="score=kvzip"):
        Reconstruction(model, ids)(cache)

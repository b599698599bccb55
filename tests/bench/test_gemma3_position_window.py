"""benchmarks/gemma3_kv.PositionWindow: after a KV budget evicted inside a sliding layer's window, a
teacher-forced continuation scored in one forward with the window by position equals the same
continuation fed one token at a time (the independent oracle: a single query attends to every cached key,
and the model drops after each step what left the window by position), and so does the model's own mask on
a cache compacted per layer (by position since runtime.SlidingWindow). On a cache compacted per KV head
(kv_alloc=head / global_layer) the model still masks by slot (``perplexity_slot_mask``)."""

from __future__ import annotations

import torch

from benchmarks.gemma3_kv import PositionWindow
from dynaprune.models.gemma3 import Gemma3, Gemma3Config
from dynaprune.runtime.pruning import make_context

CFG = Gemma3Config(vocab=97, hidden=64, layers=6, heads=4, kv_heads=2, head_dim=16, intermediate=96,
                   rms_eps=1e-6, sliding_window=8, pattern=3, query_scalar=12.0, max_positions=256)


def tiny() -> Gemma3:
    torch.manual_seed(0)
    model = Gemma3(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.2))
    return model


def evicted_cache(model, ids, recipe):
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=make_context(recipe, model))
    return cache


def test_position_window_equals_stepwise_decoding_after_eviction():
    import copy

    model = tiny()
    ids = torch.randint(1, CFG.vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    cont = torch.randint(1, CFG.vocab, (1, 10), generator=torch.Generator().manual_seed(2))
    # one token set per layer: with per-head sets the stepwise oracle itself is off (models/gemma3.py
    # window_keep returns None when the widest head keeps every slot, leaving other heads' expired tokens)
    for recipe in ("kv_tokens=5,score=h2o", "kv_tokens=3,score=h2o,sink=1"):
        cache = evicted_cache(model, ids, recipe)
        assert all(cache.lengths[i] < CFG.sliding_window - 1 for i in range(CFG.layers) if CFG.is_sliding(i))
        with torch.inference_mode():
            c = copy.deepcopy(cache)
            batched = model(cont, cache=c, ctx=PositionWindow(c))
            own = model(cont, cache=copy.deepcopy(cache))
            c = copy.deepcopy(cache)
            stepwise = torch.cat([model(cont[:, i:i + 1], cache=c) for i in range(cont.shape[1])], 1)
        torch.testing.assert_close(batched, stepwise, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(own, stepwise, atol=1e-4, rtol=1e-4)


def test_position_window_is_the_model_on_a_dense_cache():
    model = tiny()
    ids = torch.randint(1, CFG.vocab, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a, b = model.new_cache(1, 40), model.new_cache(1, 40)
        model(ids[:, :12], cache=a)
        model(ids[:, :12], cache=b)
        torch.testing.assert_close(model(ids[:, 12:], cache=a, ctx=PositionWindow(a)), model(ids[:, 12:], cache=b),
                                   atol=1e-5, rtol=1e-5)

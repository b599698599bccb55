"""Gemma 3 (models/gemma3.py) against transformers' Gemma3ForCausalLM: a tiny random-weight model always,
the real 270M weights when fetched (`dynaprune fetch gemma3-270m`); sliding windows in the mask, the KV
cache and the work counter, checked against brute force."""

from __future__ import annotations

import pytest
import torch

from dynaprune.models.gemma3 import Gemma3, Gemma3Config
from dynaprune.models.registry import cached_path
from dynaprune.runtime.attention import RunContext, build_mask, count_pairs
from dynaprune.runtime.pruning import make_context

TINY = Gemma3Config(vocab=97, hidden=64, layers=6, heads=4, kv_heads=2, head_dim=16, intermediate=96,
                    rms_eps=1e-6, sliding_window=8, pattern=3, query_scalar=12.0, max_positions=256)


def tiny(config: Gemma3Config = TINY, seed: int = 0) -> Gemma3:
    torch.manual_seed(seed)
    model = Gemma3(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms random too, so (1 + w) against w would show
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08))
    return model


@pytest.fixture(scope="module")
def pair():
    model = tiny()
    return model, model.to_transformers()


def test_tiny_logits_equal_transformers_beyond_the_window(pair):
    ours, hf = pair
    ids = torch.randint(0, TINY.vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # not vacuous: without the window (or with Llama-style norms) the late positions differ
    wide = tiny(Gemma3Config(**{**TINY.__dict__, "sliding_window": 64}))
    with torch.no_grad():
        assert (wide(ids)[:, 20:] - expected[:, 20:]).abs().max() > 1e-2
        torch.testing.assert_close(wide(ids)[:, :8], expected[:, :8], atol=1e-4, rtol=1e-4)


def test_tiny_decode_with_cache_equals_full_forward_and_sliding_caches_hold_a_window(pair):
    ours, _ = pair
    ids = torch.randint(0, TINY.vocab, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(1, 30)
        parts = [ours(ids[:, :12], cache=cache)]
        for i in range(12, 20):  # one token at a time
            parts.append(ours(ids[:, i:i + 1], cache=cache))
            for layer in range(TINY.layers):
                held = cache.lengths[layer]
                assert held == (min(i + 1, TINY.sliding_window - 1) if TINY.is_sliding(layer) else i + 1)
                if TINY.is_sliding(layer):  # the latest positions, nothing older
                    assert cache.cached_positions(layer)[0].tolist() == list(range(i + 1 - held, i + 1))
        parts.append(ours(ids[:, 20:], cache=cache))  # a chunk longer than the window left in the cache
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_decodes_like_each_row_alone(pair):
    ours, _ = pair
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, TINY.vocab, (1, 14), generator=g), torch.randint(0, TINY.vocab, (1, 9), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[1, :5] = False
    nxt = torch.randint(0, TINY.vocab, (2, 6), generator=g)
    with torch.no_grad():
        cache = ours.new_cache(2, 30)
        ours(batch, cache=cache, attention_mask=mask)
        steps = [ours(nxt[:, i:i + 1], cache=cache)[:, -1] for i in range(6)]
        for row, seq in enumerate((a, b)):
            alone = ours(torch.cat([seq, nxt[row:row + 1]], 1))[0, -6:]
            torch.testing.assert_close(torch.stack([s[row] for s in steps]), alone, atol=1e-4, rtol=1e-4)


def test_windowed_mask_and_pair_count_match_brute_force():
    for lq, lk, w in ((10, 10, 4), (3, 12, 5), (1, 9, 4), (6, 6, 10)):
        mask = build_mask(lq, lk, None, True, torch.device("cpu"), w)
        brute = torch.tensor([[lk - lq + i - w < j <= lk - lq + i for j in range(lk)] for i in range(lq)])
        assert torch.equal(mask, brute)
        assert count_pairs(lq, lk, None, True, 2, w) == (2 * lq, 2 * int(brute.sum()))


def test_dense_work_counts_the_window(pair):
    ours, _ = pair
    ctx = RunContext()
    ours(torch.randint(0, TINY.vocab, (1, 20)), ctx=ctx)
    for layer in range(TINY.layers):
        keys = [min(i + 1, TINY.sliding_window) if TINY.is_sliding(layer) else i + 1 for i in range(20)]
        assert ctx.work.pairs[layer] == sum(keys)


@pytest.mark.parametrize("recipe", ["kv=0.25,score=h2o", "kv_tokens=6,score=spatten", "token=0.5", "head=0.5"])
def test_recipes_run_through_the_window(pair, recipe):
    """Pruning composes with the window: caches stay within both, scores stay aligned (h2o per layer)."""
    ours, _ = pair
    ids = torch.randint(0, TINY.vocab, (1, 24), generator=torch.Generator().manual_seed(4))
    ctx = make_context(recipe, ours)
    cache = ours.new_cache(1, 40)
    with torch.no_grad():
        out = ours(ids, cache=cache, ctx=ctx)
        for _ in range(5):
            out = ours(out[:, -1:].argmax(-1), cache=cache, ctx=ctx)
            for layer in range(TINY.layers):
                if TINY.is_sliding(layer):
                    assert cache.lengths[layer] <= TINY.sliding_window - 1
                positions = cache.cached_positions(layer)[0]
                assert int(positions.min()) > int(cache.next_position[0]) - TINY.sliding_window or \
                    not TINY.is_sliding(layer)
                state = getattr(ctx, "scores", None)
                if state is not None and layer in state.by_layer:
                    assert state.by_layer[layer].shape[-1] == cache.lengths[layer]
    assert torch.isfinite(out).all()


# ---- the real model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma():
    if cached_path("gemma3-270m") is None:
        pytest.skip("gemma3-270m is not fetched (dynaprune fetch gemma3-270m)")
    import dynaprune

    return dynaprune.load("gemma3-270m")


@pytest.mark.models
@pytest.mark.slow
def test_real_logits_equal_transformers_on_700_tokens_and_decode_equals_full(gemma):
    ids = torch.randint(3, gemma.config.vocab, (1, 700), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = gemma.config.bos_id
    with torch.inference_mode():
        ours = gemma(ids)
        hf = gemma.to_transformers()
        torch.testing.assert_close(ours, hf(input_ids=ids).logits, atol=1e-4, rtol=1e-5)
        del hf
        cache = gemma.new_cache(1, 700)
        parts = [gemma(ids[:, :600], cache=cache)]
        parts += [gemma(ids[:, i:i + 1], cache=cache) for i in range(600, 604)]
        assert max(cache.lengths[i] for i in range(18) if gemma.config.is_sliding(i)) == 511
    # logits reach 140: the cached path sums in another order, equal to 1e-6 of their size
    torch.testing.assert_close(torch.cat(parts, 1), ours[:, :604], atol=1e-3, rtol=1e-5)


class _CharTokenizer:
    bos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[3 + ord(c) % 90 for c in text])


@pytest.mark.parametrize("protocol, options, scored", [
    ("window", dict(window=8, max_tokens=20), 20),  # windows of 8, 8, 4 tokens, each after <bos>: all scored
    ("continue", dict(context=6, continuation=4, max_examples=2), 8),
])
def test_lm_examples_start_with_bos(tmp_path, monkeypatch, protocol, options, scored):
    from dynaprune.eval.lm import evaluate_lm

    model = tiny()
    model.tokenizer = _CharTokenizer()
    firsts = []
    inner = model.forward

    def forward(ids, **kw):
        if kw.get("cache") is None or int(kw["cache"].next_position[0]) == 0:
            firsts.append(int(ids[0, 0]))
        return inner(ids, **kw)

    monkeypatch.setattr(model, "forward", forward)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 3)
    res = evaluate_lm(model, text, protocol=protocol, **options)
    assert firsts and set(firsts) == {2}
    assert res.metric["tokens"] == scored


def test_dense_kv_bytes_reference_is_the_windowed_cache(pair):
    """kv_bytes_vs_fp16's reference: a dense cache of a sliding layer holds window - 1 tokens, not all."""
    ours, _ = pair
    cache = ours.new_cache(1, 40)
    with torch.no_grad():
        ours(torch.randint(0, TINY.vocab, (1, 20)), cache=cache)
        ours(torch.randint(0, TINY.vocab, (1, 1)), cache=cache)
    row = 2 * 2 * TINY.kv_heads * TINY.head_dim  # K and V of one token at fp16
    held = [TINY.sliding_window - 1 if TINY.is_sliding(i) else 21 for i in range(TINY.layers)]
    assert cache.dense_fp16_bytes() == row * sum(held) == cache.bytes_held(fp_bytes=2)


def test_dense_flops_reference_counts_each_layer_with_its_own_window(pair):
    """Hand count: the tiny model's sliding layers attend sum_i min(i + 1, 8) pairs, its global layers
    i + 1; the dense reference of a run (no ``dense`` counter given), of a KV-budget decode, and
    ``dense_cost`` all say so (before: layer 0's windowed pairs were copied to the global layers)."""
    from dynaprune.runtime.cost import cost_shape, dense_cost, work_cost

    ours, _ = pair
    shape = cost_shape(ours)
    assert shape.layer_windows == tuple(0 if (i + 1) % 3 == 0 else 8 for i in range(6))
    n, qdim = 20, TINY.heads * TINY.head_dim
    hand = sum(sum(min(i + 1, 8) if TINY.is_sliding(layer) else i + 1 for i in range(n)) for layer in range(6))
    ids = torch.randint(0, TINY.vocab, (1, n), generator=torch.Generator().manual_seed(7))
    ctx = RunContext()
    with torch.no_grad():
        ours(ids, ctx=ctx)
    cost = work_cost(shape, ctx.work)
    assert cost["dense"]["flops"]["attn_qk"] == cost["actual"]["flops"]["attn_qk"] == 2 * qdim * hand
    assert cost["flops_kept"] == 1.0
    assert dense_cost(shape, [n])["dense_flops"]["attn_qk"] == 2 * qdim * hand
    # a KV budget: prompt of 20 under kv=0.25, 4 decode steps; its dense reference is a dense run's work
    runs = {}
    for name, recipe in (("dense", None), ("kv", "kv=0.25,score=h2o")):
        c, cache = (make_context(recipe, ours) if recipe else RunContext()), ours.new_cache(1, 30)
        with torch.no_grad():
            ours(ids, cache=cache, ctx=c)
            for t in range(4):
                ours(ids[:, t:t + 1], cache=cache, ctx=c)
        runs[name] = c.work
    dense_run = work_cost(shape, runs["dense"])["actual"]["flops"]
    kv = work_cost(shape, runs["kv"])
    assert kv["dense"]["flops"]["attn_qk"] == dense_run["attn_qk"]
    assert kv["actual"]["flops"]["attn_qk"] < dense_run["attn_qk"]

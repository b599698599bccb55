"""LazyLLM revival of pruned prompt tokens (``prefill_revive``, runtime/revival.py): which tokens come
back (the next ones by the brute-force window score), their K/V against a one-token-at-a-time reference
through the model's plain attention on a cache filtered by hand, the work counted, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prune"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.prune.recipe import Recipe  # noqa: E402
from dynaprune.runtime.attention import DENSE  # noqa: E402
from dynaprune.runtime.pruning import make_context  # noqa: E402
from dynaprune.runtime.revival import RevivalModel, pending_revival, revive  # noqa: E402
from tests.prune.test_prefill_window import KeepQK, expected_kept, tiny_llama  # noqa: E402

L, LAYER, WINDOW, SINKS, POOL = 40, 1, 4, 2, 3


def _recipe(keep: float, revive: float) -> str:
    return (f"prefill_keep={keep},prefill_layer={LAYER},prefill_window={WINDOW},prefill_sinks={SINKS},"
            f"prefill_pool={POOL},prefill_revive={revive}")


def _reference(model, cache, aux, kept_slots: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, position) -> (K, V) of each revived token, one token at a time in position order: a fresh
    cache holding, in each later layer, the survivors and the revived tokens already done that sit at
    earlier positions; the block runs the token as a plain one-query decode step (sees every cached key)."""
    done: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    cos_t, sin_t = model.rope_tables(L, aux.hidden.device)
    for j, p in enumerate(aux.positions[0].tolist()):
        scratch = model.new_cache(1, 2 * L)
        x, pos = aux.hidden[:, j:j + 1], torch.tensor([[p]])
        for i in range(LAYER + 1, len(model.layers)):
            surv_pos = cache.positions[i][0, :kept_slots]
            before = surv_pos < p
            k = cache.k[i][:, :, :kept_slots][:, :, before]
            v = cache.v[i][:, :, :kept_slots][:, :, before]
            ks, vs, ps = [k], [v], [surv_pos[before]]
            for (li, q), (kk, vv) in done.items():
                if li == i and q < p:
                    ks.append(kk), vs.append(vv), ps.append(torch.tensor([q]))
            scratch.update(i, torch.cat(ks, 2), torch.cat(vs, 2), positions=torch.cat(ps)[None])
            n = scratch.lengths[i]
            x = model.layers[i](x, cos_t[pos][:, None], sin_t[pos][:, None], i, pos, None, scratch, DENSE)
            done[(i, p)] = (scratch.k[i][:, :, n:n + 1].clone(), scratch.v[i][:, :, n:n + 1].clone())
    return done


@pytest.mark.parametrize("keep,share", [(0.4, 0.25), (0.3, 0.7)])
def test_revived_tokens_and_their_kv_match_brute_force(keep, share):
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, L), generator=torch.Generator().manual_seed(3))
    oracle = KeepQK()
    with torch.no_grad():
        model(ids, ctx=oracle)
        kept = expected_kept(*oracle.qk[LAYER], WINDOW, SINKS, POOL, keep)
        both = expected_kept(*oracle.qk[LAYER], WINDOW, SINKS, POOL, keep + share)  # the same ranking, further
        ctx = make_context(_recipe(keep, share), model)
        cache = model.new_cache(1, 2 * L)
        model(ids, cache=cache, ctx=ctx, last_only=True)
        aux = pending_revival(ctx).revival
        assert aux.positions[0].tolist() == sorted(set(both) - set(kept))
        run = revive(model, cache, ctx)
        want = _reference(model, cache, aux, len(kept))
    for i in range(len(model.layers)):
        held = cache.cached_positions(i)[0].tolist()
        assert sorted(held) == (list(range(L)) if i <= LAYER else both), i
    for (i, p), (k, v) in want.items():
        slot = cache.cached_positions(i)[0].tolist().index(p)
        torch.testing.assert_close(cache.k[i][:, :, slot:slot + 1], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v[i][:, :, slot:slot + 1], v, rtol=1e-4, atol=1e-5)
    n_rev = len(both) - len(kept)
    later = range(LAYER + 1, len(model.layers))
    assert [run.work.tokens[i] for i in later] == [n_rev] * len(later)
    seen = sum(sum(q <= p for q in both) for p in set(both) - set(kept))  # causal by position, by hand
    assert [run.work.pairs[i] for i in later] == [seen] * len(later)
    assert ctx.summary()["prefill"]["tokens_revived"] == n_rev


def test_revival_model_then_decode_and_missing_revival_is_refused():
    model = tiny_llama()
    ids = torch.randint(0, 60, (1, L), generator=torch.Generator().manual_seed(4))
    nxt = torch.tensor([[5, 6]])
    with torch.no_grad():
        ctx, cache = make_context(_recipe(0.4, 0.2), model), model.new_cache(1, 2 * L)
        runner = RevivalModel(model)
        runner(ids, cache=cache, ctx=ctx, last_only=True)
        assert runner.last_revival is not None and pending_revival(ctx) is None
        assert torch.isfinite(runner(nxt, cache=cache, ctx=ctx)).all()
        assert cache.lengths[3] == 16 + 8 + 2  # survivors + revived + the two new tokens
        ctx, cache = make_context(_recipe(0.4, 0.2), model), model.new_cache(1, 2 * L)
        model(ids, cache=cache, ctx=ctx, last_only=True)
        with pytest.raises(DynapruneError, match="prefill_revive"):
            model(nxt, cache=cache, ctx=ctx)  # nothing revived: refused, not silently pruned


@pytest.mark.parametrize("recipe", ["prefill_revive=0.2", "prefill_keep=0.8,prefill_revive=0.3",
                                    "prefill_keep=0.5,prefill_revive=0", "prefill=0.7,prefill_revive=0.2",
                                    "prefill_schedule=1:0.5/2:0.3,prefill_revive=0.2"])
def test_bad_revive_recipes_name_the_key(recipe):
    with pytest.raises(DynapruneError, match="prefill_revive"):
        Recipe.parse(recipe)

"""On-demand (LazyLLM) revival during decoding (runtime/revival_on_demand.py): dense token by token equals
dense chunked; per_step 0 / budget 0 equals the selection without revival; everything revived at step 1
equals the one-shot revival; each step's choice against a hand float64 softmax of the new token's
layer-s query (from a dense run of prompt + continuation); revived K/V against a one-token-at-a-time
reference on hand-filtered caches; work counted once per token; bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prune"))

from kv_oracle import QKOracle  # noqa: E402
from kv_oracle import tiny_llama as _tiny_llama  # noqa: E402

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.runtime.attention import DENSE  # noqa: E402
from dynaprune.runtime.pruning import make_context  # noqa: E402
from dynaprune.runtime.revival import RevivalModel  # noqa: E402
from dynaprune.runtime.revival_on_demand import OnDemand, OnDemandModel  # noqa: E402

P, STEPS, LAYER, KEEP = 40, 8, 1, 0.4
BASE = f"prefill_keep={KEEP},prefill_layer={LAYER},prefill_window=4,prefill_sinks=2,prefill_pool=3"
ALL = f"{BASE},prefill_revive={1 - KEEP:g}"  # every pruned token in the aux cache


def tiny_llama():
    return _tiny_llama(4, max_positions=256)


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 60, (1, P + STEPS), generator=torch.Generator().manual_seed(seed))


def _decode(runner, model, ids, recipe: str | None) -> tuple[torch.Tensor, object, object]:
    """Logits (STEPS + 1, V): the prompt's last, then one forward per continuation token."""
    cache = model.new_cache(1, P + STEPS + 4)
    ctx = make_context(recipe, model) if recipe else None
    out = [runner(ids[:, :P], cache=cache, ctx=ctx, last_only=True)[0]]
    for t in range(STEPS):
        out.append(runner(ids[:, P + t:P + t + 1], cache=cache, ctx=ctx)[0])
    return torch.cat(out), cache, ctx


def test_dense_token_by_token_equals_dense_chunked():
    model, ids = tiny_llama(), _ids()
    with torch.inference_mode():
        stepwise, _, _ = _decode(model, model, ids, None)
        chunked = model(ids)[0, P - 1:]
    torch.testing.assert_close(stepwise, chunked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("knobs", [OnDemand(per_step=0), OnDemand(budget=0.0), OnDemand(threshold=1.0)])
def test_no_revival_equals_the_selection_alone(knobs):
    model, ids = tiny_llama(), _ids()
    with torch.inference_mode():
        want, _, _ = _decode(model, model, ids, BASE)
        runner = OnDemandModel(model, knobs)
        got, cache, _ = _decode(runner, model, ids, ALL)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert runner.state.revived == 0 and runner.state.history == [[]] * STEPS
    assert cache.lengths[LAYER + 1] == int(KEEP * P + 0.5) + STEPS


def test_everything_at_step_one_equals_the_one_shot_revival():
    model, ids = tiny_llama(), _ids(5)
    with torch.inference_mode():
        want, _, _ = _decode(RevivalModel(model), model, ids, ALL)
        runner = OnDemandModel(model, OnDemand(per_step=P))
        got, _, _ = _decode(runner, model, ids, ALL)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    pruned = P - int(KEEP * P + 0.5)
    assert [len(h) for h in runner.state.history] == [pruned] + [0] * (STEPS - 1)


def _hand_choices(model, ids, kept: list[int], per_step: int, pool: int, threshold: float = 0.0) -> list[list[int]]:
    """Each step's revived positions by hand: the new token's layer-s query (dense run of prompt +
    continuation: layers 0..s are never pruned) against every earlier key, float64 softmax, mean over
    heads, max-pool over the prompt, the top per_step of the pruned tokens not yet revived scoring at least
    ``threshold`` (ties: earlier)."""
    oracle = QKOracle()
    model(ids, ctx=oracle)
    q, k = oracle.qk[LAYER]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    pending, out = [p for p in range(P) if p not in kept], []
    for t in range(STEPS):
        at = P + t
        rows = (q[0, :, at].double()[:, None] @ k[0, :, :at + 1].transpose(-1, -2))[:, 0] / q.shape[-1] ** 0.5
        score = rows.softmax(-1).mean(0)[:P].tolist()
        r = pool // 2
        pooled = [max(score[max(0, j - r): j + r + 1]) for j in range(P)]
        pick = sorted(sorted((j for j in pending if pooled[j] >= threshold), key=lambda j: (-pooled[j], j))[:per_step])
        pending = [p for p in pending if p not in pick]
        out.append(pick)
    return out


@pytest.mark.parametrize("per_step,pool", [(2, 1), (3, 3)])
def test_each_step_revives_what_its_attention_asks_for(per_step, pool):
    model, ids = tiny_llama(), _ids(7)
    with torch.inference_mode():
        runner = OnDemandModel(model, OnDemand(per_step=per_step, pool=pool))
        _, cache, ctx = _decode(runner, model, ids, ALL)
        kept = [p for p in cache.cached_positions(LAYER + 1)[0].tolist() if p < P]
        kept = kept[: int(KEEP * P + 0.5)]  # the survivors come first in the later layers' caches
        want = _hand_choices(model, ids, kept, per_step, pool)
    assert runner.state.history == want
    held = sorted(kept + [p for h in want for p in h])
    for i in range(LAYER + 1, 4):  # survivors + revived + the continuation, each once
        assert sorted(cache.cached_positions(i)[0].tolist()) == held + list(range(P, P + STEPS))
    n = len(held) - len(kept)
    assert [runner.state.revival_work.tokens[i] for i in range(LAYER + 1, 4)] == [n] * (4 - LAYER - 1)


def _reference_kv(model, cache, kept: list[int], history, state) -> dict:
    """(layer, position) -> (K, V) of each revived token, one token at a time in revival order (step, then
    position): a scratch cache holding the survivors and the tokens revived before it at earlier positions;
    the token runs as a plain one-query step from its aux hidden state."""
    aux_pos = state.positions[0].tolist()
    done: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    cos_t, sin_t = model.rope_tables(P + STEPS, state.hidden.device)
    n_kept = len(kept)
    for p in [p for h in history for p in h]:
        x, pos = state.hidden[:, aux_pos.index(p)][:, None], torch.tensor([[p]])
        for i in range(LAYER + 1, len(model.layers)):
            surv = cache.positions[i][0, :n_kept]
            before = surv < p
            ks, vs = [cache.k[i][:, :, :n_kept][:, :, before]], [cache.v[i][:, :, :n_kept][:, :, before]]
            ps = [surv[before]]
            for (li, q), (kk, vv) in done.items():
                if li == i and q < p:
                    ks.append(kk), vs.append(vv), ps.append(torch.tensor([q]))
            scratch = model.new_cache(1, 2 * P)
            scratch.update(i, torch.cat(ks, 2), torch.cat(vs, 2), positions=torch.cat(ps)[None])
            n = scratch.lengths[i]
            x = model.layers[i](x, cos_t[pos][:, None], sin_t[pos][:, None], i, pos, None, scratch, DENSE)
            done[(i, p)] = (scratch.k[i][:, :, n:n + 1].clone(), scratch.v[i][:, :, n:n + 1].clone())
    return done


def test_revived_kv_matches_one_token_at_a_time():
    model, ids = tiny_llama(), _ids(11)
    with torch.inference_mode():
        runner = OnDemandModel(model, OnDemand(per_step=3))
        _, cache, _ = _decode(runner, model, ids, ALL)
        n_kept = int(KEEP * P + 0.5)
        kept = cache.cached_positions(LAYER + 1)[0, :n_kept].tolist()
        want = _reference_kv(model, cache, kept, runner.state.history, runner.state)
    assert want
    for (i, p), (k, v) in want.items():
        slot = cache.cached_positions(i)[0].tolist().index(p)
        torch.testing.assert_close(cache.k[i][:, :, slot:slot + 1], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v[i][:, :, slot:slot + 1], v, rtol=1e-4, atol=1e-5)


def test_threshold_and_budget_cap_what_comes_back():
    model, ids = tiny_llama(), _ids(13)
    with torch.inference_mode():
        capped = OnDemandModel(model, OnDemand(per_step=P, budget=0.5))
        _decode(capped, model, ids, ALL)
        picky = OnDemandModel(model, OnDemand(per_step=P, threshold=0.022))
        _, cache, _ = _decode(picky, model, ids, ALL)
        kept = cache.cached_positions(LAYER + 1)[0, :int(KEEP * P + 0.5)].tolist()
        want = _hand_choices(model, ids, kept, P, 1, threshold=0.022)
    pruned = P - int(KEEP * P + 0.5)
    assert capped.state.revived == int(0.5 * pruned) and len(capped.state.history[0]) == int(0.5 * pruned)
    assert picky.state.history == want
    assert 0 < picky.state.revived < pruned  # only what some step attended to with >= 2.2%


@pytest.mark.parametrize("knobs", [dict(per_step=-1), dict(budget=1.5), dict(threshold=-0.1), dict(pool=2),
                                   dict(order="random")])
def test_bad_knobs_are_refused(knobs):
    with pytest.raises(DynapruneError, match="on-demand revival"):
        OnDemand(**knobs)


def test_multi_token_decode_is_refused():
    model, ids = tiny_llama(), _ids()
    with torch.inference_mode():
        runner = OnDemandModel(model, OnDemand())
        cache = model.new_cache(1, P + STEPS)
        runner(ids[:, :P], cache=cache, ctx=make_context(ALL, model), last_only=True)
        with pytest.raises(DynapruneError, match="one token at a time"):
            runner(ids[:, P:P + 2], cache=cache)


def test_position_order_ends_with_the_one_shot_caches():
    """Earliest first, r a step: once every pruned token is back, each saw every earlier one, so the later
    layers hold the one-shot revival's K/V (by position); the steps before read fewer tokens."""
    model, ids = tiny_llama(), _ids(17)
    with torch.inference_mode():
        _, want, _ = _decode(RevivalModel(model), model, ids, ALL)
        runner = OnDemandModel(model, OnDemand(per_step=5, order="position"))
        _, got, _ = _decode(runner, model, ids, ALL)
    pruned = [p for h in runner.state.history for p in h]
    assert pruned == sorted(pruned) and len(pruned) == P - int(KEEP * P + 0.5)
    assert [len(h) for h in runner.state.history[:5]] == [5, 5, 5, 5, 4]
    for i in range(LAYER + 1, 4):
        w_pos, g_pos = want.cached_positions(i)[0].tolist(), got.cached_positions(i)[0].tolist()
        for p in pruned:
            a, b = w_pos.index(p), g_pos.index(p)
            torch.testing.assert_close(got.k[i][:, :, b], want.k[i][:, :, a], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.v[i][:, :, b], want.v[i][:, :, a], rtol=1e-4, atol=1e-5)

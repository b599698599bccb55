"""The KV budget's eviction slack (issue 14 item 5): the prompt's forward evicts to exactly the budget
(``kv=0.7`` of 100 tokens keeps 70, as kvpress's budgets mean), decode-time growth evicts in chunks of
budget / 16 (once the budget is >= 64 tokens). Expected lengths are counted by hand."""

from __future__ import annotations

import torch
from kv_oracle import tiny_llama

from dynaprune.runtime.pruning import make_context


def _lengths_after_each_forward(recipe: str, n: int, steps: int) -> list[int]:
    model = tiny_llama(layers=2)
    ids = torch.randint(1, 60, (1, n + steps), generator=torch.Generator().manual_seed(1))
    ctx, cache = make_context(recipe, model), model.new_cache(1, n + steps + 1)
    lengths = []
    with torch.inference_mode():
        model(ids[:, :n], cache=cache, ctx=ctx)
        lengths.append(cache.lengths[0])
        for t in range(n, n + steps):
            model(ids[:, t:t + 1], cache=cache, ctx=ctx)
            lengths.append(cache.lengths[0])
    return lengths


def test_prompt_evicts_to_exactly_the_budget_then_decode_evicts_in_chunks():
    # budget 70 (keep_count(0.7, 100)); slack int(70 / 16) = 4: the first step (71 > 70) drops to 66,
    # then 67 .. 70 fit, the next step (71) drops to 66 again
    lengths = _lengths_after_each_forward("kv=0.7,score=h2o", 100, 6)
    assert lengths == [70, 66, 67, 68, 69, 70, 66]


def test_per_head_prompt_keeps_the_budget_too():
    lengths = _lengths_after_each_forward("kv_tokens=64,score=h2o,kv_alloc=head", 100, 2)
    assert lengths == [64, 60, 61]  # slack int(64 / 16) = 4


def test_small_budget_has_no_slack():
    lengths = _lengths_after_each_forward("kv_tokens=20,score=h2o", 40, 3)
    assert lengths == [20, 20, 20, 20]

"""generate() and the lm task under ``prefill_revive`` (LazyLLM revival, runtime/revival.py): the revival
runs once the first token's logits exist, its work joins the run's counter, and the tokens match a
hand-driven run through ``RevivalModel`` (the benchmark's path)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynaprune.eval.lm import evaluate_lm
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.cost import cost_shape, work_cost
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.revival import RevivalModel

RECIPE = "prefill_keep=0.4,prefill_layer=1,prefill_window=4,prefill_sinks=2,prefill_pool=3,prefill_revive=0.3"
NO_REVIVAL = RECIPE.rsplit(",", 1)[0]


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(ch) % 60 for ch in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=60, hidden=32, layers=4, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    model = Llama(cfg, tokenizer=CharTokenizer(), name="tiny").eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # peaked distributions: no near-ties between greedy candidates
    return model


def greedy_by_hand(model, ids: list[int], n: int) -> tuple[list[int], object]:
    runner, ctx = RevivalModel(model), make_context(RECIPE, model)
    cache = model.new_cache(1, len(ids) + n)
    out = []
    with torch.inference_mode():
        logits = runner(torch.tensor([ids]), cache=cache, ctx=ctx, last_only=True)
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = runner(torch.tensor([[out[-1]]]), cache=cache, ctx=ctx)
    return out, runner.last_revival


def test_generate_revives_after_the_first_token_and_counts_the_work(tiny):
    ids = torch.randint(0, 60, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    res = tiny.generate(ids, max_new_tokens=6, recipe=RECIPE, stop_tokens=[])
    want, revival = greedy_by_hand(tiny, ids, 6)
    assert res.new_ids == want
    plain = tiny.generate(ids, max_new_tokens=6, recipe=NO_REVIVAL, stop_tokens=[])
    shape = cost_shape(tiny)
    extra = work_cost(shape, revival.work, dense=revival.work)["actual"]["flops"]["total"]
    assert extra > 0
    # + the 5 decode steps reading the 12 revived keys in layers 2 and 3 (QK^T and PV, 2 FLOPs a MAC)
    reads = 5 * 2 * 12 * 2 * 2 * tiny.config.heads * tiny.config.head_dim
    assert res.cost["actual"]["flops"]["total"] - plain.cost["actual"]["flops"]["total"] == extra + reads
    assert res.cost["flops_kept"] > plain.cost["flops_kept"]


def test_lm_continue_scores_the_revived_cache(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(65 + (i * 7) % 26) for i in range(200)))
    ids = tiny.tokenizer(text.read_text()).input_ids
    res = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=20, max_examples=2,
                      ctx_factory=lambda: make_context(RECIPE, tiny))
    total = 0.0
    for c in range(2):
        piece = torch.tensor(ids[c * 80:(c + 1) * 80])
        runner, ctx = RevivalModel(tiny), make_context(RECIPE, tiny)
        cache = tiny.new_cache(1, 80)
        with torch.inference_mode():
            last = runner(piece[None, :60], cache=cache, ctx=ctx, last_only=True)[0]
            rest = runner(piece[None, 60:79], cache=cache, ctx=ctx)[0]
        total += float(F.cross_entropy(torch.cat([last, rest]), piece[60:], reduction="sum"))
    assert math.isclose(res.metric["nll"], total / 40, rel_tol=1e-6)
    assert res.extra["tokens_revived"] == 2 * 18  # 0.3 of 60, each chunk
    without = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=20, max_examples=2,
                          ctx_factory=lambda: make_context(NO_REVIVAL, tiny))
    assert "tokens_revived" not in without.extra and without.metric["nll"] != res.metric["nll"]


def test_prefill_selection_in_a_left_padded_batch_equals_one_by_one(tiny):
    """After the selection a shorter row's survivors end before the last column (padding after them): the
    first token must come from each row's last real token, not from the last column."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (40, 30)]
    recipe = NO_REVIVAL
    batch = tiny.generate(prompts, max_new_tokens=6, recipe=recipe, stop_tokens=[]).new_ids
    assert batch == [tiny.generate(p, max_new_tokens=6, recipe=recipe, stop_tokens=[]).new_ids for p in prompts]

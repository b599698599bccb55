"""Traces of our own runs (tiny random BERT and Llama) simulate on SpAtten and HDP; pruning never adds DRAM bytes.

The models have 64-wide heads like MiniLM and SmolLM2, so the bit widths map to whole 32-byte DRAM
transactions the way they do on the real models (a 4-bit key row of 64 values is one transaction).
"""

from __future__ import annotations

import math

import pytest
import torch

from dynaprune.hw.hdp import simulate_hdp
from dynaprune.hw.spatten import simulate_spatten
from dynaprune.hw.trace import Trace, read_trace, write_trace
from dynaprune.models.bert import Bert, BertConfig
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.runtime.pruning import make_context
from dynaprune.runtime.trace import trace_rows

BASELINE = "token=1,token_adapt=0"  # a traced context that prunes nothing
CHAINS = {  # each recipe adds a technique to the one before it
    "encoder": [BASELINE, "token=0.5", "token=0.5,quant=4+4@0.1", "token=0.5,head=0.8,value=0.5,quant=4+4@0.1"],
    "decoder": [BASELINE, "kv=0.25", "kv=0.25,quant=4+4@0.1", "token=0.5,kv=0.25,quant=4+4@0.1"],
}
SIMULATORS = {"spatten": simulate_spatten, "hdp": simulate_hdp}
PROMPT, NEW = 40, 8


def tiny_bert() -> Bert:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    model = Bert(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=50, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=48,
                      max_positions=128)
    return Llama(cfg).eval()


def encoder_trace(model: Bert, recipe: str) -> Trace:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False  # only the first input is traced
    ctx = make_context(recipe, model, trace=True)
    with torch.inference_mode():
        model(ids, mask, ctx=ctx)
    return Trace.from_rows(trace_rows(ctx), config=recipe.replace(",", ";"))


def decoder_trace(model: Llama, recipe: str) -> tuple[Trace, object]:
    prompt = torch.randint(0, 50, (PROMPT,), generator=torch.Generator().manual_seed(2)).tolist()
    ctx = make_context(recipe, model, trace=True)
    res = model.generate(prompt, max_new_tokens=NEW, stop_tokens=[], ctx=ctx)
    assert len(res.new_ids) == NEW
    return Trace.from_rows(trace_rows(ctx), config=recipe.replace(",", ";")), ctx


@pytest.fixture(scope="module")
def runs():
    bert, llama = tiny_bert(), tiny_llama()
    out = {"encoder": {r: (encoder_trace(bert, r), None) for r in [*CHAINS["encoder"], "fixed=8.8", "block=0.2"]},
           "decoder": {r: decoder_trace(llama, r) for r in CHAINS["decoder"]}}
    sims = {(kind, recipe, arch): sim(trace)
            for kind, traces in out.items() for recipe, (trace, _) in traces.items()
            for arch, sim in SIMULATORS.items()}
    return out, sims


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_our_traces_simulate_on_both_archs(runs, kind, tmp_path):
    traces, sims = runs
    for recipe, (trace, _) in traces[kind].items():
        for arch in SIMULATORS:
            r = sims[(kind, recipe, arch)]
            assert r.rows == len(trace) and r.cycles > 0 and r.dram_bytes > 0, (recipe, arch)
            assert math.isfinite(r.energy_j["total"]) and r.energy_j["total"] > 0
    # through the CSV and back: the same workload, the same numbers
    recipe = CHAINS[kind][-1]
    back = read_trace(write_trace(tmp_path / "t.csv", traces[kind][recipe][0]))
    for arch, sim in SIMULATORS.items():
        assert sim(back).cycles == sims[(kind, recipe, arch)].cycles
        assert sim(back).dram_bytes == sims[(kind, recipe, arch)].dram_bytes


@pytest.mark.parametrize("arch", list(SIMULATORS))
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_pruning_never_needs_more_dram_bytes(runs, kind, arch):
    _, sims = runs
    dram = [sims[(kind, recipe, arch)].dram_bytes for recipe in CHAINS[kind]]
    for before, after, recipe in zip(dram, dram[1:], CHAINS[kind][1:], strict=False):
        assert after <= before * (1 + 1e-12), f"{recipe} on {arch}: {after} > {before}"
    assert dram[-1] < dram[0]
    if kind == "encoder":  # HDP block pruning against the same fixed-point word with nothing pruned
        assert sims[("encoder", "block=0.2", arch)].dram_bytes < sims[("encoder", "fixed=8.8", arch)].dram_bytes


def test_decoder_traces_follow_the_kv_budget(runs):
    traces, _ = runs
    base, _ = traces["decoder"][BASELINE]
    assert int(base["iteration_id"].max()) == NEW - 1  # the prefill + one iteration per fed-back token
    prefill = base["iteration_id"] == 0
    assert int(base["key_fetch_num"][prefill].max()) == PROMPT
    assert base["sentence_length_L"][~prefill].tolist() == base["key_fetch_num"][~prefill].tolist()
    for recipe in CHAINS["decoder"][1:]:
        trace, ctx = traces["decoder"][recipe]
        decode = trace["iteration_id"] > 0
        # every decode step attends the cache within its budget plus the new token, out of all tokens so far
        assert int(trace["key_fetch_num"][decode].max()) <= ctx.kv_budget + 1
        assert (trace["sentence_length_L"][decode] == PROMPT + trace["iteration_id"][decode]).all()

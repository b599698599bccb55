"""The progressive quantization technique (prune/techniques/progressive_quant.py): recipe keys, bad
input naming the key, the calibrated rate table, and a real run's row decision and bits."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from dynaprune.calibrate.lsb import thresholds_from_histogram
from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.techniques.progressive_quant import (
    HISTOGRAM_BINS,
    QUANTIZER,
    QuantSetting,
    resolve_threshold,
    threshold_for_rate,
)
from dynaprune.runtime.pruning import make_context


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=48,
                      max_positions=256)
    return Llama(cfg, tokenizer=None, name="tiny").eval()


def test_keys_round_trip() -> None:
    r = Recipe.parse("quant_group=32,quant=4+4@rate0.05")
    assert str(r) == "quant=4+4@rate0.05,quant_group=32"
    assert Recipe.parse(str(r)) == r and r.quant == QuantSetting(4, 4, None, 0.05)
    assert str(Recipe.parse("quant=3+4@0.07")) == "quant=3+4@0.07"


@pytest.mark.parametrize(("recipe", "key", "words"), [
    ("quant=17", "quant", "outside 1..16"),
    ("quant=0", "quant", "outside 1..16"),
    ("quant=12+8@0.1", "quant", "at most 16"),
    ("quant=4+4@1.5", "quant", "outside [0, 1]"),
    ("quant=4+4@rate1.5", "quant", "outside (0, 1)"),
    ("quant=4+4@ratex", "quant", ""),
    ("quant_group=0,quant=8", "quant_group", ""),
    ("quant_group=32", "quant_group", "needs quant"),
    ("quant_rotate=kv", "quant_rotate", "needs quant"),
    ("quant=4,quant_rotate=q", "quant_rotate", ""),
    ("quant_value_residual=on", "quant_value_residual", "needs quant"),
    ("quant=4,quant_value_residual=maybe", "quant_value_residual", ""),
])
def test_bad_recipes_name_the_key(recipe: str, key: str, words: str) -> None:
    with pytest.raises(DynapruneError, match=f"recipe key '{key}'.*{re.escape(words)}"):
        Recipe.parse(recipe)


def test_group_not_dividing_head_dim_and_uncalibrated_rate_are_refused(model) -> None:
    with pytest.raises(DynapruneError, match="recipe key 'quant_group': 12 does not divide head_dim=16"):
        make_context("quant=4+4@0.1,quant_group=12", model)
    with pytest.raises(DynapruneError, match="recipe key 'quant': no calibrated threshold"):
        make_context("quant=4+4@rate0.05", model)


def test_rate_table_interpolates_and_refuses_outside() -> None:
    shape = SimpleNamespace(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16)
    table = {"shape": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 16}, "msb_bits": 4,
             "lsb_bits": 4, "group": 64, "rates": [0.01, 0.05, 0.1], "thresholds": [0.02, 0.06, 0.16],
             "quantizer": QUANTIZER}
    assert threshold_for_rate(table, 0.05) == 0.06
    assert threshold_for_rate(table, 0.075) == pytest.approx(0.11)
    assert resolve_threshold(QuantSetting(4, 4, None, 0.02), 64, shape, (table,)) == pytest.approx(0.03)
    with pytest.raises(DynapruneError, match="outside the calibrated"):
        threshold_for_rate(table, 0.2)
    with pytest.raises(DynapruneError, match="no calibrated threshold for 3\\+4"):
        resolve_threshold(QuantSetting(3, 4, None, 0.02), 64, shape, (table,))
    # a table of another rotation, value residual or of the earlier quantizer is not used
    for other in ({"rotate": "kv"}, {"value_residual": True}, {"quantizer": None}):
        with pytest.raises(DynapruneError, match="no calibrated threshold"):
            resolve_threshold(QuantSetting(4, 4, None, 0.02), 64, shape, ({**table, **other},))
    rotated = {**table, "rotate": "kv", "value_residual": True}
    assert resolve_threshold(QuantSetting(4, 4, None, 0.02), 64, shape, (rotated,), rotate="kv",
                             value_residual=True) == pytest.approx(0.03)


def test_thresholds_from_histogram_against_sorted_rows() -> None:
    rows = torch.rand(5000, generator=torch.Generator().manual_seed(0)) ** 2
    hist = torch.histc(rows, bins=HISTOGRAM_BINS, min=0.0, max=1.0)
    for rate, threshold in zip((0.02, 0.05, 0.1), thresholds_from_histogram(hist, (0.02, 0.05, 0.1)), strict=True):
        # the oracle, counting rows: at least the rate below T, less than it below the edge one bin lower
        assert float((rows < threshold).float().mean()) >= rate
        assert float((rows < threshold - 1 / HISTOGRAM_BINS).float().mean()) < rate


def test_a_run_fetches_lsbs_where_the_threshold_says_and_counts_them(model) -> None:
    ids = torch.randint(0, 64, (1, 150), generator=torch.Generator().manual_seed(1))
    fractions = []
    for threshold in (0.0, 0.3, 1.0):
        ctx = make_context(f"quant=4+4@{threshold},quant_group=16", model, trace=True)
        cache = model.new_cache(1, 150)
        model(ids[:, :130], cache=cache, ctx=ctx)
        model(ids[:, 130:], cache=cache, ctx=ctx)
        s = ctx.summary()
        fractions.append(s["lsb_row_fraction"])
        assert s["query_bits_fetched_vs_fp16"] == 1.0  # Q is not quantized
        assert ctx.work.storage == "simulated"
    assert fractions[0] == 0.0 and 0.0 < fractions[1] < 1.0 and fractions[2] == 1.0


def test_value_residual_reads_a_sequence_shorter_than_a_group_in_full_precision(model) -> None:
    """10 tokens, groups of 16: no key group is complete, so with quant_value_residual=on every K and V
    a query reads is full precision (the dense logits); without it the values are 2-bit (other logits)."""
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        dense = model(ids)
        fp = model(ids, ctx=make_context("quant=2,quant_group=16,quant_value_residual=on,quant_rotate=kv", model))
        quantized = model(ids, ctx=make_context("quant=2,quant_group=16,quant_rotate=kv", model))
    dense, fp, quantized = (getattr(x, "logits", x) for x in (dense, fp, quantized))
    torch.testing.assert_close(fp, dense, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(quantized, dense, rtol=1e-3, atol=1e-3)


def test_shipped_tables_are_distinct_monotone_and_resolve_by_their_setting() -> None:
    from dynaprune.prune.techniques.progressive_quant import shipped_thresholds

    tables = shipped_thresholds()
    settings = {(t["msb_bits"], t["lsb_bits"], t["group"], t.get("rotate", ""), t.get("value_residual", False),
                 tuple(t["shape"].values())) for t in tables}
    assert len(settings) == len(tables)  # one table a setting (4+4, 5+3, 6+2 ... on SmolLM2)
    for t in tables:
        assert t["quantizer"] == QUANTIZER and t["msb_bits"] + t["lsb_bits"] <= 16
        assert all(a <= b for a, b in zip(t["thresholds"][:-1], t["thresholds"][1:], strict=True))
        shape = SimpleNamespace(**t["shape"])
        i = t["rates"].index(0.05)
        found = resolve_threshold(QuantSetting(t["msb_bits"], t["lsb_bits"], None, 0.05), t["group"], shape,
                                  rotate=t.get("rotate", ""), value_residual=t.get("value_residual", False))
        assert found == t["thresholds"][i]

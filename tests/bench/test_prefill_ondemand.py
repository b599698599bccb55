"""The on-demand variant names of benchmarks/prefill.py and benchmarks/prefill_ondemand.py: the knobs they
carry, the aux cache holding every pruned token (prefill_revive = 1 - keep), bad names refused."""

from __future__ import annotations

import pytest

from benchmarks.prefill import parse_ondemand
from benchmarks.prefill_ondemand import parse_variant
from dynaprune.runtime.revival_on_demand import OnDemand


def test_on_demand_names_carry_their_knobs_and_revive_every_pruned_token():
    v = parse_ondemand("prefill_keep=0.35,prefill_layer=3,prefill_window=128@r=8,t=0.001,b=0.5,p=3")
    assert v["recipe"] == "prefill_keep=0.35,prefill_layer=3,prefill_window=128,prefill_revive=0.65"
    assert v["ondemand"] == OnDemand(per_step=8, threshold=0.001, budget=0.5, pool=3)
    assert parse_ondemand("prefill=0.7") == {"recipe": "prefill=0.7"}  # no '@': the recipe as it is
    assert parse_variant("prefill_keep=0.5@r=4")["stepwise"] is True
    assert parse_variant("prefill_keep=0.5,prefill_revive=0.4")["ondemand"] is None
    assert parse_variant("dense-stepwise") == {"name": "dense-stepwise", "recipe": None, "ondemand": None,
                                               "stepwise": True}


@pytest.mark.parametrize("name", ["prefill_keep=0.5@x=3", "prefill=0.7@r=4"])
def test_bad_on_demand_names_exit(name):
    with pytest.raises(SystemExit):
        parse_ondemand(name)

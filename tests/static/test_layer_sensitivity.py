"""The sensitivity layer criterion (guide section 3) against its oracle: the calibration loss of a copy
with that layer physically removed; pruning by it drops the layer whose removal costs least."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured import tiny_bert

from dynaprune.static import remove_layers
from dynaprune.static.calib import Batch, Calibration
from dynaprune.static.criteria import LAYER_CRITERIA
from dynaprune.static.prune import StaticConfig, prune_model


def calibration() -> Calibration:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (3, 9), generator=g)
    return Calibration("random", [Batch(ids, torch.ones_like(ids, dtype=torch.bool))])


def test_sensitivity_scores_equal_the_loss_without_the_layer():
    m, calib = tiny_bert(), calibration()
    scores = LAYER_CRITERIA["sensitivity"](m, calib)
    oracle = []
    for i in range(3):
        c = copy.deepcopy(m)
        remove_layers(c, [i])
        with torch.no_grad():
            oracle.append(float(calib.loss(c, calib.batches[0])))
    assert scores.tolist() == pytest.approx(oracle, rel=1e-5)
    assert len(set(round(x, 6) for x in oracle)) == 3  # distinct: the ranking is meaningful
    pruned = copy.deepcopy(m)
    record = prune_model(pruned, calib, StaticConfig(layers=1, layer_criterion="sensitivity"))
    assert record["removed_layers"] == [int(torch.tensor(oracle).argmin())]
    assert len(pruned.layers) == 2

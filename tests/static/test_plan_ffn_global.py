"""Global FFN ranking across layers (static/plan.ffn_to_remove_global) vs hand-computed and numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.static.plan import ffn_to_remove, ffn_to_remove_global


def test_hand_computed_example():
    # layer 0: [3, 4] / 5 = [0.6, 0.8]; layer 1: [1, 1, 1, 7] / sqrt(52) = [0.139 x3, 0.971]
    scores = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 7.0])]
    # 50% of 6 = 3 neurons: the three 0.139s of layer 1 (cap 0.9 of 4 = 3)
    assert ffn_to_remove_global(scores, 0.5, max_layer=0.9) == {1: [0, 1, 2]}
    # cap 0.5: layer 1 gives at most 2, then layer 0's 0.6 is next
    assert ffn_to_remove_global(scores, 0.5, max_layer=0.5) == {0: [0], 1: [0, 1]}


def test_matches_numpy_ranking_and_total():
    rng = np.random.default_rng(0)
    raw = [rng.gamma(2.0, scale, size=n) for scale, n in ((1.0, 64), (5.0, 64), (0.2, 32))]
    scores = [torch.tensor(r) for r in raw]
    out = ffn_to_remove_global(scores, 0.3, max_layer=0.99)
    normed = np.concatenate([r / np.linalg.norm(r) for r in raw])
    layer_of = np.concatenate([[k] * len(r) for k, r in enumerate(raw)])
    index_of = np.concatenate([np.arange(len(r)) for r in raw])
    want = round(0.3 * len(normed))
    expect: dict[int, list[int]] = {}
    for j in np.argsort(normed, kind="stable")[:want]:
        expect.setdefault(int(layer_of[j]), []).append(int(index_of[j]))
    assert out == {k: sorted(v) for k, v in sorted(expect.items())}
    assert sum(len(v) for v in out.values()) == want


def test_equal_scales_close_to_uniform_and_cap_holds():
    scores = [torch.arange(1.0, 101.0) for _ in range(3)]  # identical layers: the global ranking is uniform
    assert ffn_to_remove_global(scores, 0.3) == ffn_to_remove(scores, 0.3)
    # layer 0 normalized: 99 x ~0.001 (below every layer-1 value, >= 1/581): the cap stops it at 60
    skewed = [torch.cat([torch.ones(99), torch.tensor([1000.0])]), torch.arange(1.0, 101.0)]
    out = ffn_to_remove_global(skewed, 0.4, max_layer=0.6)
    assert out[0] == list(range(60)) and out[1] == list(range(20))


def test_bad_ratio_or_cap():
    with pytest.raises(DynapruneError, match="--ffn must lie"):
        ffn_to_remove_global([torch.ones(4)], 1.0)
    with pytest.raises(DynapruneError, match="cap"):
        ffn_to_remove_global([torch.ones(4)], 0.3, max_layer=1.0)

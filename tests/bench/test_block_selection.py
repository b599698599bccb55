"""The blocks benchmark's HDP block selection and 2:4 pruning against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.blocks import block_scores, hdp_block_keep
from benchmarks.sparse24 import prune_2_4


def test_block_scores_match_the_loops():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 24, 5, generator=g), torch.randn(2, 3, 24, 5, generator=g)
    b = 8
    for score in ("abs_sum", "sum"):
        got = block_scores(q, k, b, score)
        for bi in range(2):
            for h in range(3):
                for i in range(3):
                    for j in range(3):
                        prods = q[bi, h, i * b:(i + 1) * b] @ k[bi, h, j * b:(j + 1) * b].T
                        want = prods.abs().sum() if score == "abs_sum" else prods.sum()
                        assert float(got[bi, h, i, j]) == pytest.approx(float(want), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9])
def test_keep_is_the_top_visible_blocks_with_the_diagonal(sparsity):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 2, 7, 7, generator=g)
    keep = hdp_block_keep(scores, sparsity)
    for b in range(2):
        for h in range(2):
            for i in range(7):
                n_keep = max(1, math.ceil((1 - sparsity) * (i + 1) - 1e-9))
                others = sorted(range(i), key=lambda j: -float(scores[b, h, i, j]))
                want = {i, *others[: n_keep - 1]}
                assert {j for j in range(7) if keep[b, h, i, j]} == want


def test_prune_2_4_keeps_the_two_largest_of_every_four():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 16, generator=g)
    p = prune_2_4(w)
    for r in range(5):
        for c in range(0, 16, 4):
            group = w[r, c:c + 4].abs().tolist()
            top = set(sorted(range(4), key=lambda i: -group[i])[:2])
            assert {i for i in range(4) if p[r, c + i] != 0} == top
            assert all(p[r, c + i] == w[r, c + i] for i in top)

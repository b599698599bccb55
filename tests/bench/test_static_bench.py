"""benchmarks/static.py pieces: the CSR linear computes what nn.Linear does on the same (sparse) weight;
the FLOP ratio it prints for a pruned model is the per-layer count's."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "static"))
from test_structured import tiny_bert  # noqa: E402

from benchmarks.static import CSRLinear, dense_flops, to_csr  # noqa: E402
from dynaprune.static import remove_ffn_neurons  # noqa: E402
from dynaprune.static.criteria.nm import apply_nm  # noqa: E402


def test_csr_linear_equals_dense_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(CSRLinear(lin)(x), lin(x))


def test_csr_model_equals_model_with_zeros():
    m = tiny_bert()
    apply_nm(m, 2, 4)
    ids = torch.randint(0, 60, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(to_csr(m)(ids, mask)[0], m(ids, mask)[0], rtol=1e-5, atol=1e-5)


def test_flop_ratio_of_a_pruned_model():
    parent = tiny_bert()  # hidden 32, 3 layers, FFN 48: FFN is 2 * 2 L d f of each layer
    m = copy.deepcopy(parent)
    remove_ffn_neurons(m, 0, range(24))
    L = 10
    assert dense_flops(parent, [L]) - dense_flops(m, [L]) == 2 * 2 * L * 32 * 24

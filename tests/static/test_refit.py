"""The FFN down-projection refit (static/refit.py) vs independent oracles: with nothing removed and no
ridge it gives back the dense layer; on the first layer it equals a brute-force torch.linalg.lstsq over the
stacked calibration activations; it never reconstructs worse than plain removal; bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured import tiny_bert, tiny_llama

from dynaprune.errors import DynapruneError
from dynaprune.static.calib import Batch, Calibration
from dynaprune.static.refit import RefitConfig, prune_ffn_refit
from dynaprune.static.structured import remove_ffn_neurons


def calib(n_batches: int = 4, length: int = 20) -> Calibration:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, 60, (4, length), generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[0, length - 5:] = False  # padding must not count
        batches.append(Batch(ids, mask))
    return Calibration("random", batches)


def test_nothing_removed_gives_back_the_dense_layer():
    m = tiny_bert()
    ref = copy.deepcopy(m)
    prune_ffn_refit(m, calib(), {0: [], 1: []}, RefitConfig("output", ridge=0.0))
    for i in (0, 1):
        assert torch.allclose(m.layers[i].fc2.weight, ref.layers[i].fc2.weight, atol=1e-4)
        assert torch.allclose(m.layers[i].fc2.bias, ref.layers[i].fc2.bias, atol=1e-4)


def test_first_layer_refit_equals_brute_force_lstsq():
    m, cal = tiny_bert(), calib()
    ref = copy.deepcopy(m)
    hs, ys = [], []
    pre = ref.layers[0].fc2.register_forward_pre_hook(lambda mod, a: hs.append(a[0]))
    post = ref.layers[0].fc2.register_forward_hook(lambda mod, a, o: ys.append(o))
    with torch.no_grad():
        for b in cal:
            ref(b.ids, b.mask)
    pre.remove()
    post.remove()
    mask = torch.cat([b.mask.reshape(-1) for b in cal])
    h = torch.cat([x.reshape(-1, 48) for x in hs])[mask].double()
    y = torch.cat([x.reshape(-1, 32) for x in ys])[mask].double()
    drop = [1, 5, 7, 20, 33, 40, 47]
    keep = [i for i in range(48) if i not in drop]
    a = torch.cat([h[:, keep], torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    sol = torch.linalg.lstsq(a, y).solution  # (|keep| + 1, 32)
    report = prune_ffn_refit(m, cal, {0: drop}, RefitConfig("output", ridge=0.0))
    fc2 = m.layers[0].fc2
    assert fc2.in_features == len(keep)
    assert torch.allclose(fc2.weight.double(), sol[:-1].T, atol=1e-3)
    assert torch.allclose(fc2.bias.double(), sol[-1], atol=1e-3)
    brute = float((a @ sol - y).pow(2).sum() / y.pow(2).sum())
    assert report["0"]["error_refit"] == pytest.approx(brute, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("target", ["output", "residual"])
def test_refit_reconstructs_better_than_plain_removal(target):
    m, cal = tiny_bert(), calib()
    removed = {0: list(range(0, 48, 3)), 1: list(range(1, 48, 4)), 2: list(range(2, 48, 5))}
    sliced = copy.deepcopy(m)
    for layer, drop in removed.items():
        remove_ffn_neurons(sliced, layer, [i for i in range(48) if i not in drop])
    report = prune_ffn_refit(m, cal, removed, RefitConfig(target, ridge=1e-6))
    for layer in report.values():
        assert layer["error_refit"] <= layer["error_slice"] + 1e-9
        assert layer["error_refit"] < layer["error_slice"]
    b = cal.batches[0]
    with torch.no_grad():
        dense = tiny_bert()(b.ids, b.mask)[0][b.mask]
        refit = m(b.ids, b.mask)[0][b.mask]
        plain = sliced(b.ids, b.mask)[0][b.mask]
    assert (refit - dense).pow(2).sum() < (plain - dense).pow(2).sum()


def test_bad_input():
    with pytest.raises(DynapruneError, match="residual"):
        prune_ffn_refit(tiny_llama(), calib(), {0: [1]}, RefitConfig("residual"))
    with pytest.raises(DynapruneError, match="unknown FFN refit target"):
        prune_ffn_refit(tiny_bert(), calib(), {0: [1]}, RefitConfig("nope"))
    with pytest.raises(DynapruneError, match="ridge"):
        prune_ffn_refit(tiny_bert(), calib(), {0: [1]}, RefitConfig("output", ridge=-1.0))


def test_prune_model_with_refit_records_it_and_beats_plain_removal():
    from dynaprune.static.prune import StaticConfig, prune_model

    cal = calib()
    dense = tiny_bert()
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, cal, StaticConfig(ffn=0.3, criterion="magnitude"))
    record = prune_model(refit, cal, StaticConfig(ffn=0.3, criterion="magnitude", ffn_refit="residual"))
    assert set(record["ffn_refit"]) == {"0", "1", "2"}
    assert [b.fc2.in_features for b in refit.layers] == [b.fc2.in_features for b in plain.layers] == [34] * 3
    b = cal.batches[1]
    with torch.no_grad():
        ref = dense(b.ids, b.mask)[0][b.mask]
        err_refit = (refit(b.ids, b.mask)[0][b.mask] - ref).pow(2).sum()
        err_plain = (plain(b.ids, b.mask)[0][b.mask] - ref).pow(2).sum()
    assert err_refit < err_plain

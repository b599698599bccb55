"""Static pruning vs independent oracles: head removal == zeroing that head's output (exact), FFN neuron
removal == zeroing its activation, layer removal == skipping the block; Taylor vs finite differences;
N:M and magnitude invariants; checkpoint round trip; CLI bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.bert import Bert, BertConfig
from dynaprune.models.llama import Llama
from dynaprune.models.llama_config import LlamaConfig
from dynaprune.static import remove_ffn_neurons, remove_heads, remove_layers
from dynaprune.static.calib import Batch, Calibration
from dynaprune.static.criteria.magnitude import exponential_schedule, magnitude_prune
from dynaprune.static.criteria.nm import apply_nm, nm_mask, parse_nm
from dynaprune.static.criteria.probe import taylor


def tiny_bert() -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=60, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48)).eval()


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=60, hidden=48, layers=3, heads=6, kv_heads=2, head_dim=8, intermediate=40)
    return Llama(cfg).eval()


def run(model, ids):
    with torch.no_grad():
        if isinstance(model, Bert):
            return model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        return model(ids)


def zero_head_columns(linear, heads, D):
    with torch.no_grad():
        for h in heads:
            linear.weight[:, h * D:(h + 1) * D] = 0


def test_bert_head_removal_equals_zeroed_head_output():
    m, ids = tiny_bert(), torch.randint(0, 60, (2, 9))
    ref = copy.deepcopy(m)
    zero_head_columns(ref.layers[1].proj, [1, 3], 8)
    remove_heads(m, 1, [0, 2])
    assert m.layers[1].qkv.weight.shape == (3 * 2 * 8, 32) and m.layers[1].proj.weight.shape == (32, 16)
    assert m.config.layer_heads == [4, 2, 4]
    torch.testing.assert_close(run(m, ids), run(ref, ids), rtol=1e-5, atol=1e-5)
    # and the zeroing matters (the test can fail): the unpruned model differs
    assert (run(tiny_bert(), ids) - run(m, ids)).abs().max() > 1e-3


def test_llama_head_removal_equals_zeroed_head_output():
    m, ids = tiny_llama(), torch.randint(0, 60, (2, 7))
    ref = copy.deepcopy(m)
    zero_head_columns(ref.layers[2].attention.wo, [0, 4], 8)  # one query head in each KV group of 3
    remove_heads(m, 2, [1, 2, 3, 5])
    assert m.config.layer_heads == [6, 6, 4]
    torch.testing.assert_close(run(m, ids), run(ref, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(DynapruneError, match="KV group"):
        remove_heads(m, 0, [0, 1, 2, 3])  # group 0 keeps 3, group 1 keeps 1


def test_ffn_and_layer_removal_equal_zeroing_and_skipping():
    for make in (tiny_bert, tiny_llama):
        m, ids = make(), torch.randint(0, 60, (2, 7))
        ref = copy.deepcopy(m)
        down = ref.layers[0].fc2 if isinstance(m, Bert) else ref.layers[0].feed_forward.w2
        with torch.no_grad():
            down.weight[:, [3, 7, 11]] = 0
        width = down.in_features
        remove_ffn_neurons(m, 0, [i for i in range(width) if i not in (3, 7, 11)])
        torch.testing.assert_close(run(m, ids), run(ref, ids), rtol=1e-5, atol=1e-5)
        ref.layers[1].register_forward_hook(lambda mod, args, out: args[0])
        remove_layers(m, [1])
        assert len(m.layers) == 2
        torch.testing.assert_close(run(m, ids), run(ref, ids), rtol=1e-5, atol=1e-5)
        with pytest.raises(DynapruneError, match="leaves none"):
            remove_layers(m, [0, 1])
        with pytest.raises(DynapruneError, match="every one"):
            remove_heads(m, 0, [])


def test_taylor_head_importance_matches_finite_differences():
    m = tiny_bert().double()
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (3, 6))
    calib = Calibration("random", [Batch(ids, torch.ones_like(ids, dtype=torch.bool))])
    scores = taylor(m, calib, "heads")
    # oracle: scale head h's output columns by (1 +- eps), central difference of the loss
    eps, layer, D = 1e-6, 1, 8
    for h in range(4):
        losses = []
        for sign in (1, -1):
            mm = copy.deepcopy(m)
            with torch.no_grad():
                mm.layers[layer].proj.weight[:, h * D:(h + 1) * D] *= 1 + sign * eps
                losses.append(float(calib.loss(mm, calib.batches[0])))
        fd = abs(losses[0] - losses[1]) / (2 * eps)
        assert float(scores[layer][h]) == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_nm_mask_invariants():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    for n, m in ((2, 4), (4, 8)):
        mask = nm_mask(w, n, m)
        groups = mask.view(6, -1, m)
        assert bool((groups.sum(-1) == n).all())
        # the kept ones are the n largest of each group (brute force)
        for r in range(6):
            for g in range(16 // m):
                vals = w[r, g * m:(g + 1) * m].abs()
                kept = vals[mask[r, g * m:(g + 1) * m]]
                assert float(kept.min()) >= float(vals[~mask[r, g * m:(g + 1) * m]].max())
    with pytest.raises(DynapruneError, match="multiple of M"):
        nm_mask(torch.randn(2, 6), 2, 4)
    for bad in ("4:4", "3:2", "0:4", "2-4"):
        with pytest.raises(DynapruneError):
            parse_nm(bad)
    model = tiny_bert()
    apply_nm(model, 2, 4)
    lin = model.layers[0].fc1.weight
    assert float((lin == 0).float().mean()) == pytest.approx(0.5)


def test_exponential_schedule_and_magnitude():
    s = exponential_schedule(0.75, 2)
    assert s == pytest.approx([0.5, 0.75])  # each step halves what is alive
    model = tiny_bert()
    magnitude_prune(model, 0.75, 2)
    w = model.layers[2].fc2.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=1 / w.numel())
    with pytest.raises(DynapruneError):
        exponential_schedule(1.0, 2)


def test_round_trip_and_shape_mismatch(tmp_path):
    from dynaprune import load
    from dynaprune.static.checkpoint import save_pruned

    for make in (tiny_bert, tiny_llama):
        m, ids = make(), torch.randint(0, 60, (1, 8))
        m.tokenizer = None
        remove_layers(m, [0])
        remove_heads(m, 1, [0, 1, 3, 4] if isinstance(m, Llama) else [2, 3])
        width = (m.layers[0].fc1.out_features if isinstance(m, Bert) else m.layers[0].feed_forward.w2.in_features)
        remove_ffn_neurons(m, 0, list(range(0, width, 2)))
        out = tmp_path / type(m).__name__
        save_pruned(m, out, {"test": True})
        back = load(out)
        torch.testing.assert_close(run(back, ids), run(m, ids))
        with pytest.raises(DynapruneError, match="exists"):
            save_pruned(m, out, {})
        cfg = json.loads((out / "config.json").read_text())
        cfg["dynaprune_layer_intermediate"][0] += 2  # recorded shape disagrees with the tensors
        (out / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(DynapruneError):
            load(out)

"""HDP calibration against brute force: critical ratios vs the block rule at many rho_B, the exact
quantile vs a dense rho_B grid, an end-to-end calibration of a tiny decoder vs the sparsity its recipe
then measures, and bad input through the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaprune.calibrate.hdp import (
    CalibrationSpec,
    calibrate_model,
    critical_ratios,
    ratio_for_sparsity,
    write_recipe_file,
)
from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.hdp import block_keep_mask, forced_blocks, row_thresholds
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.pruning import make_context, merge_summaries


def brute_sparsity(samples, rho):
    """Block sparsity of the block rule itself (block_keep_mask) at ``rho`` over (importance, valid, forced)."""
    kept = total = 0
    for importance, valid, forced in samples:
        keep = block_keep_mask(importance, row_thresholds(importance, rho, valid), valid, always_keep=forced)
        kept += int(keep.sum())
        total += int(valid.expand(importance.shape).sum())
    return 1 - kept / total


@st.composite
def importance_cases(draw):
    nbq, nbk = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    small = draw(st.booleans())  # many ties
    values = st.integers(-3, 3) if small else st.integers(-50, 50)
    imp = torch.tensor([[draw(values) for _ in range(nbk)] for _ in range(nbq)], dtype=torch.float64)
    valid = torch.tensor([[draw(st.booleans()) or j == 0 for j in range(nbk)] for _ in range(nbq)])
    forced = forced_blocks(nbq, nbk, 1, causal=draw(st.booleans()), keep_first_block=draw(st.booleans()))
    return imp, valid, forced


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(importance_cases(), st.lists(st.floats(-1, 1), min_size=1, max_size=8))
def test_critical_ratio_says_exactly_when_a_block_is_kept(case, rhos):
    imp, valid, forced = case
    r = critical_ratios(imp, valid, forced)
    for rho in rhos:
        if bool(((r - rho).abs() < 1e-9).any()):
            continue  # exactly on a boundary: rounding decides, calibration never picks such a rho
        keep = block_keep_mask(imp, row_thresholds(imp, rho, valid), valid, always_keep=forced)
        assert keep[valid].tolist() == (r >= rho).tolist()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(importance_cases(), min_size=1, max_size=3), st.floats(0, 0.99))
def test_quantile_is_the_nearest_reachable_sparsity(cases, target):
    result = ratio_for_sparsity([critical_ratios(*c) for c in cases], target)
    assert -1 <= result.value <= 1
    assert result.achieved == pytest.approx(brute_sparsity(cases, result.value), abs=1e-12)
    grid = [brute_sparsity(cases, i / 50 - 1) for i in range(101)]
    assert abs(result.achieved - target) <= min(abs(s - target) for s in grid) + 1e-12


def test_quantile_bad_input():
    with pytest.raises(DynapruneError, match=r"\[0, 1\)"):
        ratio_for_sparsity(torch.zeros(3), 1.0)
    with pytest.raises(DynapruneError, match="no valid block"):
        ratio_for_sparsity(torch.zeros(0), 0.5)
    with pytest.raises(DynapruneError, match=r"\[0, 1\)"):
        CalibrationSpec(-0.1)
    with pytest.raises(DynapruneError, match="head sparsity"):
        CalibrationSpec(0.5, head_sparsity=1.5)
    with pytest.raises(DynapruneError, match="block score"):
        CalibrationSpec(0.5, block_score="mean")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) % 50 for c in text])


@pytest.fixture(scope="module")
def one_layer_decoder():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=50, hidden=32, layers=1, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    return Llama(cfg, tokenizer=CharTokenizer()).eval()


@pytest.mark.parametrize("score", ["abs_sum", "max"])
def test_calibrated_recipe_measures_the_calibrated_sparsity(one_layer_decoder, tmp_path, score):
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    spec = CalibrationSpec(0.6, head_sparsity=0.25, block_size=2, block_score=score)
    result = calibrate_model(one_layer_decoder, text, spec, examples=2, window=64)
    assert result.examples == 2 and abs(result.block.achieved - 0.6) <= 0.01
    recipe = result.recipe
    assert recipe.block == result.block.value and recipe.block_score == score and recipe.fixed == (8, 8)
    # one layer: the pruned run sees the very scores calibration saw, so it measures the same sparsity
    ids = one_layer_decoder.tokenizer(text.read_text()).input_ids
    contexts = []
    with torch.no_grad():
        for piece in (ids[:64], ids[64:128]):
            contexts.append(make_context(recipe, one_layer_decoder))
            one_layer_decoder(torch.tensor(piece)[None], ctx=contexts[-1])
    hdp = merge_summaries(contexts)["hdp"]
    assert hdp["block_sparsity"] == pytest.approx(result.block.achieved, abs=1e-12)
    assert hdp["head_sparsity"] == pytest.approx(result.head.achieved, abs=1e-12)
    # and the recipe file reads back to the same recipe
    path = write_recipe_file(tmp_path / "r.txt", recipe, ["calibrated", "on a test"])
    assert Recipe.parse(f"@{path}") == recipe


def test_calibration_refuses_bad_base_and_empty_data(one_layer_decoder, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("some text for the model " * 4)
    with pytest.raises(DynapruneError, match="base recipe"):
        calibrate_model(one_layer_decoder, text, CalibrationSpec(0.5), base_recipe="block=0.2")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DynapruneError, match="empty"):
        calibrate_model(one_layer_decoder, empty, CalibrationSpec(0.5))
    with pytest.raises(DynapruneError, match="not found"):
        calibrate_model(one_layer_decoder, tmp_path / "missing.txt", CalibrationSpec(0.5))


@pytest.mark.parametrize("target", ["1.0", "-0.1", "1.5"])
def test_cli_target_outside_range(dynaprune_cli, tmp_path, target):
    code, text = dynaprune_cli("calibrate", "minilm-l6", "--target-sparsity", target,
                               "-o", str(tmp_path / "r.txt"))
    assert code == 2 and "[0, 1)" in text and "Traceback" not in text


def test_cli_missing_and_empty_data(dynaprune_cli, tmp_path):
    code, text = dynaprune_cli("calibrate", "minilm-l6", "--target-sparsity", "0.75",
                               "--data", str(tmp_path / "nope.tsv"), "-o", str(tmp_path / "r.txt"))
    assert code == 2 and "calibration data not found" in text
    (tmp_path / "empty.tsv").write_text("")
    code, text = dynaprune_cli("calibrate", "minilm-l6", "--target-sparsity", "0.75",
                               "--data", str(tmp_path / "empty.tsv"), "-o", str(tmp_path / "r.txt"))
    assert code == 2 and "is empty" in text


def test_cli_unreadable_recipe_file(dynaprune_cli, tmp_path):
    code, text = dynaprune_cli("eval", "minilm-l6", "sts", "--recipe", f"@{tmp_path / 'nope.txt'}")
    assert code == 2 and "cannot be read" in text and "Traceback" not in text


def test_recorder_sees_the_sliding_window_of_a_gemma_layer(tmp_path):
    """Tiny Gemma 3 (window 8) on 40 tokens: each layer's theta_head is taken over the pairs that layer
    attends (brute-force band for sliding layers, the causal triangle for global ones), and a whole
    calibration runs beyond the window."""
    import sys
    from pathlib import Path

    from dynaprune.calibrate.hdp import ScoreRecorder
    from dynaprune.prune.hdp import head_importance, integer_scores, to_fixed_point
    from dynaprune.runtime.attention import RunContext

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prune"))
    from kv_oracle import QKOracle

    from tests.models.test_gemma3 import TINY, tiny

    model = tiny()
    ids = torch.randint(0, TINY.vocab, (1, 40), generator=torch.Generator().manual_seed(6))
    spec = CalibrationSpec(0.5)
    recorder, oracle = ScoreRecorder(spec), QKOracle()
    with torch.no_grad():
        model(ids, ctx=recorder.wrap(RunContext()))
        model(ids, ctx=oracle)
    assert recorder.calls == TINY.layers
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    for layer, theta in enumerate(recorder.head_thetas):
        q, k = oracle.qk[layer]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        band = (j <= i) & ((j > i - TINY.sliding_window) if TINY.is_sliding(layer) else True)
        s = integer_scores(to_fixed_point(q, spec.int_bits, spec.frac_bits),
                           to_fixed_point(k, spec.int_bits, spec.frac_bits))
        torch.testing.assert_close(theta, head_importance(s * band).reshape(-1).double())
        if TINY.is_sliding(layer):  # not vacuous: the causal triangle gives another theta
            assert not torch.allclose(theta, head_importance(s * (j <= i)).reshape(-1).double())
    model.tokenizer = lambda text, add_special_tokens=False: SimpleNamespace(input_ids=[ord(c) % 97 for c in text])
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    result = calibrate_model(model, text, CalibrationSpec(0.5, tolerance=0.05), examples=2, window=40)
    assert result.calls == 2 * TINY.layers and abs(result.block.achieved - 0.5) <= 0.05

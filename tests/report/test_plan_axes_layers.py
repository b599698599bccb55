"""What the demo runs (a sweep or a list of sweeps), the work axes and the per-layer profiles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import load_config
from dynaprune.report.axes import head_share, work_axes
from dynaprune.report.layers import profiles
from dynaprune.report.plan import sweep_configs
from dynaprune.report.results import Group

REPO = Path(__file__).resolve().parents[2]


def test_plan_lists_globs_and_single_sweeps(tmp_path):
    (tmp_path / "configs").mkdir()
    for name in ("a.yaml", "smollm2-x.yaml", "smollm2-y.yaml"):
        (tmp_path / "configs" / name).write_text("runs: []\n")
    demo = tmp_path / "full.yaml"
    demo.write_text("configs: [configs/a.yaml, 'configs/smollm2-*.yaml', 'configs/none-*.yaml', configs/a.yaml]\n")
    assert sweep_configs(demo, base=tmp_path) == [Path("configs/a.yaml"), Path("configs/smollm2-x.yaml"),
                                                  Path("configs/smollm2-y.yaml")]
    assert sweep_configs(tmp_path / "configs" / "a.yaml", base=tmp_path) == [tmp_path / "configs" / "a.yaml"]


@pytest.mark.parametrize("body, message", [
    ("configs: [configs/missing.yaml]\n", "listed sweep config not found: configs/missing.yaml"),
    ("name: x\n", "needs a 'runs:' list"),
    ("configs: [\n", "not valid YAML"),
])
def test_plan_errors(tmp_path, body, message):
    demo = tmp_path / "full.yaml"
    demo.write_text(body)
    with pytest.raises(DynapruneError, match=message):
        sweep_configs(demo, base=tmp_path)


def test_shipped_demo_configs_are_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    full = sweep_configs("configs/demo-full.yaml")
    assert [p.name for p in full] == ["spatten-minilm.yaml", "hdp-minilm.yaml", "spatten-smollm2-kv.yaml",
                                      "smollm2-generate.yaml", "smollm2-stream.yaml"]
    for path in [*full, *sweep_configs("configs/demo.yaml")]:
        _, specs = load_config(path)
        assert specs


def test_work_axes():
    assert work_axes({"metric": {}}) == {"flops_kept": 1.0, "attention_kept": 1.0, "kv_bytes_kept": 1.0,
                                         "bits_kept": 1.0}
    cost = {"flops_kept": 0.7, "attention_flops_kept": 0.4, "kv_bytes_kept": 0.8, "shape": {"heads": 4, "kv_heads": 4},
            "pruning": {"tokens_per_layer": [10, 10], "heads_per_layer_last_call": [4, 2]}}
    # head pruning by hand: layer 0 computes 10 tokens x 4 heads, layer 1 10 x 2, of 80 = 0.75
    assert head_share(cost) == pytest.approx(0.75)
    gqa = {**cost, "shape": {"heads": 4, "kv_heads": 2}}  # a pruned query head may not spare its K/V
    assert head_share(gqa) == 1.0


def test_bits_axis_of_real_runs_against_the_operand_widths():
    """quant=8: K and V fetched at 8 of 16 bits plus a 32-bit scale and zero-point per group (keys: 64
    tokens, +0.5 bit; values: head_dim = 8 channels, +4 bits), Q at 16, nothing else pruned. quant=4+4@0:
    K and V at 4 bits, the same overheads. Counted by a real (tiny) run."""
    from dynaprune.runtime.cost import cost_shape, work_cost
    from dynaprune.runtime.pruning import make_context, merge_summaries

    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    from test_pruning import batch, tiny_bert

    model, (ids, mask) = tiny_bert(), batch()
    for recipe, expected in (("quant=8", (16 + 8.5 + 12) / 48), ("quant=4+4@0", (16 + 4.5 + 8) / 48)):
        ctx = make_context(recipe, model)
        model(ids, mask, ctx=ctx)
        cost = {**work_cost(cost_shape(model), ctx.work), "pruning": merge_summaries([ctx])}
        assert work_axes({"cost": cost})["bits_kept"] == pytest.approx(expected)
    # a result from before issue 12 (no bits_fetched_vs_fp16) is still drawn, with its old estimate
    old = {"kv_bytes_kept": 1.0, "pruning": {"key_bits_fetched_vs_fp16": 0.21}}
    assert work_axes({"cost": old})["bits_kept"] == pytest.approx((0.21 + 1.0) / 2)


def row(recipe, tokens, heads):
    return {"recipe": recipe, "cost": {"shape": {"heads": 4}, "pruning": {
        "tokens_per_layer": tokens, "heads_per_layer_last_call": heads}}}


def test_profiles_skip_dense_shapes_and_merge_equal_ones():
    group = Group("m", "sts", None, "dev.tsv", 10, [
        {"recipe": "dense", "cost": {}}, row("quant=4", [10, 10], [4, 4]), row("token=0.5", [10, 5], [4, 4]),
        row("token=0.5,score=random", [10, 5], [4, 4]), row("head=0.5", [10, 10], [4, 2])])
    found, n_heads = profiles(group)
    assert n_heads == 4
    by_label = {p.label: p for p in found}
    assert sorted(by_label) == ["head=0.5", "token=0.5 (= token=0.5,score=random)"]
    assert by_label["head=0.5"].heads == [4, 2]
    assert by_label["token=0.5 (= token=0.5,score=random)"].tokens == [1.0, 0.5]

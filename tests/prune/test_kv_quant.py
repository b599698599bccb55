"""The quantized KV cache technique (prune/techniques/kv_quant.py): recipe keys, bad input, its place
after the KV budget, and the decode protocols it runs under."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.recipe_scope import check_recipe_applies
from dynaprune.runtime.pruning import make_context


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=48, max_positions=256
    )
    return Llama(cfg, tokenizer=_CharTokenizer(), name="tiny").eval()


def test_keys_round_trip_and_compose() -> None:
    r = Recipe.parse("kv_residual=64,kv_group=32,kv_bits=4")
    assert str(r) == "kv_bits=4,kv_group=32,kv_residual=64"
    assert Recipe.parse(str(r)) == r
    both = Recipe.parse("kv=0.5,kv_bits=4")
    assert {t.role for t in both.techniques} == {"kv", "kvstore"}
    apart = Recipe.parse("kv_key_bits=2,kv_value_bits=4")
    assert (apart.techniques[0].key_bits, apart.techniques[0].value_bits) == (2, 4)
    over = Recipe.parse("kv_bits=4,kv_key_bits=8")
    assert (over.techniques[0].key_bits, over.techniques[0].value_bits) == (8, 4)


@pytest.mark.parametrize(
    "recipe, key, words",
    [
        ("kv_bits=0", "kv_bits", "outside 1..16"),
        ("kv_bits=17", "kv_bits", "outside 1..16"),
        ("kv_bits=four", "kv_bits", "not an integer"),
        ("kv_key_bits=20,kv_value_bits=4", "kv_key_bits", "outside 1..16"),
        ("kv_bits=4,kv_group=0", "kv_group", "below the minimum"),
        ("kv_group=64", "kv_group", "needs kv_bits"),
        ("kv_key_bits=4", "kv_key_bits", "needs kv_bits"),
        ("kv_bits=4,kv_residual=-1", "kv_residual", "below the minimum"),
    ],
)
def test_bad_keys_name_the_key(recipe: str, key: str, words: str) -> None:
    with pytest.raises(DynapruneError, match=rf"recipe key '{key}': .*{words}"):
        Recipe.parse(recipe)


def test_group_must_divide_head_dim(model: Llama) -> None:  # head_dim 16
    with pytest.raises(DynapruneError, match=r"recipe key 'kv_group': 12 does not divide head_dim=16.*kv_value_group"):
        make_context("kv_bits=4,kv_group=12", model)
    with pytest.raises(DynapruneError, match=r"recipe key 'kv_value_group': 6 does not divide head_dim=16"):
        make_context("kv_bits=4,kv_group=12,kv_value_group=6", model)
    ctx = make_context("kv_bits=4,kv_group=12,kv_value_group=8", model)  # keys group over tokens: any size
    assert (ctx.stages[0].spec.key_group, ctx.stages[0].spec.value_group) == (12, 8)


def test_refused_where_no_cache_is_decoded() -> None:
    r = Recipe.parse("kv_bits=4")
    with pytest.raises(DynapruneError, match="recipe key 'kv_bits': a quantized KV cache"):
        check_recipe_applies(r, "lm", protocol="window")
    with pytest.raises(DynapruneError, match="recipe key 'kv_bits'"):
        check_recipe_applies(r, "sts")
    check_recipe_applies(r, "lm", protocol="stream")
    check_recipe_applies(r, "generate")


def test_cli_bad_bits_one_line_exit_2(dynaprune_cli) -> None:
    code, out = dynaprune_cli("eval", "smollm2-135m", "lm", "--protocol", "continue", "--recipe", "kv_bits=17")
    assert code == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "kv_bits" in lines[0], out


def test_eviction_runs_before_packing(model: Llama) -> None:
    ctx = make_context("kv_tokens=40,kv_bits=4,kv_group=16", model)
    cache = model.new_cache(1, 64)
    ids = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :50], cache=cache, ctx=ctx)
        # evicted to 40 first, then 32 of them packed (two key groups of 16), 8 left in fp
        assert cache.lengths == [40, 40] and [p.tokens for p in cache.packed] == [32, 32]
        model(ids[:, 50:], cache=cache, ctx=ctx)  # 50 -> evict (unpacks, compacts) -> pack again
        assert cache.lengths == [40, 40] and [p.tokens for p in cache.packed] == [32, 32]


def test_stream_under_budget_and_bits_counts_bytes_per_step(model: Llama, tmp_path) -> None:
    from dynaprune.cli import run_task

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = run_task(
        "tiny",
        "lm",
        data=text,
        protocol="stream",
        stream_tokens=80,
        max_examples=2,
        recipe="kv_tokens=40,kv_bits=8,kv_group=16",
        model=model,
    )
    fp = run_task(
        "tiny", "lm", data=text, protocol="stream", stream_tokens=80, max_examples=2, recipe="kv_tokens=40", model=model
    )
    assert abs(out.metric["value"] - fp.metric["value"]) / fp.metric["value"] < 0.01  # 8 bits: ~no loss
    assert out.cost["kv_bytes_vs_fp16"] < fp.cost["kv_bytes_vs_fp16"] < 1.0
    # fp: step i (1..78) reads min(i, 40) tokens of the i a fp16 cache would hold
    steps = range(1, 79)
    assert fp.cost["kv_bytes_vs_fp16"] == pytest.approx(sum(min(i, 40) for i in steps) / sum(steps), abs=1e-12)


def test_scale_bits_and_rotation_keys(model: Llama) -> None:
    r = Recipe.parse("kv_rotate=k,kv_scale_bits=8,kv_bits=2,kv_group=16")
    assert str(r) == "kv_bits=2,kv_group=16,kv_scale_bits=8,kv_rotate=k"
    assert Recipe.parse(str(r)) == r
    spec = r.techniques[0].spec(16)
    assert (spec.scale_bits, spec.rotate) == (8, "k")
    for bad, key in (("kv_bits=4,kv_scale_bits=4", "kv_scale_bits"), ("kv_bits=4,kv_rotate=q", "kv_rotate")):
        with pytest.raises(DynapruneError, match=f"recipe key '{key}'"):
            Recipe.parse(bad)


def test_scale_bits_8_bytes_axis_hand_count(model: Llama) -> None:
    """One forward of 48 tokens packs 48 (3 key groups of 16) at 2 bits, 8-bit scales, value groups of 16
    (= head_dim): the next forward's read bytes are counted exactly."""
    ctx = make_context("kv_bits=2,kv_group=16,kv_scale_bits=8,kv_rotate=kv", model)
    cache = model.new_cache(1, 64)
    ids = torch.randint(0, 64, (1, 49), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids[:, :48], cache=cache, ctx=ctx)
        per_layer_head = (
            48 * 16 * 2 // 8 * 2  # K and V codes
            + 3 * 16 * 2
            + 3 * 2 * 2 * 2  # keys: u8 scale+zero per channel per block, fp16 step+base
            + 48 * 2
            + 3 * 2 * 2 * 2
        )  # values: u8 scale+zero per token, fp16 step+base per block
        assert cache.bytes_held(fp_bytes=2) == 2 * 2 * per_layer_head  # 2 layers x 2 KV heads
        model(ids[:, 48:], cache=cache, ctx=ctx)  # reads the packed context: the bytes axis
    assert ctx.work.kv_read_bytes == 2 * 2 * per_layer_head
    assert ctx.work.kv_read_bytes_dense == 2 * 2 * 48 * 16 * 2 * 2

"""Recipe: parsing, canonical string and JSON round trips, errors naming the key, schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaprune.errors import DynapruneError
from dynaprune.prune.recipe import (
    DEFAULT_TOKEN_REF_LEN,
    KEYS,
    QuantSetting,
    Recipe,
    keep_count,
    keep_counts,
)

# ---------------------------------------------------------------------------- parsing and printing


@pytest.mark.parametrize("text", ["", "dense", "  ", " dense "])
def test_dense_forms(text: str) -> None:
    recipe = Recipe.parse(text)
    assert recipe.is_dense and recipe == Recipe() and str(recipe) == "dense"


def test_parse_example_and_canonical_order() -> None:
    recipe = Recipe.parse(" quant=4+4@0.1 , head=0.9,token=0.5 ")
    assert recipe.token == 0.5 and recipe.head == 0.9
    assert recipe.quant == QuantSetting(4, 4, 0.1) and recipe.quant.progressive
    assert str(recipe) == "token=0.5,head=0.9,quant=4+4@0.1"
    assert not recipe.is_dense


def test_typed_values() -> None:
    recipe = Recipe.parse("kv_tokens=256,sink=4,recent=64,fixed=4.12,approx=on,block=-0.5,block_size=2")
    assert recipe.kv_tokens == 256 and recipe.kv is None and recipe.has_kv_budget
    assert Recipe.parse("quant=8").quant == QuantSetting(8) and not Recipe.parse("quant=8").quant.progressive
    assert recipe.fixed == (4, 12) and recipe.approx is True and recipe.block == -0.5
    assert Recipe.parse("kv=0.25").kv == 0.25
    assert Recipe.parse("kv=1").kv == 1.0 and Recipe.parse("kv=1").kv_budget_tokens(300) == 300  # share 1 = all
    assert Recipe.parse("token_schedule=1:0.9/2:0.8").token_schedule == ((1, 0.9), (2, 0.8))


def test_explicit_defaults_are_dense() -> None:
    assert Recipe.parse("score=spatten,head_unit=query,approx=off").is_dense


def test_constructor_accepts_string_forms_and_lists() -> None:
    recipe = Recipe(quant="6+4@0.05", token_schedule=[[1, 0.9], [3, 0.5]])
    assert recipe == Recipe.parse("quant=6+4@0.05,token_schedule=1:0.9/3:0.5")
    assert Recipe(fixed="8.8", token=0.5) == Recipe.parse("fixed=8.8,token=0.5")
    assert hash(recipe) == hash(Recipe.parse(str(recipe)))


@pytest.mark.parametrize("setting", ["4+4@0.1", "6+4@0.1", "8+4@0.1", "10+4@0.1", "12+4@0.1"])
def test_paper_quant_settings(setting: str) -> None:
    recipe = Recipe.parse(f"quant={setting}")
    assert recipe.quant.total_bits <= 16 and str(recipe) == f"quant={setting}"


# ---------------------------------------------------------------------------- round trips (hypothesis)

ratio = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False).filter(lambda x: x > 0)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[tuple[int, float], ...]:
    layers = sorted(draw(st.sets(st.integers(0, 40), min_size=1, max_size=5)))
    fractions = sorted(draw(st.lists(ratio, min_size=len(layers), max_size=len(layers))), reverse=True)
    return tuple(zip(layers, fractions, strict=True))


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    kw: dict = {}
    token_mode = draw(st.sampled_from(["none", "token", "schedule"]))
    if token_mode == "token":
        kw["token"] = draw(ratio)
        if draw(st.booleans()):
            kw["token_adapt"] = draw(st.floats(0, 3))
        if draw(st.booleans()):
            kw["token_ref_len"] = draw(st.integers(1, 4096))
    elif token_mode == "schedule":
        kw["token_schedule"] = draw(schedules())
    head_mode = draw(st.sampled_from(["none", "head", "schedule"]))
    if head_mode == "head":
        kw["head"] = draw(ratio)
    elif head_mode == "schedule":
        kw["head_schedule"] = draw(schedules())
    if head_mode != "none" and draw(st.booleans()):
        kw["head_unit"] = "kv"
    if draw(st.booleans()):
        kw["value"] = draw(ratio)
    if draw(st.booleans()):
        if draw(st.booleans()):
            kw["quant"] = QuantSetting(draw(st.integers(1, 16)))
        else:
            msb = draw(st.integers(1, 15))
            kw["quant"] = QuantSetting(msb, draw(st.integers(1, 16 - msb)), draw(st.floats(0, 1)))
    if draw(st.booleans()):
        budget_key = draw(st.sampled_from(["kv", "kv_tokens"]))
        kw[budget_key] = draw(st.floats(1e-6, 1.0) if budget_key == "kv" else st.integers(1, 10_000))
        if draw(st.booleans()):
            kw["sink"] = draw(st.integers(0, 8))
        if draw(st.booleans()):
            kw["recent"] = draw(st.integers(0, 64))
        if "kv_tokens" in kw and kw.get("sink", 0) + kw.get("recent", 0) > kw["kv_tokens"]:
            kw.pop("sink", None), kw.pop("recent", None)
    has_budget = "kv" in kw or "kv_tokens" in kw
    options = ["spatten"]
    if token_mode != "none" or has_budget:
        options += ["random", "instant"]
    if token_mode == "none" and has_budget:
        options += ["h2o", "streaming"]
    kw["score"] = draw(st.sampled_from(options))
    block_mode = draw(st.sampled_from(["none", "block", "sparsity"]))
    if block_mode == "block":
        kw["block"] = draw(st.floats(allow_nan=False, allow_infinity=False))
    elif block_mode == "sparsity":
        kw["block_sparsity"] = draw(st.floats(0, 0.999))
    if block_mode != "none" and draw(st.booleans()):
        kw["block_size"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        kw["hdp_head"] = draw(st.floats(0, 1e6))
    kw["approx"] = draw(st.booleans())
    if draw(st.booleans()):
        int_bits = draw(st.integers(1, 15))
        kw["fixed"] = (int_bits, draw(st.integers(1, 16 - int_bits)))
    if any(k in kw for k in ("block", "block_sparsity", "hdp_head", "fixed")):  # HDP computes the attention
        kw.pop("quant", None), kw.pop("value", None)
    return Recipe(**kw)


@settings(max_examples=300, deadline=None)
@given(recipes())
def test_string_round_trip(recipe: Recipe) -> None:
    text = str(recipe)
    again = Recipe.parse(text)
    assert again == recipe
    assert str(again) == text
    assert again.is_dense == (text == "dense")


@settings(max_examples=200, deadline=None)
@given(recipes())
def test_json_round_trip(recipe: Recipe) -> None:
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


# ---------------------------------------------------------------------------- errors name the key

BAD = [
    ("tokn=0.5", "tokn"),
    ("token", "token"),
    ("token=", "token"),
    ("token=0", "token"),
    ("token=1.5", "token"),
    ("token=-0.2", "token"),
    ("token=abc", "token"),
    ("token=nan", "token"),
    ("token=inf", "token"),
    ("token=0.5,token=0.6", "token"),
    ("head=0", "head"),
    ("head=1.01", "head"),
    ("value=2", "value"),
    ("value=0", "value"),
    ("quant=0", "quant"),
    ("quant=17", "quant"),
    ("quant=4+4", "quant"),
    ("quant=4+4@1.5", "quant"),
    ("quant=4+4@-0.1", "quant"),
    ("quant=12+8@0.1", "quant"),
    ("quant=4+0@0.1", "quant"),
    ("quant=0+4@0.1", "quant"),
    ("quant=four", "quant"),
    ("kv=0", "kv"),
    ("kv=-3", "kv"),
    ("kv=1.5", "kv"),
    ("kv=8", "kv"),  # a share in (0, 1] only: a count is kv_tokens
    ("kv=lots", "kv"),
    ("kv_tokens=0", "kv_tokens"),
    ("kv_tokens=0.5", "kv_tokens"),
    ("kv=0.5,kv_tokens=8", "kv_tokens"),
    ("sink=4", "sink"),
    ("recent=4", "recent"),
    ("kv_tokens=8,sink=-1", "sink"),
    ("kv_tokens=8,sink=4,recent=8", "sink + recent"),
    ("kv_tokens=8,recent=2.5", "recent"),
    ("score=foo", "score"),
    ("score=h2o", "score"),
    ("score=streaming,token=0.5", "score"),
    ("score=h2o,kv=0.5,token=0.5", "score"),
    ("score=random", "score"),
    ("token=0.5,token_schedule=1:0.5", "token_schedule"),
    ("token_schedule=2:0.5/1:0.4", "token_schedule"),
    ("token_schedule=1:0.5/2:0.6", "token_schedule"),
    ("token_schedule=1-0.5", "token_schedule"),
    ("token_schedule=1:0", "token_schedule"),
    ("token_schedule=-1:0.5", "token_schedule"),
    ("head=0.5,head_schedule=1:0.5", "head_schedule"),
    ("head_schedule=a:0.5", "head_schedule"),
    ("token_adapt=0.5", "token_adapt"),
    ("token=0.5,token_adapt=-1", "token_adapt"),
    ("token=0.5,token_ref_len=0", "token_ref_len"),
    ("token_schedule=1:0.5,token_ref_len=64", "token_ref_len"),
    ("head_unit=kv", "head_unit"),
    ("head=0.5,head_unit=group", "head_unit"),
    ("block=1,block_sparsity=0.5", "block_sparsity"),
    ("block_sparsity=1", "block_sparsity"),
    ("block_sparsity=-0.1", "block_sparsity"),
    ("block=1,block_size=0", "block_size"),
    ("block_size=2", "block_size"),
    ("block=x", "block"),
    ("hdp_head=-1", "hdp_head"),
    ("approx=maybe", "approx"),
    ("fixed=8.9", "fixed"),
    ("fixed=0.8", "fixed"),
    ("fixed=8", "fixed"),
    ("fixed=8.8.8", "fixed"),
]


@pytest.mark.parametrize(("text", "key"), BAD)
def test_bad_recipe_names_the_key(text: str, key: str) -> None:
    with pytest.raises(DynapruneError) as info:
        Recipe.parse(text)
    assert f"'{key}'" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_known_keys_and_suggests() -> None:
    with pytest.raises(DynapruneError, match="did you mean 'token'") as info:
        Recipe.parse("tokne=0.5")
    assert all(key in str(info.value) for key in KEYS)


def test_empty_item_and_non_string() -> None:
    with pytest.raises(DynapruneError, match="empty item"):
        Recipe.parse("token=0.5,,head=0.9")
    with pytest.raises(DynapruneError):
        Recipe.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "key"),
    [("not json", "JSON"), ("[1, 2]", "object"), ('{"token": 2}', "'token'"), ('{"tokn": 0.5}', "'tokn'")],
)
def test_bad_json(text: str, key: str) -> None:
    with pytest.raises(DynapruneError, match=key):
        Recipe.from_json(text)


def test_from_dict_refuses_smuggled_keys() -> None:
    with pytest.raises(DynapruneError, match="'score'"):
        Recipe.from_dict({"score": "spatten,token=0.5"})


def test_validate_for() -> None:
    Recipe.parse("token_schedule=11:0.5,kv_tokens=128,sink=4,recent=32").validate_for(12, 12, 12, context_len=512)
    with pytest.raises(DynapruneError, match="'token_schedule'.*12 layers"):
        Recipe.parse("token_schedule=12:0.5").validate_for(12, 12, 12)
    with pytest.raises(DynapruneError, match="'head_schedule'"):
        Recipe.parse("head_schedule=30:0.5").validate_for(30, 9, 3)
    with pytest.raises(DynapruneError, match="'kv_tokens'.*larger than the context"):
        Recipe.parse("kv_tokens=1024").validate_for(12, 12, 12, context_len=512)
    with pytest.raises(DynapruneError, match="'sink \\+ recent'"):
        Recipe.parse("kv=0.1,sink=4,recent=16").validate_for(12, 12, 12, context_len=100)
    with pytest.raises(DynapruneError, match="'token_schedule'"):
        Recipe.parse("token_schedule=12:0.5").token_keep_schedule(12, 100)


def test_kv_budget_tokens() -> None:
    assert Recipe().kv_budget_tokens(100) is None
    assert Recipe.parse("kv=0.25").kv_budget_tokens(100) == 25
    assert Recipe.parse("kv=0.001").kv_budget_tokens(100) == 1
    assert Recipe.parse("kv_tokens=64").kv_budget_tokens(100) == 64
    assert Recipe.parse("kv=1").kv_budget_tokens(100) == 100  # a share: kv=1 keeps everything, like token=1


def test_kv_count_is_refused_with_the_spelling_of_a_count() -> None:
    """kv=256 used to mean 256 tokens while kv=0.5 meant a share: the count now has its own key, named."""
    with pytest.raises(DynapruneError, match=r"recipe key 'kv': 256 is outside \(0, 1\].*kv_tokens=256"):
        Recipe.parse("kv=256")
    with pytest.raises(DynapruneError, match=r"'kv': 2.5 is outside \(0, 1\]") as exc:
        Recipe.parse("kv=2.5")
    assert "kv_tokens" not in str(exc.value)  # 2.5 is no count of tokens: nothing to suggest


def test_head_units() -> None:
    assert Recipe.parse("head=0.5").head_units(9, 3) == (9, 1)
    assert Recipe.parse("head=0.5,head_unit=kv").head_units(9, 3) == (3, 3)


# ---------------------------------------------------------------------------- keep counts and schedules


@given(st.floats(1e-9, 1.0), st.integers(0, 5000))
def test_keep_count_rule(fraction: float, n: int) -> None:
    count = keep_count(fraction, n)
    assert count == (0 if n == 0 else min(n, max(1, math.floor(fraction * n + 0.5))))
    assert int(keep_counts(fraction, torch.tensor([n]))[0]) == count


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 48), st.integers(1, 4096), ratio)
def test_token_schedule_monotone_and_reaches_target(n_layers: int, seq_len: int, k: float) -> None:
    recipe = Recipe(token=k)
    schedule = recipe.token_keep_schedule(n_layers, seq_len)
    assert len(schedule) == n_layers
    assert all(0 < b <= a <= 1 for a, b in zip([1.0, *schedule], schedule, strict=False))
    target = k * min(1.0, DEFAULT_TOKEN_REF_LEN / seq_len) ** (1 / 3)
    assert schedule[-1] == pytest.approx(target, rel=1e-12)
    # no pruning before layer max(1, round(n/8)): the first layers accumulate importance
    start = max(1, round(n_layers / 8))
    assert schedule[: start - 1] == [1.0] * (start - 1)
    # target reached entering mid-depth, then held
    end = max(start, round(n_layers / 2))
    assert all(f == pytest.approx(target, rel=1e-12) for f in schedule[end - 1 :])
    counts = recipe.token_keep_counts(n_layers, seq_len)
    assert counts == [keep_count(f, seq_len) for f in schedule]
    assert all(b <= a for a, b in zip(counts, counts[1:], strict=False))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 48), st.integers(1, 4096), st.integers(1, 4096), ratio)
def test_token_schedule_length_adaptive(n_layers: int, len_a: int, len_b: int, k: float) -> None:
    short, long = sorted((len_a, len_b))
    recipe = Recipe(token=k)
    s_short, s_long = recipe.token_keep_schedule(n_layers, short), recipe.token_keep_schedule(n_layers, long)
    assert all(b <= a for a, b in zip(s_short, s_long, strict=True))  # longer inputs prune more
    if long > short and long > DEFAULT_TOKEN_REF_LEN:
        assert s_long[-1] < s_short[-1]


def test_length_adaptive_rule_values() -> None:
    recipe = Recipe(token=0.5)
    assert recipe.token_keep_schedule(12, 64)[-1] == 0.5  # up to the reference length: exactly K
    assert recipe.token_keep_schedule(12, 128)[-1] == 0.5
    assert recipe.token_keep_schedule(12, 1024)[-1] == pytest.approx(0.25)  # 8x longer: 2x more pruning
    assert Recipe(token=0.5, token_adapt=0).token_keep_schedule(12, 1024)[-1] == 0.5  # off
    assert Recipe(token=0.5, token_ref_len=1024).token_keep_schedule(12, 1024)[-1] == 0.5


def test_default_schedules_concrete() -> None:
    # MiniLM-L6: layer 0 sees every token; layers 1, 2, 3 enter at K^(1/3), K^(2/3), K
    six = Recipe(token=0.125).token_keep_schedule(6, 100)
    assert six == pytest.approx([0.5, 0.25, 0.125, 0.125, 0.125, 0.125])
    # 12 layers: layers 0-1 dense, K reached entering layer 6
    twelve = Recipe(token=0.5).token_keep_counts(12, 100)
    assert twelve[:1] == [100] and twelve[5:] == [50] * 7 and twelve[1] < 100
    # heads: last third only, 12 heads at 0.75 over 12 layers -> layers 8..11
    heads = Recipe(head=0.75).head_keep_schedule(12, 12)
    assert heads[:7] == [12] * 7 and heads[-1] == 9
    assert all(b <= a for a, b in zip(heads, heads[1:], strict=False))
    assert Recipe().head_keep_schedule(4, 9) == [9] * 4
    assert Recipe().token_keep_schedule(4, 9) == [1.0] * 4


def test_explicit_schedules_are_literal() -> None:
    # the published SpAtten GPT-2-medium WikiText-2 trace, as a token_schedule
    recipe = Recipe.parse("token_schedule=1:0.9/2:0.8/4:0.6/10:0.3")
    counts = recipe.token_keep_counts(24, 1024)
    assert counts[:1] == [1024] and counts[1] == 922 and counts[2:4] == [819, 819]
    assert counts[4:10] == [614] * 6 and counts[10:] == [307] * 14
    assert recipe.token_keep_schedule(24, 10_000)[-1] == 0.3  # no length adaptation
    heads = Recipe.parse("head_schedule=15:0.8125/21:0.625").head_keep_schedule(24, 16)
    assert heads == [16] * 15 + [13] * 6 + [10] * 3


@given(st.integers(1, 40), st.integers(1, 64), ratio)
def test_head_schedule_monotone(n_layers: int, n_heads: int, k: float) -> None:
    heads = Recipe(head=k).head_keep_schedule(n_layers, n_heads)
    assert len(heads) == n_layers
    assert all(1 <= b <= a <= n_heads for a, b in zip([n_heads, *heads], heads, strict=False))
    assert heads[-1] == keep_count(k, n_heads)


# ---------------------------------------------------------------------- recipe files (@PATH) and HDP keys
def test_recipe_file_comments_lines_and_round_trip(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("# calibrated\nblock=0.25, # rho_B\n\nblock_size=2\nblock_score=max,fixed=8.8\n")
    recipe = Recipe.parse(f"@{path}")
    assert recipe == Recipe(block=0.25, block_size=2, block_score="max", fixed=(8, 8))
    assert Recipe.parse(str(recipe)) == recipe
    assert Recipe.parse(f"  @{path} ") == recipe


@pytest.mark.parametrize("content, message", [
    ("", "holds no recipe"),
    ("# only a comment\n\n", "holds no recipe"),
    ("@other.txt\n", "names another recipe file"),
])
def test_recipe_file_bad_content(tmp_path, content, message):
    path = tmp_path / "r.txt"
    path.write_text(content)
    with pytest.raises(DynapruneError, match=message):
        Recipe.parse(f"@{path}")


def test_recipe_file_unreadable(tmp_path):
    with pytest.raises(DynapruneError, match="cannot be read"):
        Recipe.parse(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(DynapruneError, match="cannot be read"):
        Recipe.parse(f"@{tmp_path}")  # a folder
    with pytest.raises(DynapruneError, match="needs a file path"):
        Recipe.parse("@")


def test_block_score_and_keep_first_keys():
    recipe = Recipe.parse("block=0.3,block_score=sum,block_keep_first=on")
    assert recipe.block_score == "sum" and recipe.block_keep_first is True
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(DynapruneError, match="block_score"):
        Recipe.parse("block=0.3,block_score=mean")
    with pytest.raises(DynapruneError, match="needs block or block_sparsity"):
        Recipe.parse("block_score=abs_sum")  # a non-default score
    with pytest.raises(DynapruneError, match="needs block or block_sparsity"):
        Recipe.parse("block_keep_first=on")


# ---------------------------------------------------------------------------- suggestions and scope (issue 12)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_every_suggested_quant_form_is_itself_valid(msb: int, lsb: int) -> None:
    """``quant=20+4`` used to suggest ``quant=20+4@0.1``, itself invalid: whatever form an error message
    suggests must parse (the oracle: parsing the suggestion)."""
    import re

    try:
        Recipe.parse(f"quant={msb}+{lsb}")
    except DynapruneError as exc:
        for suggestion in re.findall(r"quant=\d[\d+@.]*", str(exc)):
            Recipe.parse(suggestion.rstrip("."))
    else:
        pytest.fail("a progressive setting without a threshold was accepted")


@pytest.mark.parametrize(("recipe", "where", "protocol", "refused"), [
    ("kv=0.5", "sts", None, "kv"),
    ("kv_tokens=8,score=h2o", "classify", None, "kv_tokens"),
    ("kv=0.5,sink=2", "sst2", None, "kv"),
    ("kv=0.25", "lm", "window", "kv"),
    ("kv=0.25", "run", None, "kv"),
    ("kv=0.25", "calibrate", None, "kv"),
    ("kv=0.25", "lm", "continue", None),
    ("kv=0.25", "lm", "stream", None),
    ("kv_tokens=64,score=streaming", "generate", None, None),
    ("token=0.5", "sts", None, None),
    ("token=0.5", "run", None, None),
    ("dense", "lm", "window", None),
])
def test_keys_that_would_change_nothing_are_refused(recipe: str, where: str, protocol: str | None,
                                                    refused: str | None) -> None:
    from dynaprune.prune.recipe_scope import check_recipe_applies

    if refused is None:
        check_recipe_applies(Recipe.parse(recipe), where, protocol=protocol)
        return
    with pytest.raises(DynapruneError, match=f"recipe key '{refused}': .*no effect"):
        check_recipe_applies(Recipe.parse(recipe), where, protocol=protocol)


def test_kv_budget_summary() -> None:
    from types import SimpleNamespace

    from dynaprune.prune.recipe_scope import kv_budget_summary

    def ctx(budget: int | None) -> SimpleNamespace:
        return SimpleNamespace(kv_budget=budget)

    assert kv_budget_summary([ctx(10), ctx(10)], {}) == {"kv_budget_tokens": 10}
    assert kv_budget_summary([ctx(12), ctx(9), ctx(None)], None) == {"kv_budget_tokens": {"min": 9, "max": 12}}
    assert kv_budget_summary([ctx(None)], {}) == {"kv_budget_tokens": None}
    assert kv_budget_summary([ctx(10)], {"kv_budget_tokens": 64}) == {}  # the stream protocol recorded it already

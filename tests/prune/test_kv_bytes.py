"""``kv_bytes=F`` (issue 14 item 5): the eviction share that fits F against the bytes a real packed cache
holds (and one more token does not fit), the recipe's expansion from a choices file, the shipped choices
(VALID, measured <= F), the search's invariants on a tiny model, and bad input naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from kv_oracle import tiny_llama

from dynaprune.calibrate import kv_bytes as search_mod
from dynaprune.errors import DynapruneError
from dynaprune.prune.groupquant import KVQuantSpec
from dynaprune.prune.recipe import Recipe
from dynaprune.prune.techniques.kv_bytes import ENV_FILE, load_choices, resolve_kv_bytes
from dynaprune.runtime.pruning import make_context


def _held_share(model, recipe: str, n: int) -> float:
    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, n + 1)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=make_context(recipe, model))
    return cache.bytes_held(fp_bytes=2) / cache.dense_fp16_bytes()


@pytest.mark.parametrize(("fraction", "kb", "vb", "scale_bits", "rotate"),
                         [(0.25, 4, 4, 16, ""), (0.3, 4, 3, 16, ""), (0.2, 3, 3, 8, "kv"), (0.45, 5, 4, 8, ""),
                          (0.15, 2, 2, 16, "k")])
def test_eviction_share_is_the_largest_that_a_real_packed_cache_fits(fraction, kb, vb, scale_bits, rotate):
    model, n, group = tiny_llama(layers=2), 100, 8  # head_dim 8: values in groups of 8 channels
    kv = search_mod.eviction_share(fraction, KVQuantSpec(kb, vb, group, group, scale_bits, rotate), n, 8)
    bits = f"kv_key_bits={kb},kv_value_bits={vb},kv_group={group},kv_scale_bits={scale_bits}" + \
        (f",kv_rotate={rotate}" if rotate else "")
    kept = round(kv * n)
    held = _held_share(model, f"kv_tokens={kept},score=h2o,kv_alloc=head,{bits}", n)
    assert held <= fraction + 1e-12
    assert _held_share(model, f"kv_tokens={kept + 1},score=h2o,kv_alloc=head,{bits}", n) > fraction
    assert _held_share(model, f"kv={kv},score=h2o,kv_alloc=head,{bits}", n) == held  # the share gives it back


def _choices_file(tmp_path, monkeypatch):
    data = {"default": "tiny", "models": {"tiny": {"choices": [
        {"kv_bytes": 0.25, "recipe": "kv=0.8,score=h2o,kv_alloc=head,kv_bits=4,kv_group=64"},
        {"kv_bytes": 0.125, "recipe": "kv=0.45,score=observed,kv_alloc=ada,kv_key_bits=4,kv_value_bits=3,kv_group=32"},
    ]}}}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(ENV_FILE, str(path))
    return data


def test_recipe_expands_to_the_largest_choice_within_f(tmp_path, monkeypatch):
    data = _choices_file(tmp_path, monkeypatch)
    low, high = (c["recipe"] for c in sorted(data["models"]["tiny"]["choices"], key=lambda c: c["kv_bytes"]))
    assert str(Recipe.parse("kv_bytes=0.2")) == str(Recipe.parse(low))
    assert str(Recipe.parse("kv_bytes=0.125")) == str(Recipe.parse(low))
    assert str(Recipe.parse("kv_bytes=1")) == str(Recipe.parse(high))
    assert Recipe(kv_bytes=0.25) == Recipe.parse(high)
    with pytest.raises(DynapruneError, match="'kv_bytes'.*no known composition.*kv_bytes=0.125"):
        Recipe.parse("kv_bytes=0.1")
    with pytest.raises(DynapruneError, match="'kv_bits'.*set either kv_bytes or the keys it composes"):
        Recipe.parse("kv_bytes=0.25,kv_bits=8")


@pytest.mark.parametrize("bad", ["kv_bytes=0", "kv_bytes=1.5", "kv_bytes=-0.25", "kv_bytes=abc", "kv_bytes=nan"])
def test_bad_kv_bytes_names_the_key(bad):
    with pytest.raises(DynapruneError, match="kv_bytes"):
        Recipe.parse(bad)


def test_shipped_choices_were_chosen_on_valid_and_fit():
    data = load_choices()
    model = data["models"][data["default"]]
    assert model["split"] == "valid" and model["chunks"] >= 2
    assert {c["kv_bytes"] for c in model["choices"]} >= {0.25, 0.125, 0.0625}
    for c in model["choices"]:
        assert c["measured_kv_bytes_vs_fp16"] <= c["kv_bytes"] + 1e-9
        assert resolve_kv_bytes(c["kv_bytes"])["recipe"] == c["recipe"]
        adapted = c["recipe"].replace("recent=", "recent_max=")  # the window shrinks on short prompts
        assert str(Recipe.parse(f"kv_bytes={c['kv_bytes']}")) == str(Recipe.parse(adapted))


def test_search_on_a_tiny_model_picks_the_lowest_perplexity_that_fits(tmp_path, monkeypatch):
    import dynaprune.eval.lm as lm

    model = tiny_llama(layers=2)
    monkeypatch.setattr(search_mod, "GROUPS", (8,))
    monkeypatch.setattr(search_mod, "RECENT", 2)
    monkeypatch.setattr(search_mod, "ALTERNATIVES", (("h2o", "head"),))
    monkeypatch.setattr(lm, "read_tokens", lambda m, p, n: torch.randint(1, 60, (120,), generator=torch.Generator()
                                                                            .manual_seed(4)).tolist())
    found = search_mod.search(model, tmp_path / "t.txt", [0.25, 0.5], chunks=2, context=48, continuation=12)
    for c in found["choices"]:
        tried = found["tried"][str(c["kv_bytes"])]
        fitting = [r for r in tried if r["kv_bytes_vs_fp16"] <= c["kv_bytes"] + 1e-9]
        assert [r["fits"] for r in tried] == [r in fitting for r in tried]
        assert c["measured_kv_bytes_vs_fp16"] <= c["kv_bytes"] + 1e-9
        assert c["valid_perplexity"] == round(min(r["perplexity"] for r in fitting), 4)
        tried_evictions = {(r["score"], r["alloc"]) for r in tried}
        assert search_mod.EVICTION in tried_evictions <= {search_mod.EVICTION, *search_mod.ALTERNATIVES}
        assert {r.get("scale_bits") for r in tried} == {16, 8} and {r.get("rotate") for r in tried} == {"", "kv"}


def test_cli_bad_kv_bytes_one_line_exit_2(dynaprune_cli, tmp_path) -> None:
    for args in (("eval", "smollm2-135m", "lm", "--protocol", "continue", "--recipe", "kv_bytes=1.5"),
                 ("tune", "smollm2-135m", "--kv-bytes", "0.25,0", "--data", str(tmp_path), "--out",
                  str(tmp_path / "c.json"))):
        code, out = dynaprune_cli(*args)
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "kv_bytes" in lines[0], out


def test_padded_ada_cache_bytes_count_the_packed_padding_by_hand():
    """An Ada-KV (per-head, padded) cache that is then packed: the padding slots inside the packed prefix
    are stored as codes (held), only the fp padding holds nothing. head_dim 8, 4 bits, key groups of 2
    tokens, value groups of 8 channels: a packed slot of one KV head is 4 + 16 bytes of K (codes, a fp16
    scale + zero per channel per 2 tokens) and 4 + 4 of V = 28 bytes; an fp16 slot 2 x 8 x 2 = 32 bytes."""
    from dynaprune.runtime import kvquant

    model, n = tiny_llama(layers=2), 60
    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(1, n + 1)
    recipe = "kv_tokens=30,score=h2o,kv_alloc=ada,kv_bits=4,kv_group=2,kv_value_group=8"
    with torch.inference_mode():
        model(ids, cache=cache, ctx=make_context(recipe, model))
    expected = 0
    for layer in range(2):
        packed = kvquant.packed_tokens(cache, layer)
        valid = cache.head_valid_mask(layer)[:, :, : cache.lengths[layer]]
        expected += packed * valid.shape[0] * valid.shape[1] * 28 + int(valid[:, :, packed:].sum()) * 32
    assert any(not bool(cache.head_valid_mask(layer)[:, :, :kvquant.packed_tokens(cache, layer)].all())
               for layer in range(2))  # the case: padding inside the packed prefix
    assert cache.bytes_held(fp_bytes=2) == expected


@pytest.mark.parametrize(("fraction", "kb", "vb"), [(0.25, 4, 4), (0.125, 3, 3), (0.3, 5, 4)])
def test_aligned_share_fits_a_global_layer_cache_in_whole_groups(fraction, kb, vb):
    model, n, group = tiny_llama(layers=2), 96, 8
    kv = search_mod.eviction_share(fraction, KVQuantSpec(kb, vb, group, group), n, 8, aligned=True)
    bits = f"kv_key_bits={kb},kv_value_bits={vb},kv_group={group}"
    held = _held_share(model, f"kv={kv},score=h2o,kv_alloc=global_layer,sink=1,recent=1,{bits}", n)
    assert fraction - 2 * group / n * 0.5 < held <= fraction + 1e-12  # within F, short by < one group per layer


def _short_prompt_run(model, recipe: str, n: int) -> tuple[dict, int]:
    """Prefill ``n`` tokens under ``recipe``; the summary and the tokens every layer holds after it."""
    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(5))
    cache, ctx = model.new_cache(1, n + 1), make_context(recipe, model)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=ctx)
    return ctx.summary(), int(cache.lengths[0])


def test_kv_bytes_shrinks_its_recent_window_on_a_short_prompt(tmp_path, monkeypatch):
    """A choice's recent=32 becomes recent_max=32: a prompt whose budget cannot hold the sinks and 32
    recent tokens runs with the window that fits (recorded), the newest tokens kept; an explicit recent=32
    is still refused on the same prompt; a long prompt keeps the whole window."""
    data = {"default": "tiny", "models": {"tiny": {"choices": [
        {"kv_bytes": 0.5, "recipe": "kv=0.5,score=h2o,sink=4,recent=32"}]}}}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(ENV_FILE, str(path))
    assert str(Recipe.parse("kv_bytes=0.5")) == str(Recipe.parse("kv=0.5,score=h2o,sink=4,recent_max=32"))
    model = tiny_llama(layers=2)
    summary, held = _short_prompt_run(model, "kv_bytes=0.5", 40)  # budget 20: 4 sinks + 16 recent
    assert held == 20 and summary["kv_recent"] == [16, 16]
    with pytest.raises(DynapruneError, match="'sink \\+ recent'.*36 protected tokens exceed the kv budget of 20"):
        _short_prompt_run(model, "kv=0.5,score=h2o,sink=4,recent=32", 40)
    summary, held = _short_prompt_run(model, "kv_bytes=0.5", 100)  # budget 50: the whole window
    assert held == 50 and summary["kv_recent"] == [32, 32]


def test_recent_max_keeps_exactly_the_sinks_and_the_newest_tokens_when_they_fill_the_budget():
    """Brute force: with the budget all protected (sinks + shrunk window), the cache holds the first
    ``sink`` and the last budget - sink tokens of the prompt, whatever the scores."""
    model = tiny_llama(layers=2)
    n, sink = 30, 3
    ids = torch.randint(1, 60, (1, n), generator=torch.Generator().manual_seed(6))
    cache, ctx = model.new_cache(1, n + 1), make_context(f"kv_tokens=10,score=h2o,sink={sink},recent_max=32", model)
    with torch.inference_mode():
        model(ids, cache=cache, ctx=ctx)
    assert ctx.summary()["kv_recent"] == [7, 7]
    for layer in range(2):
        kept = cache.positions[layer][0, : cache.lengths[layer]].tolist()
        assert sorted(kept) == [0, 1, 2, *range(n - 7, n)]


@pytest.mark.parametrize(("recipe", "key"), [("kv=0.5,recent=4,recent_max=8", "recent_max"),
                                             ("recent_max=8", "recent_max")])
def test_recent_max_bad_input_names_the_key(recipe, key):
    with pytest.raises(DynapruneError, match=f"recipe key '{key}'"):
        Recipe.parse(recipe)


@pytest.mark.parametrize(("alloc", "bits"), [("global_layer", ",kv_bits=4,kv_group=16,kv_value_group=8"),
                                             ("global_layer", ""), ("global", "")])
def test_a_short_prompt_under_a_global_budget_generates(alloc, bits):
    """A prompt about the size of its budget: the global allocation may give one layer every token (with a
    packed cache, widths in whole key groups longer than the prompt: all or nothing, as kv_bytes' groups
    of 128 on an MT-Bench prompt); that layer still leaves the next step a slot (it held the cache's
    capacity and the step overflowed)."""
    from dynaprune.runtime.generate import generate

    model = tiny_llama(layers=3)
    prompt = torch.randint(1, 60, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    out = generate(model, prompt, max_new_tokens=6, stop_tokens=[], recipe=f"kv=0.9,score=h2o,kv_alloc={alloc},"
                   f"recent_max=4{bits}")
    assert len(out.new_ids) == 6
    budget = round(0.9 * 12)
    assert out.cost["kv_budget_tokens"] == budget


def test_kv_bytes_expands_to_the_models_own_choice_once_the_model_is_known(monkeypatch):
    """A recipe parsed before the model is known takes the default model's choice; ``make_context`` (and
    ``evaluate``) re-expand it for the model's shape: Gemma 3's shape has its own VALID choices."""
    from dynaprune.prune.techniques.kv_bytes import shape_key
    from dynaprune.runtime.pruning import recipe_for_model

    monkeypatch.delenv(ENV_FILE, raising=False)
    data = load_choices()
    gemma = shape_key(18, 4, 1, 256)
    default = Recipe.parse("kv_bytes=0.25,head=0.9")  # a key beside it survives the re-expansion
    own = default.for_shape(gemma)
    assert own == Recipe(kv_bytes=0.25, kv_bytes_shape=gemma, head=0.9) and own.head == 0.9
    fitting = [c for c in data["models"][gemma]["choices"] if c["kv_bytes"] <= 0.25]
    chosen = max(fitting, key=lambda c: c["kv_bytes"])["recipe"].split(",")  # the JSON, read directly
    assert set(chosen) - {"recent=32"} <= set(str(own).split(","))
    assert str(default) != str(own)  # not vacuous: SmolLM2's choice differs
    assert own.for_shape(gemma) is own
    tiny = tiny_llama()  # a shape the file does not know: the default choice stays
    assert recipe_for_model(default, tiny) is default or str(recipe_for_model(default, tiny)) == str(default)

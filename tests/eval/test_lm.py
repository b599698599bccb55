"""The lm task: window, continue and stream perplexity protocols, errors; SmolLM2 against transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError
from dynaprune.eval.lm import evaluate_lm
from dynaprune.models.llama import Llama
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.pruning import make_context


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 10)  # 450 characters
    return p


def nll_sum(model, ids):
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0]
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


def test_window_protocol_matches_a_manual_computation(tiny, text):
    ids = tiny.tokenizer(text.read_text()).input_ids[:301]
    calls = []
    res = evaluate_lm(tiny, text, window=100, max_tokens=301, progress=lambda d, t: calls.append((d, t)))
    # windows of 100, 100, 100 and a last one of 1 token, which predicts nothing and is dropped
    expected = sum(nll_sum(tiny, ids[i:i + 100]) for i in (0, 100, 200)) / 297
    assert res.task == "lm" and res.n == 3 and res.metric["tokens"] == 297
    assert res.metric["name"] == "perplexity" and math.isclose(res.metric["nll"], expected, rel_tol=1e-6)
    assert math.isclose(res.metric["value"], math.exp(expected), rel_tol=1e-6)
    assert calls == [(1, 3), (2, 3), (3, 3)] and res.cost == {} and res.model == "tiny"
    assert evaluate_lm(tiny, text, window=100, max_tokens=302).n == 4  # a last window of 2 tokens counts
    assert evaluate_lm(tiny, text, window=100, max_examples=2).n == 2


def test_continue_protocol_scores_the_continuation_only(tiny, text):
    ids = tiny.tokenizer(text.read_text()).input_ids
    made = []

    def factory():
        made.append(RunContext())
        return made[-1]

    res = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, ctx_factory=factory)
    assert res.n == 4 and res.metric["tokens"] == 160 and len(made) == 4  # 450 tokens -> 4 chunks of 100
    total = 0.0
    for c in range(4):
        chunk = torch.tensor([ids[c * 100:(c + 1) * 100]])
        with torch.inference_mode():
            logits = tiny(chunk)[0]
        total += float(F.cross_entropy(logits[59:99], chunk[0, 60:], reduction="sum"))
    assert math.isclose(res.metric["nll"], total / 160, rel_tol=1e-5)
    step = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, max_examples=2,
                       stepwise=True)
    first_two = 0.0  # the same hand computation over the two chunks the stepwise run reads
    for c in range(2):
        chunk = torch.tensor([ids[c * 100:(c + 1) * 100]])
        with torch.inference_mode():
            first_two += float(F.cross_entropy(tiny(chunk)[0, 59:99], chunk[0, 60:], reduction="sum"))
    assert step.n == 2 and step.metric["tokens"] == 80
    assert math.isclose(step.metric["nll"], first_two / 80, rel_tol=1e-5)
    one = evaluate_lm(tiny, text, protocol="continue", context=60, continuation=40, max_examples=2)
    assert math.isclose(step.metric["nll"], one.metric["nll"], rel_tol=1e-5)  # decode steps == one pass


def test_bad_input(tiny, tmp_path, text):
    with pytest.raises(DynapruneError, match="no such text file"):
        evaluate_lm(tiny, tmp_path / "missing.txt", window=16)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DynapruneError, match="empty"):
        evaluate_lm(tiny, empty, window=16)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(DynapruneError, match="not UTF-8"):
        evaluate_lm(tiny, latin, window=16)
    with pytest.raises(DynapruneError, match="max_tokens must be > 0"):
        evaluate_lm(tiny, text, window=16, max_tokens=0)
    with pytest.raises(DynapruneError, match="window must be >= 2"):
        evaluate_lm(tiny, text, window=1)
    with pytest.raises(DynapruneError, match="exceeds the model's 128 positions"):
        evaluate_lm(tiny, text, window=129)
    with pytest.raises(DynapruneError, match="exceeds the model's 128 positions"):
        evaluate_lm(tiny, text, protocol="continue", context=100, continuation=29)
    with pytest.raises(DynapruneError, match="fewer than the 120"):
        evaluate_lm(tiny, text, protocol="continue", context=80, continuation=40, max_tokens=100)
    with pytest.raises(DynapruneError, match="unknown lm protocol"):
        evaluate_lm(tiny, text, protocol="sliding")


def test_token_pruning_after_the_last_layer_scores_the_dense_logits_of_the_survivors(tiny, text):
    """token_schedule=1:0.5 prunes after the last of the 2 layers, so every layer runs dense and each
    surviving row of the logits is a dense row. The oracle finds which rows by matching them against
    the dense logits (not from the code under test), and sums the dense NLL of their next tokens."""
    ids = tiny.tokenizer(text.read_text()).input_ids
    recipe = "token_schedule=1:0.5"
    res = evaluate_lm(tiny, text, window=100, ctx_factory=lambda: make_context(recipe, tiny))
    nll, scored = 0.0, 0
    for start in range(0, 450, 100):
        piece = torch.tensor(ids[start:start + 100])
        with torch.inference_mode():
            dense = tiny(piece[None])[0]
            pruned = tiny(piece[None], ctx=make_context(recipe, tiny))[0]
        distance = torch.cdist(pruned, dense, compute_mode="donot_use_mm_for_euclid_dist")  # (survivors, L)
        rows = distance.argmin(1)
        assert float(distance.min(1).values.max()) < 1e-4 and len(set(rows.tolist())) == len(rows)
        assert len(rows) == len(piece) // 2 and int(rows.max()) == len(piece) - 1  # the last is protected
        for p in rows.tolist():
            if p < len(piece) - 1:
                nll += float(F.cross_entropy(dense[p], piece[p + 1], reduction="sum"))
                scored += 1
    # hand count: windows of 100, 100, 100, 100, 50 keep 50, ..., 25; the last position has no target
    assert scored == 4 * 49 + 24 == res.metric["tokens"] == res.metric["scored_tokens"]
    assert res.metric["target_tokens"] == 4 * 99 + 49 and "survives token pruning" in res.extra["scored_on"]
    assert math.isclose(res.metric["nll"], nll / scored, rel_tol=1e-5)


def test_token_pruning_under_window_runs_and_says_what_it_scored(tiny, text, monkeypatch, dynaprune_cli):
    """token=0.5 (the default cascade prunes mid-network): no crash; the scored targets are the
    survivors at the last layer, by hand count; the CLI command of issue 12 item 1 exits 0."""
    from dynaprune.prune.recipe import Recipe, keep_count

    res = evaluate_lm(tiny, text, window=100, ctx_factory=lambda: make_context("token=0.5", tiny))
    alive = [keep_count(Recipe.parse("token=0.5").token_keep_schedule(2, n)[-1], n) for n in (100,) * 4 + (50,)]
    assert res.metric["scored_tokens"] == sum(alive) - 5 < res.metric["target_tokens"] == 445
    dense = evaluate_lm(tiny, text, window=100)
    assert dense.metric["scored_tokens"] == dense.metric["target_tokens"] == 445 and "scored_on" not in dense.extra
    assert res.metric["nll"] != dense.metric["nll"] and math.isfinite(res.metric["value"])
    import dynaprune

    monkeypatch.setattr(dynaprune, "load", lambda name, say=None: tiny)
    code, out = dynaprune_cli("eval", "tiny", "lm", "--data", str(text), "--max-tokens", "200", "--window", "100",
                              "--recipe", "token=0.5")
    assert code == 0 and "perplexity" in out and "Traceback" not in out


def contexts_of(recipe, model):
    made = []

    def factory():
        made.append(make_context(recipe, model))
        return made[-1]

    return made, factory


@pytest.mark.parametrize("prefill", [1, 7])
def test_dense_stream_equals_the_window_protocol(tiny, text, prefill):
    ids = tiny.tokenizer(text.read_text()).input_ids
    res = evaluate_lm(tiny, text, protocol="stream", stream_tokens=60, prefill=prefill, max_examples=2)
    expected = (nll_sum(tiny, ids[:60]) + nll_sum(tiny, ids[60:120])) / 118
    assert res.n == 2 and res.metric["tokens"] == 118
    assert math.isclose(res.metric["nll"], expected, rel_tol=1e-5)
    window = evaluate_lm(tiny, text, window=60, max_tokens=120)
    assert math.isclose(res.metric["value"], window.metric["value"], rel_tol=1e-5)
    assert res.extra["kv_budget_tokens"] is None and res.extra["cache_capacity"] == 60


def test_stream_with_nothing_pruned_is_dense(tiny, text):
    dense = evaluate_lm(tiny, text, protocol="stream", stream_tokens=60, max_examples=1)
    same = evaluate_lm(tiny, text, protocol="stream", stream_tokens=60, max_examples=1,
                       ctx_factory=lambda: make_context("dense", tiny))
    assert same.metric == dense.metric  # the dense recipe is the plain RunContext: bit-identical
    made, factory = contexts_of("kv_tokens=60,score=h2o", tiny)  # a budget of the whole stream evicts nothing
    whole = evaluate_lm(tiny, text, protocol="stream", stream_tokens=60, max_examples=1, ctx_factory=factory)
    assert math.isclose(whole.metric["nll"], dense.metric["nll"], rel_tol=1e-5)
    assert whole.extra["kv_budget_tokens"] == 60 and made[0].cache.lengths == [59, 59]


def test_stream_under_a_kv_budget_equals_the_streaming_oracle(tiny, text, streaming_oracle):
    """kv=0.25 of a 100-token stream is 25 tokens; StreamingLLM keeps 2 sinks + the 23 newest keys."""
    ids = tiny.tokenizer(text.read_text()).input_ids
    made, factory = contexts_of("kv=0.25,sink=2,score=streaming", tiny)
    res = evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_examples=2, ctx_factory=factory)
    oracle = 0.0
    for start in (0, 100):
        piece = torch.tensor([ids[start:start + 100]])
        with torch.inference_mode():
            logits = tiny(piece, ctx=streaming_oracle(budget=25, sink=2))[0]
        oracle += float(F.cross_entropy(logits[:-1], piece[0, 1:], reduction="sum"))
    assert math.isclose(res.metric["nll"], oracle / 198, rel_tol=1e-5)
    assert res.extra["kv_budget_tokens"] == 25 and res.extra["cache_capacity"] == 26
    assert len(made) == 1 and made[0].cache.capacity == 26 and made[0].cache.lengths == [25, 25]
    assert made[0].cache.k[0].shape[0] == 2  # the two streams side by side, evicted per row
    made, factory = contexts_of("kv=0.25,sink=2,score=streaming", tiny)
    alone = evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_examples=2, batch_size=1,
                        ctx_factory=factory)
    assert len(made) == 2 and math.isclose(alone.metric["nll"], oracle / 198, rel_tol=1e-5)
    dense = evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_examples=2)
    assert res.metric["nll"] != dense.metric["nll"]  # the budget really evicted


@pytest.mark.parametrize("recipe", ["kv_tokens=10,score=h2o", "kv=0.1,score=spatten", "kv_tokens=10,score=random"])
def test_stream_budget_holds_for_every_score(tiny, text, recipe):
    made, factory = contexts_of(recipe, tiny)
    res = evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_examples=2, ctx_factory=factory)
    assert res.extra["kv_budget_tokens"] == 10 and made[0].cache.capacity == 11
    assert made[0].cache.lengths == [10, 10] and math.isfinite(res.metric["value"])
    assert made[0].cache.next_position.tolist() == [99, 99]  # every token but the last was fed
    if "random" not in recipe:  # eviction is per row: two streams side by side = each alone
        alone = evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_examples=2, batch_size=1,
                            ctx_factory=lambda: make_context(recipe, tiny))
        assert math.isclose(alone.metric["nll"], res.metric["nll"], rel_tol=1e-5)


def hand_simulated_keys(forwards: int, budget: int, evict_to: int) -> list[int]:
    """Keys each forward of a stream attends over, from the documented policy: each forward appends
    one token; a cache over the budget after a forward is cut to ``evict_to`` tokens."""
    cached, keys = 0, []
    for _ in range(forwards):
        cached += 1
        keys.append(cached)
        if cached > budget:
            cached = evict_to
    return keys


@pytest.mark.parametrize(("recipe", "budget", "evict_to"), [
    ("kv_tokens=10,score=h2o", 10, 10), ("kv=0.1,score=spatten", 10, 10), ("kv_tokens=10,score=random", 10, 10),
    ("kv_tokens=10,sink=2,score=streaming", 10, 10),
    ("kv_tokens=70,score=h2o", 70, 70 - 70 // 16),  # a budget >= 64 is evicted in chunks of budget / 16
])
def test_stream_holds_the_budget_at_every_step(tiny, text, attended_keys, recipe, budget, evict_to):
    """The keys every layer of every row attends over, at every forward of the stream, against a hand
    simulation: never more than the budget + the token being fed."""
    n = 100 if budget < 64 else 120
    res = evaluate_lm(tiny, text, protocol="stream", stream_tokens=n, max_examples=2,
                      ctx_factory=lambda: make_context(recipe, tiny))
    forwards = attended_keys.per_forward(layers=2)
    assert len(forwards) == n - 1 and all(q == 1 for q, _ in forwards)  # one token per forward
    expected = hand_simulated_keys(n - 1, budget, evict_to)
    assert [keys for _, keys in forwards] == [[k] * 4 for k in expected]  # 2 layers x 2 streams
    assert max(expected) == budget + 1 and res.extra["kv_budget_tokens"] == budget


def test_stream_bad_input(tiny, text):
    with pytest.raises(DynapruneError, match="stream of 129 tokens exceeds the model's 128 positions"):
        evaluate_lm(tiny, text, protocol="stream", stream_tokens=129)
    with pytest.raises(DynapruneError, match="stream_tokens must be >= 2"):
        evaluate_lm(tiny, text, protocol="stream", stream_tokens=1)
    with pytest.raises(DynapruneError, match="prefill must be in"):
        evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, prefill=0)
    with pytest.raises(DynapruneError, match="fewer than the 100"):
        evaluate_lm(tiny, text, protocol="stream", stream_tokens=100, max_tokens=99)
    with pytest.raises(DynapruneError, match="kv_tokens.*120 tokens is larger"):
        evaluate_lm(tiny, text, protocol="stream", stream_tokens=100,
                    ctx_factory=lambda: make_context("kv_tokens=120", tiny))


def test_cli_stream_and_its_errors(tiny, text, monkeypatch, dynaprune_cli):
    """The CLI runs the stream protocol (model loading stubbed with the tiny model); bad input is one
    line and exit code 2."""
    import dynaprune

    monkeypatch.setattr(dynaprune, "load", lambda name, say=None: tiny)

    def cli(*args):
        return dynaprune_cli("eval", "tiny", "lm", "--data", str(text), *args)

    code, out = cli("--protocol", "stream", "--stream-tokens", "40", "--max-examples", "1", "--recipe",
                    "kv=0.25,score=h2o")
    assert code == 0 and "perplexity" in out
    for args, message in ((("--protocol", "sliding"), "unknown lm protocol"),
                          (("--protocol", "stream", "--stream-tokens", "200"), "exceeds the model's 128"),
                          (("--protocol", "stream", "--stream-tokens", "0"), "--stream-tokens")):
        code, out = cli(*args)
        assert code == 2 and message in out and "Traceback" not in out


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_wikitext_perplexity_matches_transformers(smollm2_path, shared_data):
    """Our perplexity on the first 2048 WikiText-2 test tokens (two 1024-token windows) equals the one
    transformers' LlamaForCausalLM gives on the same windows (same weights)."""
    model = Llama.from_gguf(smollm2_path)
    path = shared_data / "wikitext2" / "test.txt"
    res = evaluate_lm(model, path, window=1024, max_tokens=2048)
    hf = model.to_transformers()
    ids = model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:2048]
    nll = 0.0
    with torch.inference_mode():
        for i in range(0, 2048, 1024):
            w = torch.tensor([ids[i:i + 1024]])
            nll += float(F.cross_entropy(hf(w).logits[0, :-1], w[0, 1:], reduction="sum"))
    ppl = math.exp(nll / 2046)
    assert res.metric["tokens"] == 2046 and res.n == 2
    assert abs(res.metric["value"] / ppl - 1) <= 1e-3
    assert 5 < ppl < 60  # a sane language model, not noise

"""Token-survival tracing and its pictures (SpAtten Fig. 22/23) on tiny random models and MiniLM."""

from __future__ import annotations

import io
import os
import stat

import pytest
import torch
from rich.console import Console

from dynaprune.errors import DynapruneError
from dynaprune.models.bert import Bert, BertConfig
from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.report.pruning_picture import (
    Survival,
    SurvivalRecorder,
    plot_survival,
    readable_tokens,
    render_terminal,
    trace_survival,
)
from dynaprune.runtime.pruning import make_context

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_bert() -> Bert:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48,
                     max_position_embeddings=64)
    return Bert(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llama() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=50, hidden=32, layers=6, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=64)
    return Llama(cfg).eval()


def ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_cascade(s: Survival) -> None:
    """The invariants every trace has: layer 0 dense, alive never comes back, frozen importance."""
    assert s.alive.shape == s.importance.shape == (s.n_layers, s.n_tokens)
    assert bool(s.alive[0].all())
    assert bool((s.alive[1:] <= s.alive[:-1]).all())  # monotone non-increasing per token
    dead = ~s.alive[1:]
    assert torch.equal(s.importance[1:][dead], s.importance[:-1][dead])  # frozen once pruned
    assert bool((s.importance[1:] >= s.importance[:-1] - 1e-6).all())  # cumulative
    assert s.kept_per_layer == s.summary.get("tokens_per_layer", s.kept_per_layer)


def test_encoder_ids_cascade(tiny_bert):
    s = trace_survival(tiny_bert, None, "token=0.5", ids=ids(20))
    check_cascade(s)
    assert s.kept_per_layer == s.summary["tokens_per_layer"]
    assert s.kept_per_layer[0] == 20 and s.kept_per_layer[-1] == 10
    assert bool(s.alive[:, 0].all())  # [CLS] is protected
    assert s.tokens == [str(i) for i in s.token_ids]  # no tokenizer: raw ids as labels
    assert s.heads_per_layer == [4] * 4 and s.recipe == "token=0.5"


def test_importance_is_what_the_pruner_ranks(tiny_bert):
    batch = torch.tensor([ids(16, seed=3)])
    ctx = make_context("token=0.4", tiny_bert)
    recorder = SurvivalRecorder(ctx, 16)
    with torch.inference_mode():
        tiny_bert(batch, ctx=ctx)
    # The context accumulates importance up to the last layer that prunes tokens (none is needed after
    # it); there its own cumulative scores, aligned with its survivors, equal ours for those tokens.
    last = ctx.last_token_layer
    assert 0 <= last < len(recorder.alive) - 1
    alive, importance = recorder.alive[-1], recorder.importance[last]
    assert torch.allclose(importance[alive], ctx.token_importance[0].float(), atol=1e-4)


def test_dense_and_head_pruning(tiny_bert):
    dense = trace_survival(tiny_bert, None, "dense", ids=ids(12))
    assert bool(dense.alive.all()) and bool((dense.importance > 0).all())
    assert dense.recipe == "dense" and dense.heads_per_layer == [4] * 4
    heads = trace_survival(tiny_bert, None, "token=0.5,head=0.5", ids=ids(12))
    check_cascade(heads)
    assert heads.heads_per_layer[0] == 4 and heads.heads_per_layer[-1] == 2


def test_decoder_prefill_protects_last_token(tiny_llama):
    s = trace_survival(tiny_llama, None, "token=0.3", ids=ids(24))
    check_cascade(s)
    assert s.kept_per_layer == s.summary["tokens_per_layer"]
    assert s.kept_per_layer[-1] < 24
    assert bool(s.alive[:, -1].all())  # the last prompt token predicts the next one: never pruned
    assert s.heads_per_layer == [4] * 6


def test_user_errors(tiny_bert, tmp_path):
    with pytest.raises(DynapruneError, match="either a text or token ids"):
        trace_survival(tiny_bert, "hello", "token=0.5", ids=[1, 2])
    with pytest.raises(DynapruneError, match="either a text or token ids"):
        trace_survival(tiny_bert, None, "token=0.5")
    with pytest.raises(DynapruneError, match=r"\[0, 50\)"):
        trace_survival(tiny_bert, None, "token=0.5", ids=[1, 50])
    with pytest.raises(DynapruneError, match="no token ids"):
        trace_survival(tiny_bert, None, "token=0.5", ids=[])
    with pytest.raises(DynapruneError, match="empty text"):
        trace_survival(tiny_bert, "  ", "token=0.5")
    with pytest.raises(DynapruneError):
        trace_survival(tiny_bert, None, "tokn=0.5", ids=[1, 2, 3])
    s = trace_survival(tiny_bert, None, "token=0.5", ids=ids(8))
    with pytest.raises(DynapruneError, match="PNG"):
        plot_survival(s, tmp_path / "picture.svg")


def test_plot_is_written_atomically(tiny_bert, tmp_path):
    s = trace_survival(tiny_bert, None, "token=0.5", ids=ids(30))
    out = plot_survival(s, tmp_path / "sub" / "picture.png")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    assert [p.name for p in out.parent.iterdir()] == ["picture.png"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_plot_long_text_and_odd_labels(tmp_path):
    # 300 tokens x 30 layers, built directly: labels are thinned; "$" must not start mathtext.
    n, layers = 300, 30
    keep = torch.linspace(1.0, 0.2, layers)
    alive = torch.arange(n)[None, :] < (keep[:, None] * n)
    alive[:, -1] = True
    importance = torch.rand(layers, n).cumsum(0)
    tokens = ["$x", "<|im_start|>", "a" * 40] + [f"t{i}" for i in range(3, n)]
    s = Survival(tokens=tokens, alive=alive, importance=importance, recipe="token=0.2", model="synthetic",
                 heads_per_layer=[9] * layers)
    out = plot_survival(s, tmp_path / "long.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_render_terminal(tiny_bert):
    s = trace_survival(tiny_bert, None, "token=0.5", ids=ids(10))
    console = Console(record=True, width=100, color_system="truecolor", file=io.StringIO())
    render_terminal(s, console)
    text = console.export_text(clear=False)
    assert f"L{s.n_layers - 1}" in text and "survivors (5/10)" in text
    styles = console.export_html(inline_styles=True)
    assert "line-through" in styles  # pruned tokens are struck through


class FakeBPE:
    """The two tokenizer methods readable_tokens uses, with GPT-2 style byte-level pieces."""

    pieces = {0: "Ġhello", 1: "Ċ", 2: "##ing", 3: "<|im_start|>", 4: "Ġ"}

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens).replace("Ġ", " ").replace("Ċ", "\n")


def test_readable_tokens():
    assert readable_tokens(FakeBPE(), [0, 1, 2, 3, 4]) == ["hello", "↵", "·ing", "<|im_start|>", "␣"]
    assert readable_tokens(None, [7, 8]) == ["7", "8"]


@pytest.mark.models
def test_minilm_sentence(minilm_path, tmp_path):
    import dynaprune

    model = dynaprune.load("minilm-l6")
    text = "it 's a charming and often affecting journey ."
    s = trace_survival(model, text, "token=0.4")
    check_cascade(s)
    assert s.tokens[0] == "[CLS]" and s.tokens[-1] == "[SEP]" and "charming" in s.tokens
    assert s.kept_per_layer == s.summary["tokens_per_layer"]
    assert s.kept_per_layer[0] == len(s.tokens) and s.kept_per_layer[-1] < len(s.tokens)
    assert bool(s.alive[:, 0].all())  # [CLS]
    out = plot_survival(s, tmp_path / "minilm.png")
    assert out.stat().st_size > 0 and out.read_bytes().startswith(PNG_MAGIC)

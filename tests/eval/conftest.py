"""Fixtures of the evaluation tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynaprune.models.llama import Llama, LlamaConfig


class CharTokenizer:
    """One token per character (enough to test the protocols without a real vocabulary)."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random-weight Llama (GQA 4/2 heads) with a character tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                      max_positions=128)
    return Llama(cfg, tokenizer=CharTokenizer(), name="tiny").eval()


class AttentionRecorder:
    """Every attention call of the Llama model: (layer, queries, real keys per row), read from the K
    tensor and the padding mask the attention really receives, not from any counter of the cache or
    of the pruning context (those are what the budget tests check)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, list[int]]] = []

    def per_forward(self, layers: int) -> list[tuple[int, list[int]]]:
        """The calls grouped per forward (one per layer, in order): (queries, real keys of every layer
        and row)."""
        calls = self.calls
        assert len(calls) % layers == 0
        assert [c[0] for c in calls] == list(range(layers)) * (len(calls) // layers)
        return [(calls[i][1], [n for c in calls[i:i + layers] for n in c[2]]) for i in range(0, len(calls), layers)]


@pytest.fixture
def attended_keys(monkeypatch) -> AttentionRecorder:
    import dynaprune.models.llama as llama

    recorder = AttentionRecorder()
    real_attention = llama.attention

    def recording(q, k, v, *, layer, key_padding_mask=None, **kwargs):
        keys = [k.shape[2]] * k.shape[0] if key_padding_mask is None else key_padding_mask.sum(-1).tolist()
        recorder.calls.append((layer, q.shape[2], keys))
        return real_attention(q, k, v, layer=layer, key_padding_mask=key_padding_mask, **kwargs)

    monkeypatch.setattr(llama, "attention", recording)
    return recorder

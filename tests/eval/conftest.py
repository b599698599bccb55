"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest


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

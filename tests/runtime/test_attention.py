"""The shared attention function against a brute-force loop, and its work counting."""

from __future__ import annotations

import math

import pytest
import torch

from dynaprune.runtime.attention import RunContext, attention, count_pairs
from dynaprune.runtime.cost import CostShape, dense_cost, work_cost


def brute_force(q, k, v, key_mask, causal):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Lq):
                allowed = [j for j in range(Lk) if (key_mask is None or key_mask[b, j])
                           and (not causal or j <= i + Lk - Lq)]
                s = torch.tensor([float(q[b, h, i] @ k[b, g, j]) / math.sqrt(D) for j in allowed])
                p = s.softmax(0)
                out[b, h, i] = sum(p[n] * v[b, g, j] for n, j in enumerate(allowed))
    return out


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("causal, lq", [(False, 5), (True, 5), (True, 1)])
@pytest.mark.parametrize("record", [False, True])
def test_matches_brute_force(hq, hkv, causal, lq, record):
    torch.manual_seed(0)
    lk = 5 if not causal else 7
    q, k, v = torch.randn(2, hq, lq, 8), torch.randn(2, hkv, lk, 8), torch.randn(2, hkv, lk, 8)
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, :2] = False  # left padding in the second row
    ctx = RunContext(record_probs=record, record_head_outputs=True)
    out = attention(q, k, v, layer=3, ctx=ctx, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(out, brute_force(q, k, v, mask, causal), atol=1e-5, rtol=1e-5)
    assert ctx.records[0].layer == 3 and (ctx.records[0].probs is not None) == record


def test_probs_path_equals_sdpa_path():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16)
    fast = attention(q, k, v, layer=0)
    slow = attention(q, k, v, layer=0, ctx=RunContext(record_probs=True))
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_counts_real_pairs():
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    assert count_pairs(6, 6, mask, False, 2) == (10, 16 + 36)
    assert count_pairs(6, 6, None, True, 2) == (12, 2 * 21)
    assert count_pairs(1, 6, None, True, 1) == (1, 6)  # a decode step sees every cached key


def test_work_cost_of_a_dense_encoder_equals_the_formula():
    shape = CostShape(layers=2, hidden=32, heads=4, kv_heads=4, head_dim=8, ffn=64, ffn_matrices=2, causal=False)
    ctx = RunContext()
    lengths = [7, 5]
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    for layer in range(2):
        x = torch.randn(2, 4, 7, 8)
        attention(x, x, x, layer=layer, ctx=ctx, key_padding_mask=mask)
    cost = work_cost(shape, ctx.work)
    assert cost["actual"]["flops"] == dense_cost(shape, lengths)["dense_flops"]
    assert cost["flops_kept"] == 1.0


def test_blocked_attention_with_column_sums_equals_brute_force():
    """attention_with_received (blocked, GQA without copies, causal blocks on visible keys only) gives
    the outputs and the attention each key received of the materialised softmax, padding included."""
    from dynaprune.prune.tokens import accumulate_token_importance
    from dynaprune.runtime.attention import attention_with_received, build_mask, expand_kv, sdpa

    torch.manual_seed(0)
    cases = [(2, 4, 2, 7, 7, True, True), (2, 4, 4, 9, 9, False, True), (1, 6, 2, 1, 13, True, False),
             (3, 4, 2, 5, 12, True, True), (2, 2, 1, 33, 33, True, False)]
    for b, hq, hkv, lq, lk, causal, pad in cases:
        q, k, v = torch.randn(b, hq, lq, 8), torch.randn(b, hkv, lk, 8), torch.randn(b, hkv, lk, 8)
        kpm = None
        if pad:
            kpm = torch.ones(b, lk, dtype=torch.bool)
            kpm[0, :3] = False  # left padding: the first queries see no key at all
            kpm[-1, -2:] = False
        qm = kpm if (kpm is not None and lq == lk) else None
        ke, ve = expand_kv(q, k, v)
        mask = build_mask(lq, lk, kpm, causal, q.device)
        scores = (q @ ke.transpose(-1, -2)) * 0.3
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).nan_to_num(0.0)
        expected = accumulate_token_importance(None, probs, kpm, query_mask=qm)
        for block_bytes in (1 << 25, 64):  # one block, and one query row per block
            out, received = attention_with_received(q, k, v, 0.3, kpm, causal, qm, block_bytes=block_bytes)
            torch.testing.assert_close(out, probs @ ve)
            torch.testing.assert_close(received, expected)
        if not pad:
            torch.testing.assert_close(sdpa(q, k, v, kpm, causal, 0.3), probs @ ve, atol=1e-5, rtol=1e-5)


def test_blocked_attention_reads_a_kv_cache_slice_in_place_and_gets_the_same_numbers():
    """K/V that are slices of a longer cache buffer (what a KV cache hands back) are used without a
    copy, and give what their contiguous copies give; a transposed K is still copied."""
    from dynaprune.runtime.attention import _foldable, attention_with_received

    torch.manual_seed(1)
    buffer_k, buffer_v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    k, v = buffer_k[:, :, :17], buffer_v[:, :, :17]
    assert not k.is_contiguous() and _foldable(k).data_ptr() == k.data_ptr()
    transposed = torch.randn(2, 17, 3, 8).transpose(1, 2)
    assert _foldable(transposed).is_contiguous() and _foldable(transposed).data_ptr() != transposed.data_ptr()
    q = torch.randn(2, 6, 1, 8)
    for block_bytes in (1 << 25, 64):
        out, received = attention_with_received(q, k, v, 0.3, None, True, None, block_bytes=block_bytes)
        ref_out, ref_received = attention_with_received(q, k.contiguous(), v.contiguous(), 0.3, None, True, None,
                                                        block_bytes=block_bytes)
        assert torch.equal(out, ref_out) and torch.equal(received, ref_received)

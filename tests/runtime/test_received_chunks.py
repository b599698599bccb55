"""attention_with_received in chunks of batch rows (runtime/attention.py ``_batch_chunks``): the same
numbers as one pass over the whole batch, bit for bit, and the textbook softmax attention as oracle."""

from __future__ import annotations

import pytest
import torch

from dynaprune.runtime.attention import attention_with_received


def textbook(q, k, v, scale, key_mask, query_mask, key_bias):
    """probs = softmax(q k^T scale + bias) over real keys; out = probs v; received = probs summed over
    heads and real queries (one K/V head per query head)."""
    scores = q @ k.transpose(-1, -2) * scale
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    weight = torch.ones(q.shape[0], q.shape[2], dtype=q.dtype) if query_mask is None else query_mask.to(q.dtype)
    return probs @ v, (probs * weight[:, None, :, None]).sum((1, 2))


@pytest.mark.parametrize("batch", [3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_chunks_equal_one_pass_bit_for_bit_and_the_textbook(batch, dtype):
    g = torch.Generator().manual_seed(batch)
    H, L, D = 3, 37, 8
    q, k, v = (torch.randn(batch, H, L, D, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[1, 30:] = False
    bias = torch.rand(batch, L, generator=g, dtype=dtype)
    one_row = H * L * q.element_size()  # a query block of 1 query per row: chunks of 2 rows and more
    for key_bias in (None, bias):
        whole = attention_with_received(q, k, v, 0.3, mask, False, mask, block_bytes=batch * one_row,
                                        key_bias=key_bias, batch_block_bytes=0)
        chunked = attention_with_received(q, k, v, 0.3, mask, False, mask, block_bytes=batch * one_row,
                                          key_bias=key_bias, batch_block_bytes=2 * one_row)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
        out, received = textbook(q, k, v, 0.3, mask, mask, key_bias)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(chunked[0], out, rtol=tol, atol=tol)
        torch.testing.assert_close(chunked[1], received, rtol=tol, atol=tol * L)


def test_gqa_and_per_kv_head_sums_in_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 6, 4, 2, 21, 8
    q = torch.randn(B, Hq, L, D, generator=g)
    k, v = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(2))
    mask = torch.rand(B, Hkv, L, generator=g) > 0.2  # a per-KV-head key mask
    whole = attention_with_received(q, k, v, 0.5, mask, False, per_kv_head=True, batch_block_bytes=0)
    chunked = attention_with_received(q, k, v, 0.5, mask, False, per_kv_head=True, batch_block_bytes=1)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])

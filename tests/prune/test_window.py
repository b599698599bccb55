"""prune/window.py against a brute-force reference: the full causal softmax, rows summed by hand."""

import pytest
import torch

from dynaprune.prune.window import pool_scores, window_attention


def brute_force(q, k, window, scale, key_mask=None):
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    out = torch.zeros(B, Hq, Lk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq - window, Lq):
                pos = Lk - Lq + i  # query i's own position among the keys
                seen = [j for j in range(pos + 1) if key_mask is None or bool(key_mask[b, j])]
                if not seen:
                    continue
                s = torch.tensor([float(q[b, h, i] @ k[b, h, j]) * scale for j in seen], dtype=torch.float64)
                out[b, h, seen] += s.softmax(0)
    return out


@pytest.mark.parametrize("hq,hkv,lq,lk,window", [(4, 2, 7, 7, 3), (3, 3, 5, 5, 5), (6, 2, 2, 9, 2), (2, 1, 6, 6, 1)])
def test_window_attention_matches_brute_force(hq, hkv, lq, lk, window):
    g = torch.Generator().manual_seed(hq * 100 + lk)
    q = torch.randn(2, hq, lq, 8, generator=g)
    k = torch.randn(2, hkv, lk, 8, generator=g)
    got = window_attention(q, k, window, scale=0.3)
    torch.testing.assert_close(got.double(), brute_force(q, k, window, 0.3), atol=1e-5, rtol=1e-5)
    # every window query's row sums to 1: the total is window per head
    torch.testing.assert_close(got.sum(-1), torch.full((2, hq), float(window)), atol=1e-4, rtol=0)


def test_window_attention_padding_keys_get_nothing():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 1, 6, 4, generator=g)
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    got = window_attention(q, k, 4, key_padding_mask=mask)
    assert bool((got[0, :, :2] == 0).all())
    torch.testing.assert_close(got.double(), brute_force(q, k, 4, 0.5, mask), atol=1e-5, rtol=1e-5)


def test_window_attention_rejects_bad_window():
    q, k = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    for w in (0, 5):
        with pytest.raises(ValueError, match="window"):
            window_attention(q, k, w)


def test_pool_scores_is_a_running_max():
    s = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 2.0]])
    assert pool_scores(s, 3).tolist() == [[5.0, 5.0, 5.0, 1.0, 2.0, 2.0]]
    assert pool_scores(s, 1) is s
    with pytest.raises(ValueError):
        pool_scores(s, 2)

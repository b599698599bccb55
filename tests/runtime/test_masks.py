"""Sliding windows by original position on a cache compacted per KV head (runtime/masks.py): each KV head's
keys have their own positions. Oracle: the same attention run head by head with that head's positions."""

from __future__ import annotations

import torch

from dynaprune.runtime.attention import RunContext, attention_with_received
from dynaprune.runtime.masks import SlidingWindow, build_mask, count_pairs


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lk, lq = 9, 3
    # two KV heads, each its own sorted prompt survivors, then the same 3 new tokens at 30, 31, 32
    k_pos = torch.stack([torch.cat([torch.randperm(30, generator=g)[:lk - lq].sort().values,
                                    torch.arange(30, 33)]) for _ in range(2)])[None]  # (1, 2, 9)
    q_pos = torch.arange(30, 33)[None]
    q, k, v = (torch.randn(1, h, n, 8, generator=g) for h, n in ((4, lq), (2, lk), (2, lk)))
    valid = torch.ones(1, 2, lk, dtype=torch.bool)
    valid[0, 1, 2] = False  # a padded slot of head 1
    return q, k, v, q_pos, k_pos, valid


def test_per_head_window_equals_each_head_alone():
    q, k, v, q_pos, k_pos, valid = _case()
    window = SlidingWindow(12, q_pos, k_pos)
    assert not torch.equal(window.visible()[0, 0], window.visible()[0, 1])  # not vacuous
    dense = RunContext().attend(0, q, k, v, valid, True, 0.3, window=window)
    explicit, received = attention_with_received(q, k, v, 0.3, valid, True, window=window, per_kv_head=True)
    for h in range(2):  # head h serves query heads 2h, 2h + 1
        alone = SlidingWindow(12, q_pos, k_pos[:, h])
        mask = build_mask(3, 9, valid[:, h], True, q.device, alone)  # (1, 1, 3, 9)
        qh = q[:, 2 * h:2 * h + 2]
        p = (qh @ k[:, h:h + 1].transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(dense[:, 2 * h:2 * h + 2], p @ v[:, h:h + 1])
        torch.testing.assert_close(explicit[:, 2 * h:2 * h + 2], p @ v[:, h:h + 1])
        torch.testing.assert_close(received[:, h], p.sum((1, 2)))


def test_per_head_pair_count_is_the_mean_over_heads():
    _, _, _, q_pos, k_pos, valid = _case(1)
    seen = [int(build_mask(3, 9, valid[:, h], True, torch.device("cpu"), SlidingWindow(12, q_pos, k_pos[:, h]))
                .sum()) for h in range(2)]
    assert count_pairs(3, 9, valid, True, 1, SlidingWindow(12, q_pos, k_pos)) == (3, round(sum(seen) / 2))

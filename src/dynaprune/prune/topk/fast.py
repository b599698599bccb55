"""The fast path: ``topk_mask`` / ``topk_indices`` select exactly Algorithm 3's set (the k largest,
earliest positions among ties, indices in input order) with a few batched torch ops. CPU tensors go
through ``numpy_path`` first; this torch implementation serves other devices, NaN inputs and bfloat16,
and raises every argument error."""

from __future__ import annotations

import math

import torch

from dynaprune.errors import DynapruneError
from dynaprune.prune.topk.config import _check_k_dtype, _check_k_range, _check_scalar_k, _nan_error
from dynaprune.prune.topk.numpy_path import _numpy_topk


def _row_k(scores: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Validate k; returns (per-row k tensor or None for a scalar k, the largest k)."""
    n = scores.shape[-1]
    if isinstance(k, torch.Tensor):
        _check_k_dtype(k)
        kk = torch.broadcast_to(k.to(device=scores.device, dtype=torch.long), scores.shape[:-1]).contiguous()
        if not kk.numel():
            return kk, 0
        lo, hi = (int(v) for v in torch.aminmax(kk))
        _check_k_range(lo, hi, n)
        return kk, hi
    return None, _check_scalar_k(k, n)


def _lowest(t: torch.Tensor) -> float | int:
    return -math.inf if t.dtype.is_floating_point else torch.iinfo(t.dtype).min


def _top_two(scores: torch.Tensor, kk: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k-th largest, (k+1)-th largest or the dtype's lowest, some row tied?), thresholds shaped (..., 1).

    One torch.topk of k + 1 (unsorted for a scalar k: the two smallest of it are the k-th and (k+1)-th
    largest) tells whether the k-th largest is tied with an element outside the top k; only then does
    the position rule matter (one sync for the whole batch). torch.topk ranks NaN above everything,
    so a NaN anywhere in a row shows up in these k + 1 values.
    """
    n = scores.shape[-1]
    m = min(k + 1, n)
    per_row = kk is not None
    top = torch.topk(scores, m, dim=-1, sorted=per_row)
    check_nan = scores.dtype.is_floating_point
    if not per_row:
        if m == k:  # k == n: nothing outside the top k
            kth = top.values.amin(dim=-1, keepdim=True)
            nxt = torch.full_like(kth, _lowest(kth))
        else:
            low = torch.topk(top.values, 2, dim=-1, largest=False, sorted=True).values
            kth, nxt = low[..., 1:2], low[..., 0:1]
        flags = (nxt == kth).any()
        if check_nan:
            flags = flags | torch.isnan(top.values).any()
    else:
        kth = top.values.gather(-1, (kk - 1).clamp(min=0).unsqueeze(-1))
        padded = torch.cat([top.values, torch.full_like(top.values[..., :1], _lowest(top.values))], dim=-1)
        nxt = padded.gather(-1, kk.unsqueeze(-1).clamp(max=m))
        flags = ((nxt == kth).squeeze(-1) & (kk > 0)).any()
        if check_nan:  # sorted: a row's NaN comes first
            flags = flags | torch.isnan(top.values[..., :1]).any()
    problem = bool(flags)
    if problem and check_nan and bool(torch.isnan(top.values).any()):
        raise _nan_error()
    return kth, nxt, problem


def _fix_ties(scores: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor, want: torch.Tensor,
              rows: torch.Tensor) -> None:
    """In the ``rows`` where the threshold is tied, keep everything above it and the earliest ties."""
    idx = rows.nonzero(as_tuple=True)
    s, t, w = scores[idx], thr[idx], want[idx]
    gt = s > t
    eq = s == t
    need = (w - gt.sum(dim=-1)).unsqueeze(-1)
    fixed = gt | (eq & (eq.cumsum(dim=-1) <= need))
    mask[idx] = fixed & (w > 0).unsqueeze(-1)


def _prepare(scores: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    if scores.dim() < 1:
        raise DynapruneError("top-k scores need at least one dimension")
    return _row_k(scores, k)


def topk_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask (..., n) of Algorithm 3's selection: the k largest, earliest positions among ties.

    ``k`` is an int or an integer tensor broadcastable to ``scores.shape[:-1]`` (per-row k). CPU tensors
    take the numpy path (``_numpy_topk``: one partition, a comparison, a count). The torch path (other
    devices, NaN, bfloat16), for a scalar k: the (k+1)-th largest (torch.kthvalue, or torch.topk for
    small k), one comparison and one count; per-row k: one sorted torch.topk of max(k) + 1 and one
    comparison. Either path runs an exact tie fix-up (a cumsum over the elements equal to the k-th
    largest) only when some row's k-th largest value also occurs outside its top k.
    """
    out = _numpy_topk(scores, k, False)
    return _torch_mask(scores, k) if out is None else out


def _torch_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``topk_mask`` in torch ops (any device; every NaN input and every error goes through here)."""
    if scores.dim() == 1:  # one row: the batched code path with a unit batch
        return _torch_mask(scores.unsqueeze(0), k.reshape(1) if isinstance(k, torch.Tensor) else k)[0]
    kk, kmax = _prepare(scores, k)
    return _mask(scores, kk, kmax)


def _mask(scores: torch.Tensor, kk: torch.Tensor | None, kmax: int) -> torch.Tensor:
    n = scores.shape[-1]
    if kmax == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # The common case in a few dispatches: keep what is above the (k+1)-th largest, and check that this
    # is exactly k per row (else a tie at the threshold or a NaN: the exact path below).
    if kk is None and kmax < n:
        if 4 * (kmax + 1) <= n or n >= 4096:  # measured: the cheaper of the two on CPU
            nxt = torch.topk(scores, kmax + 1, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        else:
            nxt = torch.kthvalue(scores, n - kmax, dim=-1, keepdim=True).values
        mask = scores > nxt
        if bool((mask.sum(dim=-1) == kmax).all()):
            return mask
    elif kk is not None:
        top = torch.topk(scores, min(kmax + 1, n), dim=-1, sorted=True).values
        nxt = top.gather(-1, kk.clamp(max=top.shape[-1] - 1).unsqueeze(-1))
        mask = scores > nxt
        if bool((mask.sum(dim=-1) == kk).all()):
            return mask
    kth, nxt, tied_somewhere = _top_two(scores, kk, kmax)
    if kk is None and kmax == n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = scores >= kth
    if kk is not None:
        mask &= (kk > 0).unsqueeze(-1)
    if tied_somewhere:
        tied = (nxt == kth).squeeze(-1)
        want = kk if kk is not None else torch.full(scores.shape[:-1], kmax, device=scores.device)
        _fix_ties(scores, mask, kth, want, tied & (want > 0))
    return mask


def topk_indices(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Positions of Algorithm 3's selection in increasing (input) order, shape (..., k).

    With a per-row k the last dimension is max(k) and shorter rows are padded with -1 at the end.
    """
    out = _numpy_topk(scores, k, True)
    return _torch_indices(scores, k) if out is None else out


def _torch_indices(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``topk_indices`` in torch ops (any device; every NaN input and every error goes through here)."""
    if scores.dim() == 1:
        return _torch_indices(scores.unsqueeze(0), k.reshape(1) if isinstance(k, torch.Tensor) else k)[0]
    kk, kmax = _prepare(scores, k)
    lead = scores.shape[:-1]
    if kmax == 0:
        return torch.empty((*lead, 0), dtype=torch.long, device=scores.device)
    mask = _mask(scores, kk, kmax)
    if kk is None:  # exactly k kept per row: nonzero lists them row by row, in input order
        return mask.nonzero()[:, -1].view(*lead, kmax)
    return _indices_from_mask(mask, kmax)


def _indices_from_mask(mask: torch.Tensor, kmax: int) -> torch.Tensor:
    """Kept positions of each row in input order, padded with -1 to ``kmax`` (a cumsum + one scatter)."""
    slot = torch.where(mask, mask.cumsum(dim=-1) - 1, kmax)  # dropped lanes go to a spare column
    out = torch.full((*mask.shape[:-1], kmax + 1), -1, dtype=torch.long, device=mask.device)
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(slot)
    return out.scatter_(-1, slot, pos)[..., :kmax]


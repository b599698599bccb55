"""The fast path on the CPU: ``topk_mask`` / ``topk_indices`` through numpy (one ``np.partition``, a
comparison, a count), or None where the torch path (``fast``) must decide. Whether it runs is the
package's ``NUMPY_MAX_N`` knob, read at every call so setting ``dynaprune.prune.topk.NUMPY_MAX_N``
switches it (tests and ``benchmarks/topk.py`` set it to 0 to run the torch path)."""

from __future__ import annotations

import numpy as np
import torch

import dynaprune.prune.topk as _package
from dynaprune.prune.topk.config import _check_k_dtype, _check_k_range, _check_scalar_k

_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                           torch.int32, torch.int64})
_INTP_IS_INT64 = np.dtype(np.intp) == np.dtype(np.int64)  # nonzero / argsort positions are intp


def _numpy_topk(scores: torch.Tensor, k: int | torch.Tensor, indices: bool) -> torch.Tensor | None:
    """``topk_indices`` (``indices``) or ``topk_mask`` through numpy, or None where it does not apply.

    It applies to a strided CPU tensor of a dtype both libraries order alike, with 1 <= n (<=
    ``NUMPY_MAX_N`` when set) and max k >= 1, and holding no NaN; everything else (other devices,
    NaN, k = 0, a k tensor on another device or one that does not broadcast) returns None for the torch
    path, which decides and raises exactly as before. Bad k values raise here through ``_row_k``'s checks.

    Common case: one ``np.partition`` gives each row's (k+1)-th largest w, and ``x > w`` keeps at most
    k per row (NaN, which both libraries rank above everything, never compares greater); a count over
    the whole batch equal to the sum of the k's means every row kept exactly k, i.e. no tie at the
    threshold and no NaN, so the mask is exact. Otherwise (a tie at the threshold, a NaN, or k = n in
    some row): NaN goes to the torch path; ties are settled as ``_fix_ties`` does, from the k-th largest
    (a second partition) and a cumsum over the equal elements (the earliest kept, as Algorithm 3's
    filter keeps them).
    """
    if not scores.is_cpu or scores.dtype not in _NUMPY_DTYPES or scores.layout != torch.strided:
        return None
    shape = scores.shape
    if not shape:
        return None
    n = shape[-1]
    if n == 0 or (_package.NUMPY_MAX_N is not None and n > _package.NUMPY_MAX_N):
        return None
    if isinstance(k, torch.Tensor):
        kk = _numpy_row_k(k, shape)
        if kk is None:
            return None
        kmax = int(kk.max())
        _check_k_range(int(kk.min()), kmax, n)
    else:
        kk, kmax = None, _check_scalar_k(k, n)
    if kmax == 0:
        return None
    a = (scores.detach() if scores.requires_grad else scores).numpy()
    if kmax < n:
        if kk is None:
            mask = a > np.partition(a, n - kmax - 1, axis=-1)[..., n - kmax - 1, None]
            total = mask.size // n * kmax
        else:
            pos = n - 1 - kk  # ascending position of each row's (k+1)-th largest; n - 1 (the max) at k = 0
            part = np.partition(a, np.unique(pos), axis=-1)
            mask = a > np.take_along_axis(part, pos[..., None], axis=-1)
            total = int(kk.sum())
        if indices:  # the count is the number of positions found
            flat = mask.ravel().nonzero()[0]  # 1-D nonzero: several times faster than an N-D one
            if flat.size == total:
                return torch.from_numpy(_numpy_columns(flat, mask.shape, kk, kmax))
        elif np.count_nonzero(mask) == total:
            return torch.from_numpy(mask)
    if a.dtype.kind == "f" and np.isnan(a).any():
        return None
    # exact (as _fix_ties): keep what is above each row's k-th largest v and its earliest copies of v
    if kk is None:
        want: int | np.ndarray = kmax
        v = np.partition(a, n - kmax, axis=-1)[..., n - kmax, None]
    else:
        want = kk[..., None]
        pos = n - np.maximum(kk, 1)  # a row with k = 0 compares with its max: nothing above, none wanted
        v = np.take_along_axis(np.partition(a, np.unique(pos), axis=-1), pos[..., None], axis=-1)
    gt, eq = a > v, a == v
    mask = gt | (eq & (np.cumsum(eq, axis=-1) <= want - gt.sum(axis=-1, keepdims=True)))
    if indices:
        return torch.from_numpy(_numpy_columns(mask.ravel().nonzero()[0], mask.shape, kk, kmax))
    return torch.from_numpy(mask)


def _numpy_row_k(k: torch.Tensor, shape: torch.Size) -> np.ndarray | None:
    """Per-row k as int64 numpy broadcast to the rows, or None to leave it to ``_row_k``."""
    _check_k_dtype(k)
    if not k.is_cpu or k.dtype not in _NUMPY_DTYPES or k.layout != torch.strided:
        return None
    kn, lead = k.numpy(), shape[:-1]
    if not lead:  # one row: k must hold one value (the torch path reshapes it to (1,))
        if kn.size != 1:
            return None
        kn = kn.reshape(())
    try:
        kk = np.broadcast_to(kn, lead).astype(np.int64)
    except ValueError:
        return None
    return kk if kk.size else None


def _numpy_columns(flat: np.ndarray, shape: tuple[int, ...], kk: np.ndarray | None, kmax: int) -> np.ndarray:
    """Kept positions per row in input order, (..., kmax) int64, from the flat positions of the kept
    lanes (row by row, in order; exactly k in each row); rows with a smaller per-row k padded with -1."""
    n, lead = shape[-1], shape[:-1]
    flat = flat if _INTP_IS_INT64 else flat.astype(np.int64)
    if kk is None:
        if flat.size == kmax:  # one row: flat positions are the columns
            return flat.reshape(*lead, kmax)
        if flat.size <= 1024:  # flat position -> column: one op, cheaper for few positions
            return (flat % n).reshape(*lead, kmax)
        return (flat.reshape(-1, kmax) - np.arange(0, flat.size // kmax * n, n)[:, None]).reshape(*lead, kmax)
    out = np.full((*lead, kmax), -1, dtype=np.int64)
    out[np.arange(kmax) < kk[..., None]] = flat % n  # boolean assignment fills row by row, in order
    return out

"""HDP approximation: ``S = S_I + Q_I K_F^T + Q_F K_I^T`` (the fraction x fraction term dropped), near-zero
products, and the bound on the score error of fixed point + approximation.

HDP (arXiv 2407.12893) Sec. III; summary (``shared/seeds/hdp-summary.md``) Mechanism 3: "Integer atten
+ Frac1 atten + Frac2 atten, where near-zero pruning occurs when integer parts are zero".
"""

from __future__ import annotations

import torch

from dynaprune.prune.hdp.fixed_point import _F64, FixedPoint, integer_scores


def approximate_scores(q_fp: FixedPoint, k_fp: FixedPoint, approx: bool = True) -> torch.Tensor:
    """S_I + Q_I K_F^T + Q_F K_I^T (+ Q_F K_F^T when ``approx`` is False), exact, in scale units.

    Near-zero pruning needs no special case here: where both integer parts are zero the two kept
    cross terms are zero already, so skipping them changes nothing; ``near_zero_products`` counts them.
    """
    scores = integer_scores(q_fp, k_fp) + q_fp.int_part @ k_fp.frac_part.mT + q_fp.frac_part @ k_fp.int_part.mT
    if not approx:
        scores = scores + q_fp.frac_part @ k_fp.frac_part.mT
    return scores


def dense_fixed_point_scores(q_fp: FixedPoint, k_fp: FixedPoint) -> torch.Tensor:
    """(Q_I + Q_F)(K_I + K_F)^T in scale units: what approx=off must reproduce exactly."""
    return q_fp.units @ k_fp.units.mT


def near_zero_products(q_fp: FixedPoint, k_fp: FixedPoint) -> torch.Tensor:
    """Per (query, key): how many of the D products q_d * k_d have both integer parts zero."""
    return (q_fp.int_part == 0).to(_F64) @ (k_fp.int_part == 0).to(_F64).mT


def score_error_bound(
    q_fp: FixedPoint, k_fp: FixedPoint, q: torch.Tensor, *, approx: bool, softmax_scale: float = 1.0
) -> torch.Tensor:
    """Elementwise bound on |exact q.k - fixed-point score| (..., Lq, Lk), both times ``softmax_scale``.

    Rounding: |q - q^| <= dq = q.scale 2**-(F+1), same for k, so
        |q.k - q^.k^| <= dk sum_d |q_d| + dq sum_d |k^_d|      (unsaturated tensors)
    and approx adds the dropped term: q.scale k.scale |Q_F K_F^T| <= q.scale k.scale sum_d |q_F||k_F|.
    Note that the dropped term does not shrink with F (|frac| < 1 unit whatever F is); it shrinks as
    I grows, because a unit is then a smaller part of the range.
    """
    dq = q_fp.scale * 2.0 ** -(q_fp.frac_bits + 1)
    dk = k_fp.scale * 2.0 ** -(k_fp.frac_bits + 1)
    q_l1 = q.detach().to(_F64).abs().sum(-1, keepdim=True)  # (..., Lq, 1)
    k_l1 = k_fp.dequantize().abs().sum(-1)[..., None, :]  # (..., 1, Lk)
    bound = dk * q_l1 + dq * k_l1
    if approx:
        bound = bound + q_fp.scale * k_fp.scale * (q_fp.frac_part.abs() @ k_fp.frac_part.abs().mT)
    return bound * softmax_scale

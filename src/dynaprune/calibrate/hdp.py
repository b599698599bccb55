"""Calibration of HDP's two thresholds on a few examples: rho_B for a target block sparsity, tau_H for a
target head sparsity (HDP, arXiv 2407.12893, Sec. III: "the thresholds are calibrated"; the summary's
first experiments: profile theta_head and the block importance distribution).

The block rule (``prune/hdp/blocks.py``) keeps a block iff ``importance >= theta(rho_B)`` with
``theta = mean + rho_B (max - mean)`` (rho_B >= 0) or ``mean + rho_B (mean - min)`` (rho_B < 0), from
its row's valid blocks. Solved for rho_B, every block has a *critical ratio* r*: it is kept exactly
for ``rho_B <= r*`` (:func:`critical_ratios`). Block sparsity at rho_B is then the share of blocks with
``r* < rho_B``, so calibration is a quantile of the critical ratios, exact and in one pass
(:func:`ratio_for_sparsity`), instead of a bisection over re-runs. Forced blocks (causal diagonal,
``keep_first_block``) and each row's best block(s) have r* = +inf: no rho_B in [-1, 1] prunes them.

The scores are recorded on a forward pass of the model under a base recipe (dense by default, or e.g.
``token=0.6`` for a combined SpAtten x HDP recipe) without block or head pruning: later layers see
unpruned inputs during calibration, so the block sparsity measured under pruning drifts a little from
the target (the curves report the measured value).

This module reads evaluation data and runs models, so it sits above the runtime (``calibrate/``); the
tensor-level calibration it builds on is ``prune/hdp/calibration.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynaprune.errors import DynapruneError
from dynaprune.io import write_text_atomic
from dynaprune.prune.hdp import (
    Calibration,
    block_importance,
    calibrate_head_threshold,
    check_block_score,
    check_fixed_bits,
    forced_blocks,
    head_importance,
    integer_scores,
    to_fixed_point,
    valid_pairs,
)
from dynaprune.prune.hdp.config import DEFAULT_BLOCK_SCORE, _check_target
from dynaprune.prune.recipe import Recipe
from dynaprune.runtime.attention import build_mask

_F64 = torch.float64
SAME_RATIO = 1e-9
"""Critical ratios closer than this are treated as one (calibration never puts rho_B between them)."""


# ----------------------------------------------------------------------------- knobs


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate: targets and the block rule the recipe will use.

    block_sparsity: target share of valid blocks pruned, in [0, 1).
    head_sparsity: target share of (example, layer, head) triples pruned early, in [0, 1); None = none.
    block_size, block_score, keep_first_block, int_bits, frac_bits: as in ``HDPConfig`` (the recipe
        file carries them, so the calibrated rho_B is used with the rule it was found for).
    tolerance: the largest |achieved - target| accepted (ties and few blocks make sparsity jump).
    """

    block_sparsity: float
    head_sparsity: float | None = None
    block_size: int = 2
    block_score: str = DEFAULT_BLOCK_SCORE
    keep_first_block: bool = False
    int_bits: int = 8
    frac_bits: int = 8
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        _check_target(self.block_sparsity, "target block sparsity")
        if self.head_sparsity is not None:
            _check_target(self.head_sparsity, "target head sparsity")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise DynapruneError(f"block_size must be a positive integer, got {self.block_size!r}")
        check_block_score(self.block_score)
        check_fixed_bits(self.int_bits, self.frac_bits)


# ----------------------------------------------------------------------- pure functions


def critical_ratios(
    importance: torch.Tensor, valid_blocks: torch.Tensor, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """Per valid block, the largest rho_B that keeps it (HDP Sec. III block pruning, our threshold reading).

    importance (..., nbq, nbk); valid_blocks and forced bool, broadcastable. Returns a 1-D float64 tensor
    of r* for the valid blocks (row-major order): block kept by ``block_keep_mask`` at ratio rho iff
    ``rho <= r*``. With the row's valid mean m, max M and min n:
        x == M or forced   -> +inf (kept at every rho_B in [-1, 1]);
        m <= x < M         -> (x - m) / (M - m)   in [0, 1);
        x < m              -> (x - m) / (m - n)   in [-1, 0).
    """
    valid = valid_blocks.expand(importance.shape)
    x = importance.to(_F64)
    count = valid.sum(-1, keepdim=True)
    mean = (x * valid).sum(-1, keepdim=True) / count.clamp_min(1)
    top = x.masked_fill(~valid, -math.inf).amax(-1, keepdim=True)
    bottom = x.masked_fill(~valid, math.inf).amin(-1, keepdim=True)
    above = (x - mean) / (top - mean).clamp_min(1e-300)
    below = (x - mean) / (mean - bottom).clamp_min(1e-300)
    ratio = torch.where(x >= mean, above, below)
    always = x >= top
    if forced is not None:
        always = always | forced.expand(importance.shape)
    ratio = ratio.masked_fill(always, math.inf)
    return ratio[valid]


def ratio_for_sparsity(ratios: torch.Tensor | Sequence[torch.Tensor], target: float) -> Calibration:
    """rho_B in [-1, 1] whose block sparsity (share of ``ratios`` below it) is nearest ``target``.

    Exact: the reachable sparsities are #(r* < u) / N for the distinct critical ratios u (and everything
    finite pruned at rho_B = 1); the nearest wins, ties go to less pruning. rho_B is the midpoint between
    the neighbouring distinct ratios, so rounding in the threshold formula cannot move a block across.
    """
    _check_target(target, "target block sparsity")
    parts = [ratios] if isinstance(ratios, torch.Tensor) else list(ratios)
    r = torch.cat([p.reshape(-1).to(_F64) for p in parts]) if parts else torch.empty(0, dtype=_F64)
    n = r.numel()
    if n == 0:
        raise DynapruneError("the calibration samples hold no valid block")
    finite = torch.sort(r[torch.isfinite(r)]).values
    # ratios closer than SAME_RATIO are one value (equal ones computed along different roundings)
    starts = torch.cat([torch.ones(min(1, finite.numel()), dtype=torch.bool), finite.diff() > SAME_RATIO])
    first = finite[starts]  # smallest ratio of each group
    last = finite[torch.cat([starts[1:], torch.ones(min(1, finite.numel()), dtype=torch.bool)])]
    below = torch.nonzero(starts).reshape(-1)  # blocks strictly below each group
    pruned = torch.cat([below, torch.tensor([finite.numel()])]).to(_F64)  # + "all finite pruned"
    best = int(torch.argmin((pruned / n - target).abs()))  # first = least pruning on ties
    if best == len(first):
        rho = 1.0
    elif best == 0:
        rho = -1.0
    else:
        rho = float((last[best - 1] + first[best]) / 2)
    return Calibration(max(-1.0, min(1.0, rho)), float(pruned[best]) / n, target)


# ----------------------------------------------------------------------------- recording


@dataclass
class ScoreRecorder:
    """Collects critical ratios (float32, finite ones) and theta_head of every attention call it sees.

    ``wrap(ctx)`` makes a run context record before it attends: q and k are put in fixed point as the
    HDP path does (per-call abs-max scale), S_I = Q_I K_I^T over valid pairs (causal, a sliding window's
    band, key padding, and padding query rows when Lq == Lk), then the block importance and theta_head.
    """

    spec: CalibrationSpec
    finite_ratios: list[torch.Tensor] = field(default_factory=list)
    always_kept: int = 0
    head_thetas: list[torch.Tensor] = field(default_factory=list)
    calls: int = 0

    def record(self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
               window: int | None = None) -> None:
        spec = self.spec
        if q.shape[1] != k.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        lq, lk = q.shape[2], k.shape[2]
        valid = valid_pairs(lq, lk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
        if causal and window is not None:  # a sliding-window layer (Gemma 3): keys older than the window
            valid = valid & build_mask(lq, lk, None, True, q.device, window)
        if key_padding_mask is not None and lq == lk:
            valid = valid & key_padding_mask.to(torch.bool)[:, None, :, None]
        s_int = integer_scores(to_fixed_point(q, spec.int_bits, spec.frac_bits),
                               to_fixed_point(k, spec.int_bits, spec.frac_bits)) * valid
        self.head_thetas.append(head_importance(s_int).reshape(-1).to(_F64))
        if spec.block_size <= lk:
            importance, valid_blocks = block_importance(s_int, spec.block_size, valid, spec.block_score)
            forced = forced_blocks(lq, lk, spec.block_size, causal=causal,
                                   keep_first_block=spec.keep_first_block, device=q.device)
            r = critical_ratios(importance, valid_blocks, forced)
            finite = torch.isfinite(r)
            self.always_kept += int((~finite).sum())
            self.finite_ratios.append(r[finite].to(torch.float32))
        self.calls += 1

    def wrap(self, ctx):
        inner = ctx.attend

        def attend(layer, q, k, v, key_padding_mask, causal, scale, window=None):
            self.record(q, k, key_padding_mask, causal, window)
            return inner(layer, q, k, v, key_padding_mask, causal, scale, window=window)

        ctx.attend = attend
        return ctx

    def block_ratio(self) -> Calibration:
        ratios = self.finite_ratios + [torch.full((self.always_kept,), math.inf)]
        result = ratio_for_sparsity(ratios, self.spec.block_sparsity)
        if abs(result.achieved - self.spec.block_sparsity) > self.spec.tolerance:
            raise DynapruneError(
                f"block sparsity {self.spec.block_sparsity:g} is out of reach on the calibration examples: the "
                f"nearest is {result.achieved:.4f} (rho_B = {result.value:.4f}); each row keeps its best "
                "block(s) and tied importances move together"
            )
        return result

    def head_threshold(self) -> Calibration | None:
        if self.spec.head_sparsity is None:
            return None
        return calibrate_head_threshold(self.head_thetas, self.spec.head_sparsity, tolerance=self.spec.tolerance)


# ----------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class HDPCalibration:
    """The result: the recipe to save and what was measured on the calibration examples."""

    recipe: Recipe
    block: Calibration
    head: Calibration | None
    examples: int
    calls: int
    blocks: int


def read_calibration_texts(path: str | Path) -> list[str]:
    """Sentences of a calibration file: a ``text<TAB>label`` TSV (SST-2 train), an STS TSV (both
    sentences of each pair), or plain text (one sentence a non-blank line)."""
    from dynaprune.eval.data import load_labeled_text, load_sts

    p = _check_data_file(path)
    if p.suffix.lower() == ".tsv":
        try:
            return [row.text for row in load_labeled_text(p)]
        except DynapruneError:
            return [s for pair in load_sts(p) for s in (pair.s1, pair.s2)]
    lines = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise DynapruneError(f"calibration data {p} holds no text")
    return texts


def _check_data_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DynapruneError(f"calibration data not found: {p}")
    if p.stat().st_size == 0:
        raise DynapruneError(f"calibration data {p} is empty")
    return p


def calibrate_model(
    model,
    data: str | Path,
    spec: CalibrationSpec,
    *,
    base_recipe: Recipe | str | None = None,
    examples: int | None = None,
    window: int = 1024,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> HDPCalibration:
    """Run ``model`` on a few calibration examples under ``base_recipe`` and calibrate rho_B and tau_H.

    Encoders (``model.embed``): ``examples`` sentences (default 64) drawn with ``seed`` from ``data``.
    Decoders: ``examples`` windows (default 2) of ``window`` tokens from the start of ``data``.
    Returns the base recipe with ``block``, ``block_size``, ``block_score``, ``fixed`` (and ``hdp_head``)
    set; the base recipe must not prune blocks or heads early itself.
    """
    from dynaprune.runtime.pruning import make_context

    base = base_recipe if isinstance(base_recipe, Recipe) else Recipe.parse(base_recipe or "")
    if base.block is not None or base.block_sparsity is not None or base.hdp_head is not None:
        raise DynapruneError("the base recipe of a calibration must not set block, block_sparsity or hdp_head")
    for name, value in (("examples", examples), ("window", window), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DynapruneError(f"{name} must be a positive integer, got {value!r}")
    recorder = ScoreRecorder(spec)

    def ctx_factory():
        return recorder.wrap(make_context(base, model))

    if hasattr(model, "embed"):
        texts = read_calibration_texts(data)
        n = min(examples or 64, len(texts))
        chosen = random.Random(seed).sample(texts, n)
        model.embed(chosen, batch_size=batch_size, ctx_factory=ctx_factory, progress=progress)
    else:
        from dynaprune.eval.lm import read_tokens

        n_windows = examples or 2
        ids = read_tokens(model, _check_data_file(data), n_windows * window)
        if len(ids) < 2:
            raise DynapruneError(f"calibration data {data} holds fewer than 2 tokens")
        pieces = [ids[i:i + window] for i in range(0, len(ids), window)][:n_windows]
        n = len(pieces)
        with torch.no_grad():
            for i, piece in enumerate(pieces):
                model(torch.tensor(piece)[None], ctx=ctx_factory())
                if progress is not None:
                    progress(i + 1, n)
    if recorder.calls == 0:
        raise DynapruneError("the calibration run made no attention call")
    block = recorder.block_ratio()
    head = recorder.head_threshold()
    recipe = base.replace(
        block=block.value,
        block_size=spec.block_size,
        block_score=spec.block_score,
        block_keep_first=spec.keep_first_block,
        hdp_head=None if head is None else head.value,
        fixed=(spec.int_bits, spec.frac_bits),
    )
    blocks = recorder.always_kept + sum(r.numel() for r in recorder.finite_ratios)
    return HDPCalibration(recipe, block, head, n, recorder.calls, blocks)


def write_recipe_file(path: str | Path, recipe: Recipe, comments: Sequence[str] = ()) -> Path:
    """Write ``recipe`` for ``--recipe @path``: ``#`` comment lines, then the recipe on one line."""
    p = Path(path)
    try:
        write_text_atomic(p, "".join(f"# {c}\n" for c in comments) + f"{recipe}\n")
    except OSError as exc:
        raise DynapruneError(f"cannot write the recipe file {p}: {exc.strerror or exc}") from None
    return p

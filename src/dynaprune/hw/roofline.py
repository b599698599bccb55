"""Roofline plot (SpAtten Fig. 18): bandwidth roof, compute roof, and simulated points.

Section V-C: the slope of the bandwidth roof is the HBM bandwidth (512 GB/s) and the compute roof is
the multiplier count x 2 operations x clock (1024 multipliers -> 2 TFLOP/s). A point's x is the
operational intensity (operations per DRAM byte, Q/K/V in and attention out) and its y the achieved
GFLOP/s, both from ``SimResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dynaprune.hw.report import SimResult


def roofline_png(points: Sequence[tuple[str, SimResult]], path: str | Path, title: str = "Roofline") -> Path:
    """Draw the roofs of the first point's machine and every point; returns the written PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not points:
        raise ValueError("no points to plot")
    ref = points[0][1]
    bw, peak = ref.peak_gbps, ref.peak_gflops
    xs = [p.intensity for _, p in points]
    lo = min(min(xs) / 4, 0.1)
    hi = max(max(xs) * 4, peak / bw * 8)
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.loglog(x, np.minimum(bw * x, peak), color="black", lw=1.5)
    x_label = peak / bw / 10
    ax.text(x_label, bw * x_label * 1.4, f"{bw:.0f} GB/s", ha="right", fontsize=8)
    ax.text(hi / 1.3, peak * 1.12, f"{peak / 1000:.2f} TFLOP/s", ha="right", fontsize=8)
    markers = "osD^v<>ph*"
    for i, (label, r) in enumerate(points):
        ax.loglog([r.intensity], [r.gflops], markers[i % len(markers)], ms=7,
                  label=f"{label}: {r.gflops:.0f} GFLOP/s @ {r.intensity:.2f} op/B")
    ax.set_xlabel("operational intensity (operations / DRAM byte)")
    ax.set_ylabel("performance (GFLOP/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(min(r.gflops for _, r in points) / 5, peak * 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path

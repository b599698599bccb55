"""Trade-off curves: the metric against each measure of work kept (FLOPs, K/V bytes, bits fetched),
one panel per measure, every method (SpAtten techniques, HDP, the baselines) and the dense point (a
star) on the same axes, the same colour for a method in every panel."""

from __future__ import annotations

from collections import defaultdict

from dynaprune.report.axes import AXES, work_axes
from dynaprune.report.figures import png_bytes, pyplot
from dynaprune.report.results import Group, method_of


def tradeoff_png(group: Group) -> bytes:
    """A row of panels (one per axis of ``AXES``) for one group; PNG bytes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(AXES), figsize=(5.0 * len(AXES), 4.2), sharey=True)
    series: dict[str, list[tuple[dict[str, float], float, str]]] = defaultdict(list)
    for row in group.rows:
        series[method_of(row.get("recipe"))].append((work_axes(row), row["metric"]["value"], row.get("recipe") or ""))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(m for m in series if m != "dense")
    for ax, (key, label) in zip(axes, AXES.items(), strict=True):
        for i, method in enumerate(names):
            points = sorted((p[0][key], p[1]) for p in series[method])
            marker = "os^DvP<>X"[i // len(colours) % 9]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, ms=5, lw=1.2,
                    color=colours[i % len(colours)], label=method)
        for axis_values, value, _ in series.get("dense", []):
            ax.scatter([axis_values[key]], [value], marker="*", s=220, color="black", zorder=5, label="dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(group.rows[0]["metric"]["name"])
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="upper center", ncol=min(6, len(unique)), fontsize=8,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(group.title, y=1.07)
    return png_bytes(fig)

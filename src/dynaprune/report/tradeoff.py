"""Trade-off curves: the metric against each measure of work kept (FLOPs, K/V bytes, bits fetched),
one panel per measure, every method (SpAtten techniques, HDP, the baselines) and the dense point (a
star) on the same axes, the same colour for a method in every panel. Each point's place on the image
(in % of its width and height) comes back too, so the page can show the point's recipe on hover."""

from __future__ import annotations

import io
from collections import defaultdict

from dynaprune.report.axes import AXES, work_axes
from dynaprune.report.figures import pyplot
from dynaprune.report.labels import short_recipe
from dynaprune.report.results import HIGHER_IS_BETTER, Group, method_of

DPI = 110


def tradeoff_caption(group: Group) -> str:
    """What to look at in the figure, in one line."""
    name = group.rows[0]["metric"]["name"]
    better = "higher" if HIGHER_IS_BETTER.get(name, True) else "lower"
    return (f"Look for the curve that stays closest to the dense star ({name}: {better} is better) while moving "
            "left, to less work kept; hover a point for its recipe.")


def tradeoff_figure(group: Group) -> tuple[bytes, list[tuple[float, float, str]]]:
    """PNG bytes of a row of panels (one per axis of ``AXES``) and every point as (left %, top %, recipe)."""
    plt = pyplot()
    # a 2 x 2 grid reads at page width; a fixed layout (not bbox_inches="tight") so data coordinates map
    # to image pixels exactly
    fig, grid = plt.subplots(2, (len(AXES) + 1) // 2, figsize=(11, 8.4), sharey=True, dpi=DPI, squeeze=False)
    axes = list(grid.flat)[: len(AXES)]
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.07, top=0.85, wspace=0.06, hspace=0.28)
    series: dict[str, list[tuple[dict[str, float], float, str]]] = defaultdict(list)
    for row in group.rows:
        series[method_of(row.get("recipe"))].append((work_axes(row), row["metric"]["value"], row.get("recipe") or ""))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(m for m in series if m != "dense")
    placed: list[tuple[object, float, float, str]] = []
    for ax, (key, label) in zip(axes, AXES.items(), strict=True):
        for i, method in enumerate(names):
            points = sorted((p[0][key], p[1], p[2]) for p in series[method])
            marker = "os^DvP<>X"[i // len(colours) % 9]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, ms=5, lw=1.2,
                    color=colours[i % len(colours)], label=method)
            placed += [(ax, x, y, f"{method}: {short_recipe(r)}") for x, y, r in points]
        for axis_values, value, _ in series.get("dense", []):
            ax.scatter([axis_values[key]], [value], marker="*", s=220, color="black", zorder=5, label="dense")
            placed.append((ax, axis_values[key], value, "dense"))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel(group.rows[0]["metric"]["name"])
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="upper center", ncol=min(6, len(unique)), fontsize=8,
               bbox_to_anchor=(0.5, 0.955), frameon=False)
    fig.suptitle(group.title, y=0.99)
    fig.canvas.draw()  # final axis limits, so transData is what the PNG shows
    to_figure = fig.transFigure.inverted()
    spots = []
    for ax, x, y, text in placed:
        fx, fy = to_figure.transform(ax.transData.transform((x, y)))
        if 0 <= fx <= 1 and 0 <= fy <= 1:
            spots.append((100 * fx, 100 * (1 - fy), text))
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return buf.getvalue(), spots


def tradeoff_png(group: Group) -> bytes:
    """The trade-off figure's PNG bytes alone."""
    return tradeoff_figure(group)[0]

"""Line charts of the ERF over training, one colour per layer, with a visible legend.

TensorBoard's own charts colour by *run*, so the layers of one run share a colour there (and
the custom-scalars legend hides behind a "Matches (n)" toggle). This chart is rendered by
matplotlib and logged as an image, so every layer has its own colour and its name is always
on screen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from erf_callback.render.figures import _figure, _figure_to_array

__all__ = ["LayerSeries", "render_radius_chart"]

_FONT = 12.0

#: ``{layer: (steps, radii, trf_width)}``; ``trf_width`` may be ``inf`` or ``nan``.
LayerSeries = Mapping[str, tuple[Sequence[float], Sequence[float], float]]


def render_radius_chart(
    series: LayerSeries,
    *,
    title: str = "ERF radius over training",
    size: tuple[int, int] = (420, 560),
) -> np.ndarray:
    """Radius vs step for every layer (top) and the growth since initialisation (bottom).

    Top: each layer's radius in input pixels, with a dotted line at half its theoretical RF
    width (the largest radius the TRF allows) when that fits in the chart (at most twice the
    largest measured radius), so the distance to the architectural limit is visible. Bottom:
    radius divided by the layer's first radius, with a grey line at 1 (no change), so layers
    of very different sizes compare on one axis. One colour per layer (matplotlib's tab10
    cycle), markers at the probes, the legend below the charts. The default size suits
    TensorBoard's default image card (~350-450 px wide).

    Args:
        series: ``{layer: (steps, radii, trf_width)}`` in probe order; a NaN radius (a probe
            without a map) is a cross on the step axis.
        title: text above the charts.
        size: ``(width, height)`` in pixels.

    Returns:
        ``uint8`` array ``(height, width, 3)``.

    Example:
        >>> img = render_radius_chart({"layer1": ([0, 10, 20], [2.0, 2.5, 3.0], 7.0),
        ...                            "layer2": ([0, 10, 20], [4.0, 5.0, 6.5], 15.0)})
        >>> img.shape
        (560, 420, 3)
    """
    width, height = int(size[0]), int(size[1])
    fig, canvas = _figure(width, height)
    # Legend entries: the layers, the TRF line and, where a probe gave no map, its cross (two
    # columns then: "probe without a map" is too wide for three in the default card).
    missing_any = any(
        not np.isfinite(np.asarray(r, dtype=float)).all() for _, r, _ in series.values()
    )
    columns = 2 if missing_any else 3
    legend_rows = math.ceil((len(series) + 1 + int(missing_any)) / columns)
    bottom = 66 + 22 * legend_rows
    fig.subplots_adjust(
        left=52 / width,
        right=1 - 12 / width,
        bottom=bottom / height,
        top=1 - 56 / height,
        hspace=0.42,
    )
    ax_r, ax_g = fig.subplots(2, 1, sharex=True)
    top_radius = 0.0
    for i, (layer, (steps, radii, _)) in enumerate(series.items()):
        s = np.asarray(steps, dtype=float)
        r = np.asarray(radii, dtype=float)
        ok = np.isfinite(r)
        colour = f"C{i % 10}"
        if not ok.all():
            # Probes without a radius (a diverged model, dead units): crosses on the axis, so
            # a curve that stops is not read as a run that stopped.
            ax_r.plot(
                s[~ok], np.zeros(int((~ok).sum())), "x", color=colour, ms=7, mew=2, clip_on=False
            )
        if not ok.any():
            continue
        ax_r.plot(s[ok], r[ok], "-o", color=colour, lw=2, ms=4, label=layer)
        first = r[ok][0]
        if first > 0:
            ax_g.plot(s[ok], r[ok] / first, "-o", color=colour, lw=2, ms=4)
        top_radius = max(top_radius, float(r[ok].max()))
    for i, (_, (_, _, trf)) in enumerate(series.items()):
        if math.isfinite(trf) and 0 < trf / 2 <= 2 * top_radius:
            ax_r.axhline(trf / 2, color=f"C{i % 10}", lw=1.2, ls=":")
    if any(math.isfinite(t) and 0 < t / 2 <= 2 * top_radius for _, _, t in series.values()):
        ax_r.plot([], [], color="0.3", lw=1.2, ls=":", label="TRF half-width")
    if missing_any:
        ax_r.plot([], [], "x", color="0.3", ms=7, mew=2, label="probe without a map")
    ax_g.axhline(1.0, color="0.5", lw=1.0)
    ax_r.set_ylim(bottom=0)
    ax_r.set_title("radius [input px]", fontsize=_FONT, y=1.0, pad=6.0)
    ax_g.set_title("growth since init (\u00d7 first radius)", fontsize=_FONT, y=1.0, pad=6.0)
    ax_g.set_xlabel("optimiser step", fontsize=_FONT - 1)
    for ax in (ax_r, ax_g):
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=_FONT - 2)
    fig.text(0.5, 1 - 8 / height, title, ha="center", va="top", fontsize=_FONT + 1)
    fig.legend(
        *ax_r.get_legend_handles_labels(),
        loc="lower center",
        bbox_to_anchor=(0.5, 4 / height),
        ncol=min(columns, len(series) + 1),
        fontsize=_FONT - 1,
        frameon=False,
    )
    return _figure_to_array(canvas, width, height)

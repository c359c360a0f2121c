"""Heatmaps that explain themselves: title, colour bar and a legend for every overlay.

These are the pictures a newcomer sees first in TensorBoard. Each is a pyplot-free
:class:`matplotlib.figure.Figure` (see :mod:`erf_callback.render.figures`) returned as a
``uint8`` ``(H, W, 3)`` array:

* :func:`render_heatmap_figure`: one map with its fitted Gaussian (1 sigma and 2 sigma
  ellipses), the theoretical RF box and the probed unit, a title with the layer, step and
  radius, a colour bar in units of the map's peak, and a legend naming each overlay.
* :func:`render_init_vs_now`: the initialisation map next to the current one, the
  comparison that shows how training changed the ERF.

The overlays are the same as :func:`erf_callback.render.render_heatmap` (the raw heatmap,
kept for ``heatmap_style="raw"``) draws into the pixels, here as vector patches in input-pixel
coordinates so they stay sharp at any size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse, Rectangle

from erf_callback.fit.grid import bounding_box
from erf_callback.render.figures import (
    _MAX_ELONGATION,
    _figure,
    _figure_to_array,
    balanced_columns,
    zoom_caption,
)
from erf_callback.render.raster import _LOG_EPS, _log_scale, to_display_2d
from erf_callback.warnings import ERFWarning

__all__ = [
    "MapPanel",
    "ProbedMap",
    "View",
    "erf_map_panel",
    "frames_view",
    "heatmap_title",
    "metric_text",
    "render_erf_map",
    "render_erf_maps",
    "render_heatmap_figure",
    "render_init_vs_now",
    "render_on_one_scale",
    "zoom_view",
]

# The raw raster's overlay colours, as matplotlib colours.
_SIGMA1 = "#00ffff"
_SIGMA2 = "#ffffff"
_TRF = "#00e600"
_MARKER = "#1e6eff"
_LEGEND_BG = "#2b2b2b"

_DOT = " \u00b7 "  # a middle dot between the parts of a title
_FONT = 12.0  # points at 100 dpi: ~17 px text, still ~13 px in a shrunk TensorBoard card


@dataclass(frozen=True)
class MapPanel:
    """One ERF map and what to draw on it.

    Attributes:
        erf: map with 1, 2 or 3 spatial axes, ``(z, y, x)`` order.
        mean: fitted Gaussian centre, ``(d,)``, or None.
        cov: fitted covariance, ``(d, d)``, or None.
        trf_box: per axis ``(first_pixel, last_pixel)`` of the theoretical RF, or None.
        location: the probed unit's input location, or None.
        title: text above the panel.
        scale: how many input pixels one map pixel covers (history maps are downsampled);
            overlays are given in input pixels.
    """

    erf: np.ndarray
    mean: np.ndarray | None = None
    cov: np.ndarray | None = None
    trf_box: tuple[tuple[float, float], ...] | None = None
    location: tuple[float, ...] | None = None
    title: str = ""
    scale: float = 1.0


def _relative(values: np.ndarray, log_scale: bool) -> tuple[np.ndarray, float]:
    """Values in units of the finite peak (or the log scale of :func:`render_heatmap`)."""
    if log_scale:
        return _log_scale(values), 0.0
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    if peak <= 0:
        return np.zeros_like(values), 0.0
    rel = values / peak
    low = float(np.nanmin(np.where(np.isfinite(rel), rel, 0.0)))
    return rel, min(0.0, low)


# A map whose theoretical RF (with the fitted Gaussian's 3 sigma ellipse), padded, spans less
# than this share of the input's smaller side is drawn zoomed in on that region, at least
# twice the scale: an early layer's ERF on a 224 px input is otherwise a dot under its
# overlays (and a 9 px TRF on a 48 px input, padded to 22 px, a small blob at 40%). The view
# also holds every pixel the picture shows, so nothing of the map is left out of it.
_ZOOM_BELOW = 0.5
# The smallest view: 12 px, so a few-pixel ERF on a 32 px input (CIFAR) is zoomed too.
_ZOOM_MIN_PX = 12.0

View = tuple[float, float, float, float]  # (y0, y1, x0, x1) in input pixels


def zoom_view(panel: MapPanel) -> View | None:
    """The square the panel shows: around the probed unit's theoretical RF and fitted
    Gaussian (3 sigma), padded, and holding every pixel the picture shows; None: the whole
    map (no finite TRF, or a region not much smaller than the map). A 1-D map's strip is
    shown whole across and at least as wide as it is high."""
    if panel.trf_box is None:
        return None
    erf2, mean2, cov2, box2, loc2 = to_display_2d(
        panel.erf, panel.mean, panel.cov, panel.trf_box, panel.location
    )
    if box2 is None:
        return None
    line = panel.erf.ndim == 1  # a strip: its rows stay whole, only the samples are zoomed
    s = float(panel.scale)
    h, w = erf2.shape[0] * s, erf2.shape[1] * s
    # The TRF, the fit's 3 sigma and the unit along each zoomed axis (y, x), inside the map:
    # a cut TRF is centred on what is visible.
    regions: list[tuple[float, float]] = []
    for k, n in ((1, w),) if line else ((0, h), (1, w)):
        t0, t1 = box2[k]
        if not (math.isfinite(t0) and math.isfinite(t1)):
            return None  # a global TRF (pooling, attention): the map may be anywhere
        edges = [t0 - 0.5, t1 + 0.5]
        if mean2 is not None and cov2 is not None:
            sd = math.sqrt(max(float(cov2[k, k]), 0.0))
            if math.isfinite(float(mean2[k])) and math.isfinite(sd):
                edges += [mean2[k] - 3 * sd, mean2[k] + 3 * sd]
        if loc2 is not None and math.isfinite(loc2[k]):
            edges.append(loc2[k])
        regions.append((max(min(edges), -0.5), min(max(edges), n - 0.5)))
    span = _padded(max(hi - lo for lo, hi in regions))
    if line:
        span = max(span, h)
    # And every pixel the picture shows: the TRF ignores where border padding reads from, so
    # a unit at the edge of a circularly (or reflection) padded net also sees pixels outside
    # its TRF box, e.g. at the far side of the input.
    shown = _shown_extent(erf2, (s, s))
    if shown is not None:
        axes = (shown[2:],) if line else (shown[:2], shown[2:])
        regions = [(min(lo, a), max(hi, b)) for (lo, hi), (a, b) in zip(regions, axes, strict=True)]
        span = max(span, *(hi - lo for lo, hi in regions))
    if span >= _ZOOM_BELOW * (w if line else min(h, w)):
        return None
    if line:
        x0 = _place(*regions[0], span, w)
        return (-0.5, h - 0.5, x0, x0 + span)
    (lo_y, hi_y), (lo_x, hi_x) = regions
    return _square(lo_y, hi_y, lo_x, hi_x, span, h, w)


def _padded(extent: float) -> float:
    """The side of a zoomed view around a region ``extent`` pixels wide: 30% and 4 px of
    margin, at least ``_ZOOM_MIN_PX``."""
    return max(1.3 * extent + 4.0, _ZOOM_MIN_PX)


def frames_view(frames: Sequence[np.ndarray], input_shape: tuple[int, int]) -> View | None:
    """The square around every pixel that any of ``frames`` shows (above the log scale's
    floor), padded like :func:`zoom_view`'s, in the pixels of the ``input_shape`` input the
    frames were downsampled from (a history's maps); None: the whole input (a region not much
    smaller than it, nothing shown, or 1-D frames).

    For pictures of stored maps without their theoretical RF, e.g. the report's evolution
    grid.

    Example:
        >>> dot = np.zeros((32, 32))
        >>> dot[15:17, 15:17] = 1.0
        >>> [float(v) for v in frames_view([dot], (64, 64))]
        [25.5, 37.5, 25.5, 37.5]
    """
    h, w = input_shape
    lo_y = lo_x = math.inf
    hi_y = hi_x = -math.inf
    for frame in frames:
        if frame.ndim < 2:
            return None
        frame2 = to_display_2d(frame)[0]
        shown = _shown_extent(frame2, (h / frame2.shape[0], w / frame2.shape[1]))
        if shown is not None:
            lo_y, hi_y = min(lo_y, shown[0]), max(hi_y, shown[1])
            lo_x, hi_x = min(lo_x, shown[2]), max(hi_x, shown[3])
    if not math.isfinite(lo_y):
        return None
    span = _padded(max(hi_y - lo_y, hi_x - lo_x))
    if span >= _ZOOM_BELOW * min(h, w):
        return None
    return _square(lo_y, hi_y, lo_x, hi_x, span, h, w)


def _shown_extent(erf2: np.ndarray, scale: tuple[float, float]) -> View | None:
    """The pixel-edge extent ``(y0, y1, x0, x1)``, in input pixels, of the pixels of the 2-D
    map ``erf2`` that a picture shows (above the log scale's floor of its peak magnitude);
    ``scale``: input pixels per map pixel along y and x. None for a map with nothing on it."""
    magnitude = np.abs(np.nan_to_num(erf2))
    peak = float(magnitude.max()) if magnitude.size else 0.0
    if not peak > 0:
        return None
    rows, cols = bounding_box(magnitude > _LOG_EPS * peak)
    sy, sx = scale
    return (
        rows.start * sy - 0.5,
        rows.stop * sy - 0.5,
        cols.start * sx - 0.5,
        cols.stop * sx - 0.5,
    )


def _square(
    lo_y: float, hi_y: float, lo_x: float, hi_x: float, span: float, h: float, w: float
) -> View:
    """A ``span`` square centred on the given region, moved inside the ``h x w`` map."""
    y0, x0 = _place(lo_y, hi_y, span, h), _place(lo_x, hi_x, span, w)
    return (y0, y0 + span, x0, x0 + span)


def _place(lo: float, hi: float, span: float, n: float) -> float:
    """The start of a ``span`` range centred on ``[lo, hi]``, moved inside ``n`` pixels."""
    return min(max((lo + hi - span) / 2, -0.5), n - 0.5 - span)


def _common_view(panels: Sequence[MapPanel]) -> View | None:
    """One view for panels drawn side by side (the same scale, so they compare): the square
    that holds every panel's own view; None when one of them shows its whole map."""
    views = [zoom_view(p) for p in panels]
    if any(v is None for v in views):
        return None
    found = [v for v in views if v is not None]
    lo_y, hi_y = min(v[0] for v in found), max(v[1] for v in found)
    lo_x, hi_x = min(v[2] for v in found), max(v[3] for v in found)
    if panels[0].erf.ndim == 1:  # strips: their rows whole, one range of samples
        w = panels[0].erf.shape[0] * panels[0].scale
        return None if hi_x - lo_x >= _ZOOM_BELOW * w else (lo_y, hi_y, lo_x, hi_x)
    h, w = (n * panels[0].scale for n in panels[0].erf.shape[-2:])  # 2-D or 3-D: (y, x)
    span = max(hi_y - lo_y, hi_x - lo_x)
    if span >= _ZOOM_BELOW * min(h, w):
        return None
    return _square(lo_y, hi_y, lo_x, hi_x, span, h, w)


def _stretch(ax: Axes) -> None:
    """Stretch the shown extent of a very elongated map to ``_MAX_ELONGATION``."""
    xs = abs(ax.get_xlim()[1] - ax.get_xlim()[0])
    ys = abs(ax.get_ylim()[1] - ax.get_ylim()[0])
    if not (xs > 0 and ys > 0) or max(xs, ys) <= _MAX_ELONGATION * min(xs, ys):
        return
    # aspect = shown height of a y unit / shown width of an x unit.
    ax.set_aspect(xs / (ys * _MAX_ELONGATION) if xs > ys else _MAX_ELONGATION * xs / ys)


def _draw_panel(
    ax: Axes,
    panel: MapPanel,
    log_scale: bool,
    cmap: str,
    view: View | None = None,
    caption: bool = True,
) -> None:
    erf2, mean2, cov2, box2, loc2 = to_display_2d(
        panel.erf, panel.mean, panel.cov, panel.trf_box, panel.location
    )
    rel, low = _relative(erf2, log_scale)
    h, w = erf2.shape
    s = float(panel.scale)
    # Pixel (r, c) of a map downsampled by s covers input pixels [r*s, (r+1)*s): its edges are
    # at -0.5 + k*s in input-pixel coordinates, where the overlays live.
    extent = (-0.5, -0.5 + w * s, -0.5 + h * s, -0.5)
    cm = colormaps[cmap].with_extremes(bad="#808080")
    ax.imshow(
        np.ma.masked_invalid(rel),
        cmap=cm,
        norm=Normalize(low, 1.0),
        interpolation="nearest",
        extent=extent,
    )
    if box2 is not None:
        (y0, y1), (x0, x1) = box2[-2], box2[-1]
        # Infinite edges (a global TRF, a 1-D strip's y extent) lie outside the view anyway.
        big = 1e6
        y0, y1 = max(y0, -big), min(y1, big)
        x0, x1 = max(x0, -big), min(x1, big)
        if all(math.isfinite(v) for v in (y0, y1, x0, x1)):
            ax.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec=_TRF, lw=2)
            )
    if mean2 is not None and cov2 is not None and np.isfinite(cov2).all():
        evals, evecs = np.linalg.eigh(0.5 * (cov2 + cov2.T))
        evals = np.clip(evals, 0.0, None)
        if evals.max() > 0 and np.isfinite(mean2).all():
            # Major axis direction in (x, y) display coordinates; y grows downwards.
            vy, vx = evecs[:, 1]
            angle = math.degrees(math.atan2(vy, vx))
            for k, colour, style in ((2.0, _SIGMA2, "--"), (1.0, _SIGMA1, "-")):
                ax.add_patch(
                    Ellipse(
                        (mean2[1], mean2[0]),
                        2 * k * math.sqrt(evals[1]),
                        2 * k * math.sqrt(evals[0]),
                        angle=angle,
                        fill=False,
                        ec=colour,
                        ls=style,
                        lw=2,
                    )
                )
    if loc2 is not None:
        ax.plot(loc2[1], loc2[0], marker="+", ms=14, mew=2.5, color=_MARKER, ls="none")
    line = panel.erf.ndim == 1  # a strip: its height says nothing of the input
    label = f"input {w * s:g} samples" if line else f"input {w * s:g} \u00d7 {h * s:g} px"
    if view is None:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    else:
        ax.set_xlim(view[2], view[3])
        ax.set_ylim(view[1], view[0])
        if line:
            label = f"{view[3] - view[2]:.0f} of {w * s:g} samples"
        else:
            label = zoom_caption(view[1] - view[0], h * s, w * s)
    if not line:
        _stretch(ax)
    if panel.erf.ndim == 3:  # drawn as its sum over z
        depth = panel.erf.shape[0] * s
        label += f", sum of {depth:g} z-slice{'s' if depth != 1 else ''}"
    # No ticks: drawing tick labels is most of a figure's cost, and the size in input pixels
    # (below) plus the legend say what a reader needs.
    ax.set_xticks([])
    ax.set_yticks([])
    if caption:
        ax.set_xlabel(label, fontsize=_FONT - 2)
    if panel.title:
        ax.set_title(panel.title, fontsize=_FONT - 1, y=1.0, pad=6.0)


def _colorbar(
    fig: Figure, rect: tuple[float, float, float, float], log_scale: bool, low: float, cmap: str
) -> None:
    cax = fig.add_axes(rect)
    norm = Normalize(low, 1.0)
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    if log_scale:
        # The log scale maps v/peak = 10^-k to log10(1 + 10^-k / eps) / log10(1 + 1 / eps).
        fractions = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
        ticks = [math.log10(1 + f / _LOG_EPS) / math.log10(1 + 1 / _LOG_EPS) for f in fractions]
        bar.set_ticks(ticks, labels=["0", "0.001", "0.01", "0.1", "1"])
        bar.set_label("influence / peak (log)", fontsize=_FONT - 2)
    else:
        bar.set_label("influence / peak", fontsize=_FONT - 2)
    bar.ax.tick_params(labelsize=_FONT - 3)


def _legend(fig: Figure, has_box: bool, y: float) -> None:
    handles = [
        Line2D([], [], color=_SIGMA1, lw=2, label="1\u03c3 Gaussian fit"),
        Line2D([], [], color=_SIGMA2, lw=2, ls="--", label="2\u03c3 (radius)"),
        Line2D([], [], color=_MARKER, marker="+", ms=12, mew=2.5, ls="none", label="probed unit"),
    ]
    if has_box:
        handles.append(Line2D([], [], color=_TRF, lw=2, label="theoretical RF"))
    leg = fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, y),
        ncol=2,
        fontsize=_FONT - 3,
        columnspacing=1.0,
        handletextpad=0.5,
        facecolor=_LEGEND_BG,
        edgecolor=_LEGEND_BG,
        framealpha=1.0,
        labelcolor="white",
        handlelength=1.8,
    )
    leg.set_in_layout(False)


def _box_visible(panel: MapPanel) -> bool:
    """Whether any edge of the TRF box falls inside the map (else the legend omits it)."""
    if panel.trf_box is None:
        return False
    erf2, _, _, box2, _ = to_display_2d(panel.erf, box=panel.trf_box)
    assert box2 is not None
    # In display coordinates: a 1-D map's box is (infinite rows, its samples).
    for (lo, hi), n in zip(box2[-2:], erf2.shape, strict=True):
        extent = n * panel.scale
        if (math.isfinite(lo) and 0 < lo < extent) or (math.isfinite(hi) and 0 <= hi < extent - 1):
            return True
    return False


def _layout(
    panels: Sequence[MapPanel],
    log_scale: bool,
    cmap: str,
    suptitle: str,
    panel_px: int,
    view_of: Sequence[MapPanel] | None = None,
    one_caption: bool = False,
) -> np.ndarray:
    """The panels in one row with one colour bar and one legend, all on the view that holds
    every panel of ``view_of`` (default: these panels), so that they compare; with
    ``one_caption``, the size line (the same for all of them) under the first panel only."""
    n = len(panels)
    # Sized for TensorBoard's default image card (~350-450 px wide): little margin, no ticks.
    left, gap, bar_w, bar_gap, right = 30, 14, 12, 10, 58
    top = 96 if suptitle else 50
    legend_h = 56
    bottom = 26 + legend_h
    width = left + n * panel_px + (n - 1) * gap + bar_gap + bar_w + right
    height = top + panel_px + bottom
    fig, canvas = _figure(width, height)
    lows = []
    view = _common_view(panels if view_of is None else view_of)
    for i, panel in enumerate(panels):
        x0 = left + i * (panel_px + gap)
        ax = fig.add_axes(
            (x0 / width, bottom / height, panel_px / width, panel_px / height),
        )
        _draw_panel(ax, panel, log_scale, cmap, view, caption=i == 0 or not one_caption)
        lows.append(_relative(to_display_2d(panel.erf)[0], log_scale)[1])
    bar_x = left + n * panel_px + (n - 1) * gap + bar_gap
    _colorbar(
        fig,
        (bar_x / width, bottom / height, bar_w / width, panel_px / height),
        log_scale,
        min(lows),
        cmap,
    )
    if suptitle:
        fig.text(0.5, 1 - 8 / height, suptitle, ha="center", va="top", fontsize=_FONT)
    _legend(fig, any(_box_visible(p) for p in panels), 6 / height)
    return _figure_to_array(canvas, width, height)


def heatmap_title(
    layer: str,
    radius: float | None,
    erf_trf_ratio: float | None,
    r2: float | None,
    step: int | None = None,
) -> str:
    """The two-line title of a layer's heatmap (TensorBoard and the CLI); a value that is
    missing (None, NaN: a TRF that could not be traced, a fit that failed) reads "n/a".

    Example:
        >>> print(heatmap_title("stage1", 3.31, 0.6, 0.96, step=500))
        stage1 \u00b7 step 500 \u00b7 radius 3.3 px
        ERF/TRF 0.60 \u00b7 Gaussian R\u00b2 0.96
    """

    step_text = "" if step is None else f"step {step}{_DOT}"
    return (
        f"{layer}{_DOT}{step_text}radius {metric_text(radius, '.1f')} px\n"
        f"ERF/TRF {metric_text(erf_trf_ratio, '.2f')}{_DOT}"
        f"Gaussian R\u00b2 {metric_text(r2, '.2f')}"
    )


def metric_text(value: float | None, spec: str) -> str:
    """A number for a title: ``format(value, spec)``, or "n/a" where it is missing (None, NaN).

    Example:
        >>> metric_text(3.14159, ".1f"), metric_text(float("nan"), ".1f")
        ('3.1', 'n/a')
    """
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


class ProbedMap(Protocol):
    """What :func:`erf_map_panel` reads of an :class:`~erf_callback.ERFMap` (the render
    layer does not import the engine)."""

    layer: str
    position: tuple[int, ...]
    location: tuple[float, ...]

    @property
    def status(self) -> str: ...  # "ok", "zero" or "nonfinite"

    @property
    def gaussian(self) -> Any: ...  # a GaussianFit: mean, cov

    @property
    def geometry(self) -> Any: ...  # an RFGeometry or None: box(position)

    def numpy(self) -> np.ndarray: ...

    def metrics(self) -> dict[str, float]: ...


def erf_map_panel(
    erf_map: ProbedMap,
    *,
    step: int | None = None,
    metrics: Mapping[str, float | None] | None = None,
    layer: str | None = None,
) -> MapPanel:
    """The panel of an ``ERFMap``: its map, fitted Gaussian, TRF box and unit, titled with
    :func:`heatmap_title` (``metrics``: its ``metrics()`` where the caller has them;
    ``layer``: the name shown, default ``erf_map.layer``). A map without an ERF (all-zero or
    non-finite gradients) is titled with the reason instead of its missing numbers."""
    name = erf_map.layer if layer is None else layer
    fit = erf_map.gaussian
    geometry = erf_map.geometry
    why = _NO_ERF.get(erf_map.status)
    if why is not None:
        step_text = "" if step is None else f"{_DOT}step {step}"
        title = f"{name}{step_text}\n{why}"
    else:
        mx: Mapping[str, float | None] = erf_map.metrics() if metrics is None else metrics
        title = heatmap_title(
            name, mx.get("radius"), mx.get("erf_trf_ratio"), mx.get("gaussian_r2"), step
        )
    return MapPanel(
        erf_map.numpy(),
        fit.mean,
        fit.cov,
        geometry.box(erf_map.position) if geometry is not None else None,
        erf_map.location,
        title=title,
    )


# The second title line of a map without an ERF, by its status (as short as the usual one).
_NO_ERF = {"zero": "no ERF: all-zero gradient", "nonfinite": "no ERF: NaN/Inf gradient"}


def render_erf_map(
    erf_map: ProbedMap, *, log_scale: bool = False, cmap: str = "inferno"
) -> np.ndarray:
    """The heatmap of an ``ERFMap`` as TensorBoard shows it: title (layer, radius, ERF/TRF,
    R²), colour bar, the fitted Gaussian, the theoretical RF and the unit with a legend,
    zoomed in on a small TRF.

    Args:
        erf_map: a map from :func:`~erf_callback.compute_erf`.
        log_scale: log colour scale (faint tails visible).
        cmap: matplotlib colour-map name.

    Returns:
        ``uint8`` array ``(H, W, 3)``: ``PIL.Image.fromarray(...)`` saves or shows it.

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 1, 3))
        >>> m = compute_erf(net, torch.randn(4, 1, 32, 32))["output"]
        >>> render_erf_map(m).shape
        (392, 370, 3)
    """
    with warnings.catch_warnings():
        # The map's own status says why it has no fit; the picture says "n/a".
        warnings.simplefilter("ignore", ERFWarning)
        panel = erf_map_panel(erf_map)
    return render_heatmap_figure(panel, log_scale=log_scale, cmap=cmap)


# White space between the rows of render_erf_maps, in pixels.
_ROWS_GAP = 12


def render_erf_maps(
    erf_maps: Mapping[str, ProbedMap],
    *,
    log_scale: bool = False,
    cmap: str = "inferno",
    max_columns: int = 4,
) -> np.ndarray:
    """Several layers' heatmaps side by side on one scale, to compare: each titled like
    :func:`render_erf_map` (layer, radius, ERF/TRF, R²), all zoomed on the same input pixels
    (those that hold every map's own view), with one colour bar and one legend per row.

    The maps keep their order (that of ``compute_erf``'s ``layers``: shallow to deep, the ERF
    growing from panel to panel), in balanced rows of at most ``max_columns`` (five maps as
    3 + 2, not 4 + 1).

    Args:
        erf_maps: the dict :func:`~erf_callback.compute_erf` returns (any mapping of names to
            maps of one input shape; each panel's title names its layer).
        log_scale: log colour scale (faint tails visible).
        cmap: matplotlib colour-map name.
        max_columns: panels per row at most.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Raises:
        ValueError: no maps, maps of different shapes (draw those one by one with
            :func:`render_erf_map`), or ``max_columns`` below 1.

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3) for _ in range(3)])
        >>> maps = compute_erf(net, torch.randn(4, 1, 32, 32), layers=["0", "2"])
        >>> render_erf_maps(maps).shape
        (392, 644, 3)
    """
    if not erf_maps:
        raise ValueError("render_erf_maps needs at least one map; got an empty mapping")
    with warnings.catch_warnings():
        # A map's own status says why it has no fit; its panel says "n/a".
        warnings.simplefilter("ignore", ERFWarning)
        panels = [erf_map_panel(m) for m in erf_maps.values()]
    return render_on_one_scale(panels, log_scale=log_scale, cmap=cmap, max_columns=max_columns)


def render_on_one_scale(
    panels: Sequence[MapPanel],
    *,
    suptitle: str = "",
    log_scale: bool = False,
    cmap: str = "inferno",
    max_columns: int = 4,
    panel_px: int = 260,
) -> np.ndarray:
    """Panels of one input shape side by side, all on the view that holds every panel's own
    (so sizes compare), in balanced rows of at most ``max_columns``, each row with one colour
    bar and one legend; ``suptitle`` above the first row; each map ``panel_px`` on a side.
    The size line under the maps, the same for all of them, stands under each row's first
    map only (below 200 px it would not fit under each). What :func:`render_erf_maps` and the
    callback's ``all_layers/heatmaps`` draw.

    Raises:
        ValueError: no panels, panels of different shapes, or ``max_columns`` below 1.

    Example:
        >>> yy, xx = np.mgrid[:64, :64]
        >>> blobs = [np.exp(-((yy - 32.0) ** 2 + (xx - 32.0) ** 2) / v) for v in (4, 40)]
        >>> render_on_one_scale([MapPanel(b) for b in blobs], suptitle="two").shape
        (438, 644, 3)
    """
    if not panels:
        raise ValueError("render_on_one_scale needs at least one panel")
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1:
        raise ValueError(f"max_columns must be a positive int; got {max_columns!r}")
    shapes = {p.erf.shape for p in panels}
    if len(shapes) > 1:
        raise ValueError(
            f"maps of one input shape are drawn on one scale; got shapes {sorted(shapes)}. "
            "Draw them one by one with render_erf_map."
        )
    per_row = balanced_columns(len(panels), max_columns)
    rows = [
        _layout(
            panels[i : i + per_row],
            log_scale,
            cmap,
            suptitle if i == 0 else "",
            panel_px,
            panels,
            one_caption=True,
        )
        for i in range(0, len(panels), per_row)
    ]
    width = max(r.shape[1] for r in rows)
    out = np.full(
        (sum(r.shape[0] for r in rows) + _ROWS_GAP * (len(rows) - 1), width, 3), 255, np.uint8
    )
    top = 0
    for row in rows:  # left-aligned: the panels of every row stand in the same columns
        out[top : top + row.shape[0], : row.shape[1]] = row
        top += row.shape[0] + _ROWS_GAP
    return out


def render_heatmap_figure(
    panel: MapPanel,
    *,
    log_scale: bool = False,
    cmap: str = "inferno",
    panel_px: int = 260,
) -> np.ndarray:
    """One ERF map with title, colour bar and a legend of the overlays.

    The colour bar is in units of the map's peak (linear, or the log scale of
    :func:`~erf_callback.render.render_heatmap` with ticks at 0.001, 0.01, 0.1 and 1 of the
    peak). Overlays: the fitted Gaussian's 1 sigma (solid cyan) and 2 sigma (dashed white)
    ellipses, the probed unit's theoretical RF (green box, only when an edge falls inside
    the map) and the unit's location (blue cross). The legend names each of them.

    Args:
        panel: the map, its overlays and its title (e.g. layer, step and radius).
        log_scale: log colour scale.
        cmap: matplotlib colour-map name.
        panel_px: side of the map's square axes, in pixels.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Example:
        >>> yy, xx = np.mgrid[:32, :32]
        >>> erf = np.exp(-((yy - 16.0) ** 2 + (xx - 16.0) ** 2) / 18)
        >>> img = render_heatmap_figure(MapPanel(erf, np.array([16.0, 16.0]), 9 * np.eye(2)))
        >>> img.shape, img.dtype
        ((392, 370, 3), dtype('uint8'))
    """
    return _layout([panel], log_scale, cmap, "", panel_px)


def render_init_vs_now(
    init: MapPanel,
    now: MapPanel,
    *,
    suptitle: str = "",
    log_scale: bool = False,
    cmap: str = "inferno",
    panel_px: int = 180,
) -> np.ndarray:
    """The initialisation map and the current map side by side, with one shared legend.

    Each panel is normalised to its own peak, so the comparison is of *shape and size*: how
    far the ERF spreads and where its mass sits, not how the gradient magnitude drifted.
    Both panels are drawn in input-pixel coordinates (a downsampled history map is stretched
    back with ``MapPanel.scale``), so the ellipses of both compare directly.

    Args:
        init: the map at initialisation (or the earliest one kept).
        now: the current map.
        suptitle: text above both panels, e.g. the layer and the radius growth.
        log_scale: log colour scale.
        cmap: matplotlib colour-map name.
        panel_px: side of each panel, in pixels.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Example:
        >>> yy, xx = np.mgrid[:32, :32]
        >>> a = np.exp(-((yy - 16.0) ** 2 + (xx - 16.0) ** 2) / 8)
        >>> b = np.exp(-((yy - 16.0) ** 2 + (xx - 16.0) ** 2) / 50)
        >>> img = render_init_vs_now(MapPanel(a, title="init"), MapPanel(b, title="now"))
        >>> img.shape
        (312, 484, 3)
    """
    return _layout([init, now], log_scale, cmap, suptitle, panel_px)

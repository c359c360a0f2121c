"""Heatmaps of ERF maps, rasterised in numpy, for TensorBoard.

Everything here returns ``uint8`` arrays of shape ``(H, W, 3)`` ("HWC"), ready for
``SummaryWriter.add_image(tag, img, step, dataformats="HWC")``. Heatmaps are pure numpy
(colour-map lookup, integer upscaling, overlays rasterised by setting pixels): about a
millisecond for a 256x256 map, no matplotlib figure. Only the colour tables come from
matplotlib's registry. Figures with text live in :mod:`erf_callback.render.figures`.

Maps are float arrays with 1, 2 or 3 spatial axes, in torch order ``(z, y, x)``.
Coordinates (means, boxes, locations) are pixel indices in the same order, so
``mean[-1]`` is the column (x) and ``mean[-2]`` the row (y); pixel ``(r, c)`` has its centre
at coordinate ``(r, c)``.
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import overload

import matplotlib
import numpy as np

__all__ = ["check_colormap", "colorize", "colorize_map", "render_heatmap", "to_display_2d"]

# Overlay colours (RGB). Chosen to stand out on the dark-to-yellow "inferno" map: the 1-sigma
# ellipse is the primary cue (solid cyan), the 2-sigma ellipse is secondary (dashed white),
# the theoretical RF box is green and the probed unit's location a blue cross (blue is the
# one hue inferno's bright peak, where the marker usually sits, never takes).
_SIGMA1_RGB = (0, 255, 255)
_SIGMA2_RGB = (255, 255, 255)
_TRF_RGB = (0, 230, 0)
_MARKER_RGB = (30, 110, 255)
_NAN_RGB = (128, 128, 128)

# Relative floor of the log scale: values down to ~1e-3 of the maximum get visible colours.
_LOG_EPS = 1e-3
# Upscaling never makes the long side larger than this (elongated maps, 1-D strips).
_MAX_UPSCALED_SIDE = 4096
_LINE_PX = 2  # overlay line thickness in upscaled pixels
_DASH_PX = 8.0  # dash length of the 2-sigma ellipse in upscaled pixels


# --------------------------------------------------------------------------------------------
# Reduction to 2-D and colour mapping
# --------------------------------------------------------------------------------------------


def to_display_2d(
    erf: np.ndarray,
    mean: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    box: tuple[tuple[float, float], ...] | None = None,
    location: tuple[float, ...] | None = None,
) -> tuple[
    np.ndarray,
    np.ndarray | None,
    np.ndarray | None,
    tuple[tuple[float, float], ...] | None,
    tuple[float, ...] | None,
]:
    """Reduce a 1-, 2- or 3-D map and its overlays to 2-D for display.

    * 2-D: returned unchanged (as float64).
    * 3-D: sum-projection over the first axis (z); ``mean``, ``cov``, ``box`` and
      ``location`` are restricted to the ``(y, x)`` block. For a Gaussian the marginal over
      z is exactly the Gaussian with that sub-block, so the drawn ellipses are those of the
      projected map.
    * 1-D: a strip of ``max(8, n // 8)`` identical rows. The overlays are placed on the
      strip's middle row; the y-variance is 0 (the ellipses become horizontal segments) and
      the box has an infinite y-extent (only its x-edges are drawn, over the full strip).

    Args:
        erf: map with 1, 2 or 3 spatial axes in ``(z, y, x)`` order.
        mean: Gaussian centre, shape ``(d,)``.
        cov: Gaussian covariance, shape ``(d, d)``.
        box: per axis ``(first_pixel, last_pixel)`` of the theoretical RF.
        location: the probed unit's input location, ``d`` coordinates.

    Returns:
        ``(erf2d, mean2d, cov2d, box2d, location2d)``; overlays given as ``None`` stay
        ``None``.

    Raises:
        ValueError: if ``erf`` does not have 1, 2 or 3 axes.

    Example:
        >>> vol = np.ones((4, 5, 6))
        >>> img, m, c, b, loc = to_display_2d(vol, mean=np.array([1.0, 2.0, 3.0]))
        >>> img.shape, float(img[0, 0]), m.tolist()
        ((5, 6), 4.0, [2.0, 3.0])
    """
    erf = np.asarray(erf, dtype=np.float64)
    mean_a = None if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    cov_a = None if cov is None else np.asarray(cov, dtype=np.float64)
    loc_a = None if location is None else tuple(float(v) for v in location)
    box_a = None if box is None else tuple((float(lo), float(hi)) for lo, hi in box)

    if erf.ndim == 2:
        return erf, mean_a, cov_a, box_a, loc_a
    if erf.ndim == 3:
        return (
            erf.sum(axis=0),
            None if mean_a is None else mean_a[-2:],
            None if cov_a is None else cov_a[-2:, -2:],
            None if box_a is None else box_a[-2:],
            None if loc_a is None else loc_a[-2:],
        )
    if erf.ndim == 1:
        n = erf.shape[0]
        rows = max(8, n // 8)
        mid = (rows - 1) / 2.0  # coordinate of the strip's middle (between rows if even)
        strip = np.broadcast_to(erf, (rows, n)).copy()
        mean2 = None if mean_a is None else np.array([mid, mean_a[-1]])
        cov2 = None
        if cov_a is not None:
            cov2 = np.zeros((2, 2))
            cov2[1, 1] = cov_a.reshape(-1)[-1]  # (1, 1) covariance or scalar variance
        box2 = None if box_a is None else ((-math.inf, math.inf), box_a[-1])
        loc2 = None if loc_a is None else (mid, loc_a[-1])
        return strip, mean2, cov2, box2, loc2
    raise ValueError(f"expected a map with 1, 2 or 3 spatial axes, got shape {erf.shape}")


def check_colormap(cmap: object) -> None:
    """Raise a ``ValueError`` naming close matches unless ``cmap`` is a registered colour map.

    Example:
        >>> check_colormap("inferno")
        >>> check_colormap("infernoo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cmap='infernoo' is not a matplotlib colour map; did you mean 'inferno', ...
    """
    if isinstance(cmap, str) and cmap in matplotlib.colormaps:
        return
    close = difflib.get_close_matches(str(cmap), list(matplotlib.colormaps), n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    raise ValueError(
        f"cmap={cmap!r} is not a matplotlib colour map; {hint}Any name of "
        "matplotlib.colormaps works, e.g. 'inferno' (the default), 'viridis', 'magma'."
    )


@functools.lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """The colour map as an ``(N, 3)`` uint8 table (cached: building it costs ~0.1 ms)."""
    cm = matplotlib.colormaps[cmap]
    table = cm(np.arange(cm.N), bytes=True)[:, :3]
    table.setflags(write=False)
    return table


def colorize(
    values: np.ndarray,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Map a 2-D float array to colours.

    Values are normalised to ``[0, 1]`` with ``(v - vmin) / (vmax - vmin)`` (clipped) and
    looked up in the colour map's table exactly like ``cmap(x, bytes=True)`` does, so ``vmax``
    gets the top colour and ``vmin`` the bottom one. Non-finite values (NaN, inf) are drawn
    grey and ignored when computing the default ``vmin``/``vmax``. When ``vmax == vmin`` there
    is no range to divide by: values above ``vmin`` get the top colour, the rest the bottom.

    Args:
        values: 2-D array.
        cmap: name of a registered matplotlib colour map.
        vmin: value mapped to the bottom colour; default the finite minimum.
        vmax: value mapped to the top colour; default the finite maximum.

    Returns:
        ``uint8`` array of shape ``(H, W, 3)``.

    Example:
        >>> img = colorize(np.array([[0.0, 1.0], [np.nan, 0.5]]), cmap="gray")
        >>> img[..., 0].tolist()
        [[0, 255], [128, 128]]
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"colorize expects a 2-D array, got shape {values.shape}")
    lut = _lut(cmap)
    if values.size == 0:
        return np.zeros((*values.shape, 3), dtype=np.uint8)
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        return np.full((*values.shape, 3), _NAN_RGB, dtype=np.uint8)
    data = values if all_finite else values[finite]
    lo = float(data.min()) if vmin is None else float(vmin)
    hi = float(data.max()) if vmax is None else float(vmax)
    # Replace non-finite entries before arithmetic so no RuntimeWarning is ever raised.
    v = values if all_finite else np.where(finite, values, lo)
    span = hi - lo
    if span > 0 and math.isfinite(span):
        norm = (v - lo) * (1.0 / span)
        np.clip(norm, 0.0, 1.0, out=norm)
    else:
        norm = (v > lo).astype(np.float64)
    n = lut.shape[0]
    # Same index rule as matplotlib's Colormap.__call__: floor(x * N), with x == 1 -> N - 1.
    idx = np.minimum((norm * n).astype(np.intp), n - 1)
    img = np.take(lut, idx, axis=0)
    if not all_finite:
        img[~finite] = _NAN_RGB
    return img


def _log_scale(values: np.ndarray) -> np.ndarray:
    """``log10(1 + v / (eps * vmax)) / log10(1 + 1 / eps)`` with ``eps = 1e-3``.

    ``vmax`` is the finite maximum; negative values are clipped to 0 first. The result is 0
    for 0 and 1 for the maximum, and a value at ``1e-3 * vmax`` lands at ~0.1, so the tails of
    the ERF become visible. NaN stays NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return v.copy()
    v = np.where(finite, np.maximum(v, 0.0), np.nan)
    vmax = float(np.nanmax(v))
    if vmax <= 0:
        return np.where(finite, 0.0, np.nan)
    return np.log10(1.0 + v / (_LOG_EPS * vmax)) * (1.0 / math.log10(1.0 + 1.0 / _LOG_EPS))


def colorize_map(values: np.ndarray, log_scale: bool, cmap: str) -> np.ndarray:
    """Colourise an ERF map with 0 at the bottom colour and its maximum at the top one.

    ERFs are non-negative, so anchoring the bottom at 0 (rather than at the data minimum)
    keeps "no influence" black in every picture; negative values (e.g. after subtracting a
    noise floor) extend the range downwards in linear scale and are clipped in log scale.
    """
    if log_scale:
        return colorize(_log_scale(values), cmap, vmin=0.0, vmax=1.0)
    finite = np.isfinite(values)
    if not finite.any():
        return colorize(values, cmap)
    data = values[finite]
    return colorize(values, cmap, vmin=min(0.0, float(data.min())), vmax=float(data.max()))


def _upscale_factor(shape: tuple[int, int], min_size: int) -> int:
    """Integer factor so the short side reaches ``min_size`` (long side capped)."""
    short, long = min(shape), max(shape)
    if short <= 0:
        return 1
    f = max(1, math.ceil(min_size / short))
    return max(1, min(f, _MAX_UPSCALED_SIDE // long))


def _upscale(img: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of an ``(H, W, C)`` image with a single copy."""
    if f == 1:
        return img
    h, w, c = img.shape
    return np.broadcast_to(img[:, None, :, None, :], (h, f, w, f, c)).reshape(h * f, w * f, c)


# --------------------------------------------------------------------------------------------
# Overlay rasterisation (in upscaled pixel coordinates)
# --------------------------------------------------------------------------------------------


@overload
def _to_px(coord: np.ndarray, f: int) -> np.ndarray: ...
@overload
def _to_px(coord: float, f: int) -> float: ...
def _to_px(coord: np.ndarray | float, f: int) -> np.ndarray | float:
    """Map coordinate -> continuous upscaled position (pixel ``r`` spans ``[r*f, (r+1)*f)``)."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) * f


def _stamp(
    img: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    color: tuple[int, int, int],
) -> None:
    """Set a ``_LINE_PX`` x ``_LINE_PX`` block of pixels centred on each continuous point."""
    h, w = img.shape[:2]
    # Top-left pixel of the block of pixels whose centres (i + 0.5) are nearest to the point.
    r0 = np.floor(rows - 0.5 * _LINE_PX + 0.5).astype(np.int64)
    c0 = np.floor(cols - 0.5 * _LINE_PX + 0.5).astype(np.int64)
    for dr in range(_LINE_PX):
        for dc in range(_LINE_PX):
            r = r0 + dr
            c = c0 + dc
            ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            img[r[ok], c[ok]] = color


def _ellipse_points(
    mean: np.ndarray, cov: np.ndarray, k: float, f: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Densely sampled k-sigma contour of a 2-D Gaussian, in upscaled pixel coordinates.

    Returns ``None`` for anything that has no ellipse (non-finite or all-zero covariance,
    non-finite mean). A rank-1 covariance gives a line segment, which is the honest picture
    of a Gaussian that is flat along one axis (e.g. the strip of a 1-D map).
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = np.asarray(cov, dtype=np.float64)
    if mean.shape != (2,) or cov.shape != (2, 2):
        return None
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        return None
    evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
    evals = np.clip(evals, 0.0, None)  # tiny negative round-off of a PSD matrix
    if evals.max() <= 0:
        return None
    # Enough samples that neighbouring points are < 0.5 upscaled px apart on the major axis.
    semi_major_px = k * math.sqrt(evals.max()) * f
    n = int(min(max(64, math.ceil(4 * math.pi * semi_major_px)), 40_000))
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    axes = evecs * (k * np.sqrt(evals))  # columns: the semi-axes as (y, x) vectors
    pts = mean[:, None] + axes @ np.stack([np.cos(t), np.sin(t)])
    return _to_px(pts[0], f), _to_px(pts[1], f)


def _draw_ellipse(
    img: np.ndarray,
    mean: np.ndarray,
    cov: np.ndarray,
    k: float,
    f: int,
    color: tuple[int, int, int],
    dashed: bool = False,
) -> None:
    pts = _ellipse_points(mean, cov, k, f)
    if pts is None:
        return
    rows, cols = pts
    if dashed:
        # Dashes by arc length (the parameter t is not uniform in arc length).
        step = np.hypot(np.diff(rows, prepend=rows[-1]), np.diff(cols, prepend=cols[-1]))
        arc = np.cumsum(step) - step[0]
        keep = (arc // _DASH_PX) % 2 == 0
        rows, cols = rows[keep], cols[keep]
    _stamp(img, rows, cols, color)


def _draw_box(
    img: np.ndarray,
    box: tuple[tuple[float, float], ...],
    f: int,
    color: tuple[int, int, int],
) -> None:
    """Draw the visible part of a box's outline.

    The box ``((y0, y1), (x0, x1))`` covers pixels ``y0..y1`` and ``x0..x1`` inclusive, so its
    outline runs along the pixel boundaries ``y0 - 0.5`` and ``y1 + 0.5`` (upscaled: rows
    ``y0 * f`` and ``(y1 + 1) * f``). Each edge is a line centred on that boundary, drawn only
    if it lies in the image and clipped to it: an edge outside the image (or infinite) is
    simply absent, so a box that contains the whole image draws nothing.
    """
    h, w = img.shape[:2]
    (y0, y1), (x0, x1) = box[-2], box[-1]
    if any(math.isnan(v) for v in (y0, y1, x0, x1)):
        return
    half = _LINE_PX // 2

    def span(lo: float, hi: float, size: int) -> tuple[int, int]:
        # Extent of an edge along the other axis, from boundary to boundary, clipped.
        a = min(max(lo * f - half, 0.0), float(size))
        b = min(max((hi + 1) * f + half, 0.0), float(size))
        return math.floor(a), math.ceil(b)

    def line(boundary: float, size: int) -> tuple[int, int] | None:
        if not math.isfinite(boundary):
            return None
        centre = round(boundary)
        a, b = max(centre - half, 0), min(centre - half + _LINE_PX, size)
        return (a, b) if a < b else None

    ca, cb = span(x0, x1, w)
    ra, rb = span(y0, y1, h)
    for edge in (line(y0 * f, h), line((y1 + 1) * f, h)):
        if edge is not None and ca < cb:
            img[edge[0] : edge[1], ca:cb] = color
    for edge in (line(x0 * f, w), line((x1 + 1) * f, w)):
        if edge is not None and ra < rb:
            img[ra:rb, edge[0] : edge[1]] = color


def _draw_marker(
    img: np.ndarray, location: tuple[float, ...], f: int, color: tuple[int, int, int]
) -> None:
    """Small "+" at ``location`` (arms of ``max(6, f)`` upscaled px)."""
    y, x = float(location[-2]), float(location[-1])
    if not (math.isfinite(y) and math.isfinite(x)):
        return
    cy, cx = float(_to_px(y, f)), float(_to_px(x, f))
    arm = max(6, f)
    offsets = np.arange(-arm, arm + 1, 0.5)
    _stamp(img, np.concatenate([cy + offsets, np.full_like(offsets, cy)]),
           np.concatenate([np.full_like(offsets, cx), cx + offsets]), color)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Heatmap
# --------------------------------------------------------------------------------------------


def render_heatmap(
    erf: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    trf_box: tuple[tuple[float, float], ...] | None = None,
    location: tuple[float, ...] | None = None,
    log_scale: bool = False,
    cmap: str = "inferno",
    min_size: int = 256,
) -> np.ndarray:
    """Colour-mapped ERF heatmap with the fitted Gaussian, the TRF box and the unit marker.

    Pure numpy (no matplotlib figure): the map is colourised at its own resolution, upscaled
    by the integer factor ``f = ceil(min_size / short_side)`` (nearest neighbour; capped so
    the long side stays <= 4096 px), and the overlays are rasterised on the big image so they
    are thin lines. Map pixel ``(r, c)`` covers upscaled rows ``[r*f, (r+1)*f)`` and columns
    ``[c*f, (c+1)*f)``; coordinate ``y`` lands on row ``(y + 0.5) * f``.

    Colour scale: linear from ``min(0, min)`` (bottom colour) to the maximum (top colour), or
    with ``log_scale=True``::

        s = log10(1 + v / (eps * vmax)) / log10(1 + 1 / eps),   eps = 1e-3,

    with negative values clipped to 0, so 0 -> bottom, ``vmax`` -> top and ``1e-3 * vmax``
    -> 0.1: the tails of the ERF become visible. NaN pixels are grey.

    Overlays (2 px lines): 1-sigma ellipse solid cyan, 2-sigma ellipse dashed white (full
    covariance, so rotated ellipses for correlated fits), theoretical RF box green (only the
    edges that fall inside the image, clipped to it; infinite edges are not drawn), and the
    unit's location as a small blue cross. A degenerate covariance (all zeros, NaN) draws no
    ellipse.

    1-D maps are shown as a strip and 3-D maps as their sum over z (see
    :func:`to_display_2d`).

    Args:
        erf: ERF map with 1, 2 or 3 spatial axes, ``(z, y, x)`` order.
        mean: fitted Gaussian centre, shape ``(d,)``.
        cov: fitted covariance, shape ``(d, d)``.
        trf_box: per axis ``(first_pixel, last_pixel)`` of the theoretical RF.
        location: the probed unit's input location.
        log_scale: use the log colour scale above.
        cmap: matplotlib colour-map name.
        min_size: minimum length of the short side of the output, in pixels.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Example:
        >>> yy, xx = np.mgrid[:48, :64]
        >>> erf = np.exp(-0.5 * (((yy - 20) / 4) ** 2 + ((xx - 30) / 8) ** 2))
        >>> img = render_heatmap(erf, mean=np.array([20.0, 30.0]), cov=np.diag([16.0, 64.0]))
        >>> img.shape, img.dtype
        ((288, 384, 3), dtype('uint8'))
    """
    erf2, mean2, cov2, box2, loc2 = to_display_2d(erf, mean, cov, trf_box, location)
    f = _upscale_factor(erf2.shape, min_size)
    small = colorize_map(erf2, log_scale, cmap)
    img = _upscale(small, f)  # a fresh array either way (colorize output, or reshape copy)
    if not img.flags.writeable:
        img = np.array(img)  # the overlays write into it
    if box2 is not None:
        _draw_box(img, box2, f, _TRF_RGB)
    if mean2 is not None and cov2 is not None:
        # 2-sigma first so the primary 1-sigma contour wins where they touch.
        _draw_ellipse(img, mean2, cov2, 2.0, f, _SIGMA2_RGB, dashed=True)
        _draw_ellipse(img, mean2, cov2, 1.0, f, _SIGMA1_RGB)
    if loc2 is not None:
        _draw_marker(img, loc2, f, _MARKER_RGB)
    return img

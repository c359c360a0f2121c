"""Figures with text for TensorBoard: radial profiles and evolution grids (matplotlib).

:class:`matplotlib.figure.Figure` with an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`; ``matplotlib.pyplot`` is never
imported: it keeps global figure state (figures stay alive until closed) and may pick an
interactive backend, both wrong for a library used inside a trainer. Figures that pyplot does
not know about are ordinary objects and are garbage collected once the pixels are copied out.
Every function returns a ``uint8`` ``(H, W, 3)`` array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from erf_callback.fit.grid import distance_sq, gaussian_on_grid, mass_within
from erf_callback.render.raster import colorize_map, to_display_2d

__all__ = ["balanced_columns", "render_evolution", "render_radial_profile", "zoom_caption"]

_DPI = 100.0  # figures are sized in pixels; at 100 dpi 1 inch = 100 px

# The most elongated a map is drawn: a 1 x 97 map at 1:97 is a hairline whose values cannot
# be seen, so longer maps are stretched across to this ratio (captions keep the true size in
# pixels, and the pixels show as oblong cells).
_MAX_ELONGATION = 8.0


def _figure(width: int, height: int) -> tuple[Figure, FigureCanvasAgg]:
    """A pyplot-free figure of exactly ``width`` x ``height`` pixels with an Agg canvas."""
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    return fig, canvas


def _figure_to_array(canvas: FigureCanvasAgg, width: int, height: int) -> np.ndarray:
    """Render and copy the pixels out (so the figure can be collected)."""
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    # float inches * dpi can round one pixel short; pad/crop to the exact requested size.
    if rgb.shape[:2] != (height, width):
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
        out[:h, :w] = rgb[:h, :w]
        return out
    return np.ascontiguousarray(rgb)


def render_radial_profile(
    erf: np.ndarray,
    *,
    mean: np.ndarray,
    cov: np.ndarray,
    floor: float = 0.0,
    radius: float | None = None,
    energy_radius: float | None = None,
    title: str = "",
    size: tuple[int, int] = (480, 320),
) -> np.ndarray:
    """Cumulative ERF mass vs distance from the fitted centre, measured against the fit.

    The measured curve is the fraction of ``clip(erf - floor, 0)`` within distance ``r`` of
    ``mean`` (pixel centres, Euclidean distance in all d dims, so it works for 1-, 2- and
    3-D maps). The fitted curve is the same quantity for the fitted Gaussian evaluated on the
    same pixel grid, so cropping at the image border affects both curves equally and a good
    fit makes them coincide. The x-range stops a little after both curves reach 99.9%.
    Vertical lines mark ``radius`` and ``energy_radius`` when given. A degenerate covariance
    (not positive definite) omits the fitted curve.

    Args:
        erf: ERF map, ``(z, y, x)`` order.
        mean: fitted centre, shape ``(d,)``.
        cov: fitted covariance, shape ``(d, d)``.
        floor: noise floor subtracted before accumulating.
        radius: e.g. the fitted ERF radius, drawn as a vertical line.
        energy_radius: e.g. the radius holding a fixed share of the energy, drawn likewise.
        title: axes title.
        size: ``(width, height)`` of the image in pixels.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)``.

    Example:
        >>> yy, xx = np.mgrid[:41, :41]
        >>> erf = np.exp(-((yy - 20.0) ** 2 + (xx - 20.0) ** 2) / 50)
        >>> img = render_radial_profile(erf, mean=np.array([20.0, 20.0]), cov=25 * np.eye(2))
        >>> img.shape
        (320, 480, 3)
    """
    erf = np.asarray(erf, dtype=np.float64)
    width, height = int(size[0]), int(size[1])
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    dist = np.sqrt(distance_sq(erf.shape, mean))
    mass = np.where(np.isfinite(erf), np.maximum(erf - floor, 0.0), 0.0)
    gauss = gaussian_on_grid(erf.shape, mean, cov) if np.all(np.isfinite(mean)) else None

    # Choose the x-range on a coarse pass: where both curves are (nearly) complete.
    r_all = float(dist.max()) if dist.size else 1.0
    r_all = r_all if r_all > 0 else 1.0
    coarse = np.linspace(0.0, r_all, 512)
    ends = []
    for m in (mass, gauss):
        if m is not None and m.sum() > 0:
            c = mass_within(dist, m, coarse)
            ends.append(coarse[min(int(np.searchsorted(c, 0.999)), len(coarse) - 1)])
    ends += [v for v in (radius, energy_radius) if v is not None and math.isfinite(v)]
    r_hi = min(1.15 * max(ends), r_all) if ends and max(ends) > 0 else r_all
    radii = np.linspace(0.0, r_hi, 300)

    fig, canvas = _figure(width, height)
    # Fixed pixel margins instead of tight/constrained layout: those cost 10-30 ms per draw.
    top = 30 if title else 12
    fig.subplots_adjust(
        left=58 / width, right=1 - 12 / width, bottom=44 / height, top=1 - top / height
    )
    ax = fig.add_subplot()
    ax.plot(radii, mass_within(dist, mass, radii), color="C0", lw=1.8, label="measured ERF")
    if gauss is not None:
        ax.plot(
            radii,
            mass_within(dist, gauss, radii),
            color="C1",
            lw=1.5,
            ls="--",
            label="fitted Gaussian",
        )
    if radius is not None and math.isfinite(radius):
        ax.axvline(radius, color="C2", lw=1.2, ls=":", label=f"radius = {radius:.1f} px")
    if energy_radius is not None and math.isfinite(energy_radius):
        ax.axvline(
            energy_radius,
            color="C3",
            lw=1.2,
            ls="-.",
            label=f"energy radius = {energy_radius:.1f} px",
        )
    ax.set_xlim(0.0, r_hi)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("radius [input px]")
    ax.set_ylabel("cumulative ERF mass")
    ax.grid(True, alpha=0.3)
    if title:
        # An explicit y turns off automatic title placement (a tight-bbox pass, ~10 ms).
        ax.set_title(title, fontsize=10, y=1.0, pad=6.0)
    # A fixed legend position: loc="best" searches overlaps and is slow.
    ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    return _figure_to_array(canvas, width, height)


_GRID_PAD = 6  # px between tiles and around the grid


_LABEL_PX = 26  # px of label strip above each tile: room for ~13 pt text


def _select_frames(n: int, max_frames: int) -> list[int]:
    """Indices of the frames to show: all, or the first, the last and evenly spaced between."""
    if n <= max_frames:
        return list(range(n))
    if max_frames <= 1:
        return [n - 1]
    # The spacing (n-1)/(max_frames-1) is > 1 here, so the rounded indices are distinct.
    return [int(i) for i in np.round(np.linspace(0, n - 1, max_frames)).astype(int)]


def balanced_columns(n: int, max_columns: int) -> int:
    """Tiles per row for ``n`` tiles in the fewest rows of at most ``max_columns``, the rows as
    even as they can be: 7 tiles of at most 6 a row as 4 + 3, not 6 + 1.

    Example:
        >>> balanced_columns(7, 6), balanced_columns(5, 4), balanced_columns(3, 4)
        (4, 3, 3)
    """
    return math.ceil(n / math.ceil(n / max_columns))


def _grid_layout(n: int, tile: int, max_columns: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Image size and the top-left pixel ``(row, col)`` of each of ``n`` tiles (row-major)."""
    ncols = max(1, min(n, max_columns))
    nrows = math.ceil(n / ncols)
    width = _GRID_PAD + ncols * (tile + _GRID_PAD)
    height = _GRID_PAD + nrows * (_LABEL_PX + tile + _GRID_PAD)
    origins = [
        (_GRID_PAD + (i // ncols) * (_LABEL_PX + tile + _GRID_PAD) + _LABEL_PX,
         _GRID_PAD + (i % ncols) * (tile + _GRID_PAD))
        for i in range(n)
    ]  # fmt: skip
    return height, width, origins


def _fit_tile(img: np.ndarray, tile: int, background: int = 255) -> np.ndarray:
    """Nearest-neighbour resize into a ``tile`` x ``tile`` square, keeping the aspect ratio
    up to ``_MAX_ELONGATION`` (a longer map is stretched across to it).

    Upscaling repeats pixels; downscaling picks the pixel under each output pixel's centre
    (maps in a history are already area-pooled by :func:`downsample_map`).
    """
    h, w = img.shape[:2]
    scale = tile / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    th, tw = max(th, round(tw / _MAX_ELONGATION)), max(tw, round(th / _MAX_ELONGATION))
    rows = np.minimum(((np.arange(th) + 0.5) * (h / th)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * (w / tw)).astype(np.intp), w - 1)
    out = np.full((tile, tile, 3), background, dtype=np.uint8)
    # Top-aligned (directly under its label), centred horizontally.
    c0 = (tile - tw) // 2
    out[:th, c0 : c0 + tw] = img[rows[:, None], cols[None, :]]
    return out


def zoom_caption(span: float, height: float, width: float) -> str:
    """The caption of a zoomed picture: the side of the square shown, of the input's size.

    Example:
        >>> zoom_caption(40.0, 224, 224)
        '40 × 40 of 224 × 224 px'
    """
    return f"{span:.0f} \u00d7 {span:.0f} of {width:g} \u00d7 {height:g} px"


def _crop(
    img: np.ndarray, view: tuple[float, float, float, float], scale: tuple[float, float]
) -> np.ndarray:
    """The pixels of ``img`` under ``view`` (``(y0, y1, x0, x1)``, pixel edges in input
    pixels; ``scale``: input pixels per ``img`` pixel along y and x)."""
    h, w = img.shape[:2]
    (y0, y1, x0, x1), (sy, sx) = view, scale
    r0 = min(max(math.floor((y0 + 0.5) / sy + 1e-9), 0), h - 1)
    c0 = min(max(math.floor((x0 + 0.5) / sx + 1e-9), 0), w - 1)
    r1 = max(min(math.ceil((y1 + 0.5) / sy - 1e-9), h), r0 + 1)
    c1 = max(min(math.ceil((x1 + 0.5) / sx - 1e-9), w), c0 + 1)
    return img[r0:r1, c0:c1]


def render_evolution(
    frames: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    log_scale: bool = False,
    cmap: str = "inferno",
    tile: int = 110,
    max_columns: int = 3,
    view: tuple[float, float, float, float] | None = None,
    input_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grid of ERF heatmaps over training (init -> now), each labelled.

    Each tile is normalised to its own maximum so the change of *shape* stays visible even
    when the overall gradient magnitude drifts. Tiles are ``tile`` x ``tile`` pixels (maps are
    fitted in keeping their aspect ratio, nearest neighbour), laid out row-major in at most
    ``max_columns`` columns, each with its label above it. With more than
    ``2 * max_columns`` frames, only the first, the last and evenly spaced ones in between
    (``2 * max_columns`` in all) are shown. The defaults (6 frames of 110 px in rows of 3,
    labels of up to 13 pt) keep the grid 354 px wide, the width of TensorBoard's default
    image card, so the labels are shown at full size. 1-D and 3-D frames are reduced like
    :func:`to_display_2d`. The tiles are composed in numpy; a matplotlib figure only adds the
    text.

    Args:
        frames: ERF maps, oldest first.
        labels: one label per frame, e.g. ``"step 200"``.
        log_scale: log colour scale (see :func:`render_heatmap`).
        cmap: matplotlib colour-map name.
        tile: tile side in pixels.
        max_columns: maximum number of tiles per row.
        view: show only this square of every frame, ``(y0, y1, x0, x1)`` in input pixels
            (pixel edges; e.g. the heatmap's zoom around the theoretical RF), captioned
            ``N × N of H × W px`` under the grid. Needs ``input_shape``.
        input_shape: the input's ``(H, W)`` (after :func:`to_display_2d`): frames are
            history maps, downsampled from it.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Raises:
        ValueError: for no frames or a label count that does not match.

    Example:
        >>> maps = [np.random.default_rng(i).random((16, 16)) for i in range(3)]
        >>> render_evolution(maps, ["step 0", "step 100", "step 200"]).shape
        (148, 354, 3)
    """
    if len(frames) == 0:
        raise ValueError("render_evolution needs at least one frame")
    if len(labels) != len(frames):
        raise ValueError(f"got {len(frames)} frames but {len(labels)} labels")
    if (view is None) is not (input_shape is None):
        raise ValueError("render_evolution: view and input_shape go together")
    keep = _select_frames(len(frames), 2 * max(1, max_columns))
    height, width, origins = _grid_layout(len(keep), tile, max_columns)
    caption_px = 22 if view is not None else 0
    height += caption_px
    canvas_img = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, (r, c) in zip(keep, origins, strict=True):
        frame = to_display_2d(frames[i])[0]
        # Colour first, so a tile keeps its frame's own normalisation, then crop.
        small = colorize_map(frame, log_scale, cmap)
        if view is not None and input_shape is not None:
            scale = (input_shape[0] / frame.shape[0], input_shape[1] / frame.shape[1])
            small = _crop(small, view, scale)
        canvas_img[r : r + tile, c : c + tile] = _fit_tile(small, tile)

    fig, canvas = _figure(width, height)
    # figimage pastes the array 1:1 in pixel units (no resampling); only the text is drawn.
    fig.figimage(canvas_img, xo=0, yo=0, origin="upper")
    for i, (r, c) in zip(keep, origins, strict=True):
        label = str(labels[i])
        # Shrink long labels so they fit over their tile (~0.6 em per character).
        fontsize = float(np.clip(1.5 * tile / max(len(label), 1), 6.0, 13.0))
        fig.text(
            (c + tile / 2) / width,
            1.0 - (r - _LABEL_PX / 2) / height,
            label,
            ha="center",
            va="center",
            fontsize=fontsize,
        )
    if view is not None and input_shape is not None:
        caption = "each tile: " + zoom_caption(view[1] - view[0], *input_shape)
        fig.text(0.5, caption_px / 2 / height, caption, ha="center", va="center", fontsize=10)
    return _figure_to_array(canvas, width, height)

"""Tests for erf_callback.render: heatmaps, overlays, profile and evolution figures."""

from __future__ import annotations

import gc
import itertools
import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from erf_callback.render import figures, raster
from erf_callback.render.figures import render_evolution, render_radial_profile
from erf_callback.render.raster import (
    _MARKER_RGB,
    _SIGMA1_RGB,
    _SIGMA2_RGB,
    _TRF_RGB,
    colorize,
    render_heatmap,
    to_display_2d,
)
from tests.helpers.maps import gaussian_map, rotated_cov

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def new_pixels(img: np.ndarray, plain: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Mask of pixels that have ``color`` in ``img`` but not in the overlay-free ``plain``."""
    c = np.array(color, dtype=np.uint8)
    return (img == c).all(-1) & ~(plain == c).all(-1)


def has_color_near(
    img: np.ndarray, row: float, col: float, color: tuple[int, int, int], tol: int = 1
) -> bool:
    """Whether ``color`` occurs within ``tol`` upscaled pixels of pixel (floor(row), floor(col))."""
    r, c = math.floor(row), math.floor(col)
    patch = img[max(r - tol, 0) : r + tol + 1, max(c - tol, 0) : c + tol + 1]
    return bool((patch == np.array(color, dtype=np.uint8)).all(-1).any())


def upscaled(coord: float, f: int) -> float:
    """Map coordinate -> upscaled pixel position, as documented in render_heatmap."""
    return (coord + 0.5) * f


def luminance(rgb: np.ndarray) -> float:
    r, g, b = (float(v) for v in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


# The map from the brief: 48x64, mean (20, 30), sigma_y = 4, sigma_x = 8 -> factor 6 at 256.
SHAPE = (48, 64)
MEAN = np.array([20.0, 30.0])
COV = np.diag([4.0**2, 8.0**2])
F = 6


@pytest.fixture(scope="module")
def erf() -> np.ndarray:
    return gaussian_map(SHAPE, MEAN, COV)


@pytest.fixture(scope="module")
def plain(erf: np.ndarray) -> np.ndarray:
    return render_heatmap(erf)


# --------------------------------------------------------------------------------------------
# to_display_2d
# --------------------------------------------------------------------------------------------


def test_to_display_2d_3d_is_sum_over_z_and_yx_block() -> None:
    rng = np.random.default_rng(0)
    vol = rng.random((5, 7, 9))
    mean = np.array([2.0, 3.0, 4.0])
    cov = np.arange(9.0).reshape(3, 3)
    box = ((0, 4), (1, 5), (2, 6))
    img, m, c, b, loc = to_display_2d(vol, mean, cov, box, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(img, vol.sum(axis=0))
    np.testing.assert_array_equal(m, [3.0, 4.0])
    np.testing.assert_array_equal(c, cov[1:, 1:])
    assert b == ((1.0, 5.0), (2.0, 6.0))
    assert loc == (2.0, 3.0)


def test_to_display_2d_2d_unchanged_and_none_passthrough() -> None:
    a = np.arange(12.0).reshape(3, 4)
    img, m, c, b, loc = to_display_2d(a)
    np.testing.assert_array_equal(img, a)
    assert m is None
    assert c is None
    assert b is None
    assert loc is None


@pytest.mark.parametrize(("n", "rows"), [(20, 8), (64, 8), (100, 12), (400, 50)])
def test_to_display_2d_1d_strip(n: int, rows: int) -> None:
    line = np.linspace(0.0, 1.0, n)
    img, m, c, b, loc = to_display_2d(line, np.array([7.0]), np.array([[9.0]]), ((2, 11),), (7.0,))
    assert img.shape == (rows, n)
    assert (img == line).all()  # identical rows
    mid = (rows - 1) / 2
    np.testing.assert_array_equal(m, [mid, 7.0])
    np.testing.assert_array_equal(c, [[0.0, 0.0], [0.0, 9.0]])  # y-variance 0
    assert b[1] == (2.0, 11.0)
    assert math.isinf(b[0][0])
    assert loc == (mid, 7.0)


def test_to_display_2d_rejects_4d() -> None:
    with pytest.raises(ValueError, match="1, 2 or 3"):
        to_display_2d(np.zeros((2, 2, 2, 2)))


# --------------------------------------------------------------------------------------------
# colorize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", ["inferno", "viridis", "gray"])
def test_colorize_extremes_get_end_colours(cmap: str) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(20, 30))
    img = colorize(values, cmap)
    assert img.dtype == np.uint8
    assert img.shape == (20, 30, 3)
    cm = matplotlib.colormaps[cmap]
    top = cm(1.0, bytes=True)[:3]
    bottom = cm(0.0, bytes=True)[:3]
    np.testing.assert_array_equal(img[np.unravel_index(values.argmax(), values.shape)], top)
    np.testing.assert_array_equal(img[np.unravel_index(values.argmin(), values.shape)], bottom)


def test_colorize_matches_matplotlib_lookup() -> None:
    rng = np.random.default_rng(2)
    values = rng.random((31, 17)) * 5 - 1
    norm = (values - values.min()) / (values.max() - values.min())
    expected = matplotlib.colormaps["inferno"](norm, bytes=True)[..., :3]
    np.testing.assert_array_equal(colorize(values), expected)


def test_colorize_nan_is_grey_and_ignored_for_range() -> None:
    values = np.array([[0.0, np.nan], [1.0, np.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = colorize(values, "viridis")
    np.testing.assert_array_equal(img[0, 1], [128, 128, 128])
    np.testing.assert_array_equal(img[1, 1], [128, 128, 128])
    np.testing.assert_array_equal(img[1, 0], matplotlib.colormaps["viridis"](1.0, bytes=True)[:3])
    assert (colorize(np.full((3, 3), np.nan)) == 128).all()


def test_colorize_constant_map_no_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = colorize(np.full((4, 5), 3.0))
        zeros = colorize(np.zeros((4, 5)), vmin=0.0, vmax=0.0)
        above = colorize(np.full((2, 2), 2.0), vmin=1.0, vmax=1.0)
    bottom = matplotlib.colormaps["inferno"](0.0, bytes=True)[:3]
    top = matplotlib.colormaps["inferno"](1.0, bytes=True)[:3]
    assert (img == bottom).all()
    assert (zeros == bottom).all()
    assert (above == top).all()


def test_colorize_clips_to_vmin_vmax() -> None:
    img = colorize(np.array([[-5.0, 0.0, 1.0, 9.0]]), "gray", vmin=0.0, vmax=1.0)
    assert img[0, :, 0].tolist() == [0, 0, 255, 255]


# --------------------------------------------------------------------------------------------
# render_heatmap: size, upscaling, dimensions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_size", "factor"), [(256, 6), (100, 3), (48, 1), (10, 1)])
def test_heatmap_shape_dtype_and_nearest_upscaling(
    erf: np.ndarray, min_size: int, factor: int
) -> None:
    img = render_heatmap(erf, min_size=min_size)
    assert img.dtype == np.uint8
    assert img.shape == (48 * factor, 64 * factor, 3)
    assert min(img.shape[:2]) >= min(min_size, 48)
    # Without overlays each map pixel is an f x f block of its colour.
    small = colorize(erf, vmin=0.0, vmax=float(erf.max()))
    np.testing.assert_array_equal(img[::factor, ::factor], small)
    np.testing.assert_array_equal(img[factor - 1 :: factor, factor - 1 :: factor], small)


def test_heatmap_1d(erf: np.ndarray) -> None:
    line = erf[20]  # 64 pixels -> strip of 8 rows -> factor 32
    img = render_heatmap(
        line, mean=np.array([30.0]), cov=np.array([[64.0]]), trf_box=((10, 50),), location=(30.0,)
    )
    assert img.dtype == np.uint8
    assert img.shape == (8 * 32, 64 * 32, 3)
    # The box has an infinite y-extent: its x-edges run through every row of the strip.
    left = np.mean((img[:, 10 * 32] == _TRF_RGB).all(-1))
    right = np.mean((img[:, 51 * 32] == _TRF_RGB).all(-1))
    assert left == 1.0
    assert right == 1.0
    # The 1-sigma "ellipse" is a segment on the middle row reaching x +- 8.
    mid = upscaled(3.5, 32)
    assert has_color_near(img, mid, upscaled(30 + 8, 32), _SIGMA1_RGB)
    assert has_color_near(img, mid, upscaled(30 - 8, 32), _SIGMA1_RGB)


def test_heatmap_3d_is_projection() -> None:
    mean = np.array([3.0, 20.0, 30.0])
    cov = np.diag([2.0, 16.0, 64.0])
    vol = gaussian_map((7, 48, 64), mean, cov)
    img = render_heatmap(vol, mean=mean, cov=cov, trf_box=((0, 6), (5, 40), (3, 60)))
    ref = render_heatmap(
        vol.sum(axis=0), mean=mean[1:], cov=cov[1:, 1:], trf_box=((5, 40), (3, 60))
    )
    assert img.shape == (288, 384, 3)
    np.testing.assert_array_equal(img, ref)


def test_heatmap_elongated_map_caps_long_side() -> None:
    img = render_heatmap(np.ones((2, 1000)))
    assert img.shape[1] <= 4096
    assert img.shape[0] == 2 * 4


# --------------------------------------------------------------------------------------------
# render_heatmap: overlays
# --------------------------------------------------------------------------------------------


def mahalanobis_of_pixels(
    mask: np.ndarray, mean: np.ndarray, cov: np.ndarray, f: int
) -> np.ndarray:
    """Mahalanobis distance of the map coordinates of the upscaled pixels in ``mask``."""
    rows, cols = np.nonzero(mask)
    pts = np.stack([(rows + 0.5) / f - 0.5, (cols + 0.5) / f - 0.5], axis=-1) - mean
    return np.sqrt(np.einsum("ni,ij,nj->n", pts, np.linalg.inv(cov), pts))


def test_axis_aligned_one_sigma_ellipse_position(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, mean=MEAN, cov=COV)
    y, x = MEAN
    for py, px in [(y, x + 8), (y, x - 8), (y + 4, x), (y - 4, x)]:
        assert has_color_near(img, upscaled(py, F), upscaled(px, F), _SIGMA1_RGB), (py, px)
    # ... and not inside or outside the contour.
    for py, px in [(y, x + 6), (y, x - 10), (y + 3, x), (y - 5, x)]:
        assert not has_color_near(img, upscaled(py, F), upscaled(px, F), _SIGMA1_RGB), (py, px)
    d1 = mahalanobis_of_pixels(new_pixels(img, plain, _SIGMA1_RGB), MEAN, COV, F)
    assert d1.size > 100
    assert np.all(np.abs(d1 - 1.0) < 0.1)
    d2 = mahalanobis_of_pixels(new_pixels(img, plain, _SIGMA2_RGB), MEAN, COV, F)
    assert d2.size > 100
    assert np.all(np.abs(d2 - 2.0) < 0.1)


def test_two_sigma_ellipse_is_dashed(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, mean=MEAN, cov=COV)
    ring = mahalanobis_of_pixels(np.ones(img.shape[:2], bool), MEAN, COV, F).reshape(img.shape[:2])
    on = new_pixels(img, plain, _SIGMA2_RGB)[np.abs(ring - 2.0) < 0.02]
    # Dashes: a good part of the contour is coloured, a good part is left as a gap.
    assert 0.3 < on.mean() < 0.8


def test_rotated_covariance_draws_rotated_ellipse(plain: np.ndarray) -> None:
    angle = math.radians(30)
    cov = rotated_cov(8.0, 4.0, angle)
    erf = gaussian_map(SHAPE, MEAN, cov)
    base = render_heatmap(erf)
    img = render_heatmap(erf, mean=MEAN, cov=cov)
    u = np.array([math.cos(angle), math.sin(angle)])
    v = np.array([-math.sin(angle), math.cos(angle)])
    for p in (MEAN + 8 * u, MEAN - 8 * u, MEAN + 4 * v, MEAN - 4 * v):
        assert has_color_near(img, upscaled(p[0], F), upscaled(p[1], F), _SIGMA1_RGB), p
    # An axis-aligned ellipse would pass through (y, x + 8); the rotated one does not.
    assert not has_color_near(img, upscaled(20, F), upscaled(38, F), _SIGMA1_RGB)
    d1 = mahalanobis_of_pixels(new_pixels(img, base, _SIGMA1_RGB), MEAN, cov, F)
    assert d1.size > 100
    assert np.all(np.abs(d1 - 1.0) < 0.1)


def test_trf_box_edges(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, trf_box=((10, 30), (5, 40)))
    green = new_pixels(img, plain, _TRF_RGB)
    # Edges on the pixel boundaries: rows 10*f and 31*f, columns 5*f and 41*f.
    top, bottom, left, right = 10 * F, 31 * F, 5 * F, 41 * F
    for r in (top, bottom):
        assert green[r, left:right].all()
        assert green[r - 1, left:right].all()
    for c in (left, right):
        assert green[top:bottom, c].all()
        assert green[top:bottom, c - 1].all()
    # Nothing else: the interior and the outside stay untouched.
    inner = green[top + 2 : bottom - 2, left + 2 : right - 2]
    assert not inner.any()
    assert not green[: top - 2].any()
    assert not green[bottom + 2 :].any()
    assert not green[:, : left - 2].any()
    assert not green[:, right + 2 :].any()


def test_trf_box_partly_outside_is_clipped(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, trf_box=((-10, 30), (5, 200)))
    green = new_pixels(img, plain, _TRF_RGB)
    w = green.shape[1]
    bottom, left = 31 * F, 5 * F
    assert green[bottom, left:].all()  # bottom edge runs to the right border
    assert green[:bottom, left].all()  # left edge runs up to the top border
    assert not green[0, left + 3 :].any()  # the top edge lies outside: not drawn
    assert not green[: bottom - 2, w - 1].any()  # the right edge lies outside: not drawn


@pytest.mark.parametrize(
    "box",
    [
        ((-math.inf, math.inf), (-math.inf, math.inf)),
        ((-100, 200), (-100, 200)),  # contains the whole image
        ((100, 120), (100, 120)),  # entirely outside
        ((math.nan, 3), (0, 4)),
    ],
)
def test_trf_box_not_drawn(erf: np.ndarray, plain: np.ndarray, box: tuple) -> None:
    img = render_heatmap(erf, trf_box=box)
    np.testing.assert_array_equal(img, plain)


def test_trf_box_half_infinite_draws_finite_edges(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, trf_box=((10, math.inf), (-math.inf, math.inf)))
    green = new_pixels(img, plain, _TRF_RGB)
    assert green[10 * F].all()  # the finite top edge, across the whole width
    assert green.sum() == 2 * img.shape[1]  # and nothing else


@pytest.mark.parametrize(
    "cov",
    [np.zeros((2, 2)), np.full((2, 2), np.nan), np.array([[np.inf, 0.0], [0.0, 1.0]])],
)
def test_degenerate_cov_draws_no_ellipse(
    erf: np.ndarray, plain: np.ndarray, cov: np.ndarray
) -> None:
    img = render_heatmap(erf, mean=MEAN, cov=cov)
    np.testing.assert_array_equal(img, plain)
    img = render_heatmap(erf, mean=np.array([np.nan, 1.0]), cov=COV)
    np.testing.assert_array_equal(img, plain)


def test_location_marker(erf: np.ndarray, plain: np.ndarray) -> None:
    img = render_heatmap(erf, location=(20.0, 30.0))
    marker = new_pixels(img, plain, _MARKER_RGB)
    rows, cols = np.nonzero(marker)
    cy, cx = upscaled(20, F), upscaled(30, F)
    assert marker[math.floor(cy), math.floor(cx)]
    # A small cross: centred on the location, a few pixels across.
    assert abs(rows.mean() - cy) < 1.5
    assert abs(cols.mean() - cx) < 1.5
    assert 8 <= np.ptp(rows) <= 20
    assert 8 <= np.ptp(cols) <= 20
    # Off-image locations are fine.
    np.testing.assert_array_equal(render_heatmap(erf, location=(-50.0, 500.0)), plain)


def test_log_scale_brings_up_tails() -> None:
    sigma = 5.0
    erf = gaussian_map((64, 64), np.array([32.0, 32.0]), sigma**2 * np.eye(2))
    lin = render_heatmap(erf, min_size=64)
    log = render_heatmap(erf, min_size=64, log_scale=True)
    tail = (32, 32 + 3 * int(sigma))
    assert luminance(log[tail]) > luminance(lin[tail]) + 50
    top = matplotlib.colormaps["inferno"](1.0, bytes=True)[:3]
    np.testing.assert_array_equal(lin[32, 32], top)
    np.testing.assert_array_equal(log[32, 32], top)


def test_log_scale_formula() -> None:
    v = np.array([[0.0, 1e-3, 0.5, 1.0, -1.0, np.nan]]) * 4.0
    s = raster._log_scale(v)
    eps = 1e-3
    expected = np.log10(1 + np.array([0.0, 1e-3, 0.5, 1.0, 0.0]) / eps) / np.log10(1 + 1 / eps)
    np.testing.assert_allclose(s[0, :5], expected)
    assert np.isnan(s[0, 5])
    assert s[0, 1] == pytest.approx(math.log10(2) / math.log10(1001))


def test_heatmap_nan_map_is_grey() -> None:
    erf = np.full((8, 8), np.nan)
    img = render_heatmap(erf, mean=np.array([4.0, 4.0]), cov=np.eye(2))
    assert img.shape == (256, 256, 3)
    corner = img[:8, :8]
    assert (corner == 128).all()


# --------------------------------------------------------------------------------------------
# radial profile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(480, 320), (500, 333), (301, 199)])
def test_radial_profile_size(erf: np.ndarray, size: tuple[int, int]) -> None:
    img = render_radial_profile(
        erf, mean=MEAN, cov=COV, radius=16.0, energy_radius=12.5, title="layer1", size=size
    )
    assert img.dtype == np.uint8
    assert img.shape == (size[1], size[0], 3)
    assert img.std() > 10  # something was drawn


def test_radial_profile_1d_3d_and_degenerate() -> None:
    line = np.exp(-0.5 * ((np.arange(50) - 25.0) / 3) ** 2)
    img = render_radial_profile(line, mean=np.array([25.0]), cov=np.array([[9.0]]), floor=0.01)
    assert img.shape == (320, 480, 3)
    mean = np.array([4.0, 10.0, 12.0])
    vol = gaussian_map((9, 20, 24), mean, np.diag([2.0, 9.0, 16.0]))
    img = render_radial_profile(vol, mean=mean, cov=np.diag([2.0, 9.0, 16.0]), size=(320, 240))
    assert img.shape == (240, 320, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = render_radial_profile(
            np.zeros((10, 10)), mean=np.array([5.0, 5.0]), cov=np.zeros((2, 2))
        )
    assert img.shape == (320, 480, 3)


def test_radial_profile_gaussian_curve_changes_picture(erf: np.ndarray) -> None:
    # Same data, different fit -> different picture: the fitted curve is really drawn.
    a = render_radial_profile(erf, mean=MEAN, cov=COV)
    b = render_radial_profile(erf, mean=MEAN, cov=4 * COV)
    assert (a != b).any(axis=-1).sum() > 200


# --------------------------------------------------------------------------------------------
# evolution grid
# --------------------------------------------------------------------------------------------


def dot_frames(n: int, side: int = 16) -> list[np.ndarray]:
    """Frames that encode their index: a bright pixel at a position unique to the index."""
    frames = []
    for i in range(n):
        a = np.full((side, side), 0.1)
        a[i % side, (i // side) % side] = 1.0
        frames.append(a)
    return frames


def tile_of(img: np.ndarray, origin: tuple[int, int], tile: int) -> np.ndarray:
    r, c = origin
    return img[r : r + tile, c : c + tile]


def test_evolution_layout() -> None:
    tile, cols = 32, 3
    frames = dot_frames(5)
    img = render_evolution(
        frames, [f"step {100 * i}" for i in range(5)], tile=tile, max_columns=cols
    )
    height, width, origins = figures._grid_layout(5, tile, cols)
    assert img.dtype == np.uint8
    assert img.shape == (height, width, 3)
    assert len({r for r, _ in origins}) == 2
    assert len({c for _, c in origins}) == 3
    for i, origin in enumerate(origins):
        # 16 -> 32: every map pixel is a 2x2 block; the tile shows frame i, own max -> top colour.
        expected = np.repeat(np.repeat(colorize(frames[i], vmin=0.0, vmax=1.0), 2, 0), 2, 1)
        np.testing.assert_array_equal(tile_of(img, origin, tile), expected)
        # Each tile has a label (dark text) in the strip above it.
        r, c = origin
        strip = img[r - figures._LABEL_PX : r, c : c + tile]
        assert (strip.min(axis=-1) < 100).any()
    # The unused sixth slot (second row, third column) stays blank, label strip included.
    r, c = origins[3][0], origins[2][1]
    assert (img[r - figures._LABEL_PX : r + tile, c : c + tile] == 255).all()


def test_evolution_tiles_normalised_to_own_max() -> None:
    base = gaussian_map((16, 16), np.array([8.0, 8.0]), 9 * np.eye(2))
    img = render_evolution([base, 1000 * base], ["a", "b"], tile=32)
    _, _, origins = figures._grid_layout(2, 32, 8)
    np.testing.assert_array_equal(tile_of(img, origins[0], 32), tile_of(img, origins[1], 32))


def test_evolution_subsampling_keeps_first_and_last() -> None:
    idx = figures._select_frames(40, 16)
    assert len(idx) == 16
    assert idx[0] == 0
    assert idx[-1] == 39
    assert all(b > a for a, b in itertools.pairwise(idx))
    assert figures._select_frames(10, 16) == list(range(10))
    assert figures._select_frames(17, 16)[-1] == 16

    frames = dot_frames(40)
    tile = 16
    img = render_evolution(frames, [f"step {i}" for i in range(40)], tile=tile, max_columns=8)
    height, width, origins = figures._grid_layout(16, tile, 8)
    assert img.shape == (height, width, 3)  # 2 rows of 8 tiles
    top = np.array(matplotlib.colormaps["inferno"](1.0, bytes=True)[:3])
    for slot, frame_idx in ((0, 0), (15, 39), (7, idx[7])):
        hot = np.argwhere((tile_of(img, origins[slot], tile) == top).all(-1))
        assert hot.tolist() == [[frame_idx % 16, (frame_idx // 16) % 16]]


def test_evolution_non_square_1d_3d_and_log() -> None:
    frames = [np.random.default_rng(0).random((10, 30)), np.ones(40), np.ones((3, 12, 12))]
    img = render_evolution(frames, ["wide", "1-D", "3-D"], log_scale=True, tile=48)
    assert img.dtype == np.uint8
    assert img.shape == (*figures._grid_layout(3, 48, 8)[:2], 3)


@pytest.mark.parametrize(
    ("shape", "drawn"), [((1, 97), (8, 64)), ((97, 3), (64, 8)), ((4, 8), (32, 64))]
)
def test_an_evolution_tile_stretches_an_elongated_map_to_eight_to_one(shape, drawn) -> None:
    # A one-row map in a 64 px tile was a 1 px hairline.
    img = np.zeros((*shape, 3), dtype=np.uint8)
    tile = figures._fit_tile(img, 64)
    rows, cols = np.nonzero((tile != 255).any(-1))
    assert (rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) == drawn


def test_evolution_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        render_evolution([], [])
    with pytest.raises(ValueError, match="labels"):
        render_evolution([np.ones((4, 4))], ["a", "b"])


# --------------------------------------------------------------------------------------------
# no pyplot, no leaked figures
# --------------------------------------------------------------------------------------------


def test_renderers_never_import_pyplot() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from erf_callback import render as R
        before = "matplotlib.pyplot" in sys.modules
        yy, xx = np.mgrid[:20, :30]
        erf = np.exp(-((yy - 10.0) ** 2 + (xx - 15.0) ** 2) / 20)
        m, c = np.array([10.0, 15.0]), 10 * np.eye(2)
        R.render_heatmap(erf, mean=m, cov=c, trf_box=((2, 18), (3, 27)), location=(10, 15))
        R.render_heatmap(erf, log_scale=True)
        R.render_radial_profile(erf, mean=m, cov=c, radius=5.0, energy_radius=4.0, title="t")
        R.render_evolution([erf, erf], ["step 0", "step 1"])
        R.colorize(erf)
        from erf_callback.fit.grid import downsample_map
        downsample_map(erf, 8)
        print(json.dumps({"before": before, "after": "matplotlib.pyplot" in sys.modules}))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    flags = json.loads(res.stdout.strip().splitlines()[-1])
    assert not flags["before"], "importing the erf_callback package already imported pyplot"
    assert not flags["after"], "a renderer imported matplotlib.pyplot"


def test_history_and_engine_never_import_matplotlib() -> None:
    script = (
        "import sys, torch; from erf_callback.callback.history import ERFHistory; "
        "import erf_callback; erf_callback.compute_erf(torch.nn.Conv2d(1, 1, 3), "
        "torch.randn(1, 1, 8, 8))['output'].metrics(); "
        "ERFHistory().add(0, 0, 'a', 'ok', {}, torch.ones(80, 80)); "
        "print(any(m.startswith('matplotlib') for m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_figures_are_garbage_collected(erf: np.ndarray) -> None:
    def live_figures() -> int:
        gc.collect()
        # type() rather than isinstance(): no attribute access on arbitrary live objects.
        return sum(type(o) is Figure for o in gc.get_objects())

    before = live_figures()
    for _ in range(3):
        render_radial_profile(erf, mean=MEAN, cov=COV)
        render_evolution([erf, erf], ["a", "b"])
    assert live_figures() == before


def test_evolution_zoomed_shows_the_view_of_every_frame() -> None:
    # Frames downsampled 2x from a 128 px input, one hot pixel each; the view is a 32 px
    # square of the input (frame rows 16-31, columns 23-38): each tile is those 16 x 16 frame
    # pixels at 2x, and the grid gets a caption saying what it shows.
    frames = []
    for k in range(3):
        f = np.zeros((64, 64))
        f[20 + k, 30] = 1.0
        frames.append(f)
    view = (31.5, 63.5, 45.5, 77.5)
    labels = ["a", "b", "c"]
    img = render_evolution(frames, labels, tile=32, view=view, input_shape=(128, 128))
    height, width, origins = figures._grid_layout(3, 32, 3)
    assert img.shape == (height + 22, width, 3)
    top = np.array(matplotlib.colormaps["inferno"](1.0, bytes=True)[:3])
    for k, origin in enumerate(origins):
        hot = np.argwhere((tile_of(img, origin, 32) == top).all(-1))
        rows, cols = (20 + k - 16) * 2, (30 - 23) * 2
        assert hot.tolist() == [
            [rows, cols],
            [rows, cols + 1],
            [rows + 1, cols],
            [rows + 1, cols + 1],
        ]
    assert (img[height:].min(axis=-1) < 100).any()  # the caption's text
    whole = render_evolution(frames, labels, tile=32)
    assert whole.shape == (height, width, 3)
    assert (tile_of(whole, origins[0], 32) == top).all(-1).sum() <= 1  # 64 px into 32: a dot
    with pytest.raises(ValueError, match="view and input_shape go together"):
        render_evolution(frames, labels, view=view)


def test_the_callbacks_evolution_is_zoomed_like_its_heatmap() -> None:
    # A 3 x 3 conv on a 64 px input: the heatmap zooms on its TRF, and the evolution grid
    # shows the same square of every frame (its tiles are mostly ERF, not background).
    import torch
    from torch import nn

    from erf_callback import compute_erf
    from erf_callback.callback.history import ERFHistory
    from erf_callback.callback.images import ProbeImages

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
    maps = compute_erf(net, torch.randn(2, 1, 64, 64), ["2"])
    history = ERFHistory()
    for step in (0, 5):
        history.add(step, 0, "2", "ok", {**maps["2"].metrics(), "center_y": 31.5,
                                         "center_x": 31.5}, maps["2"].grad)  # fmt: skip
    strip = ProbeImages("erf").render(maps, history, step=5)["erf/2/evolution"]
    height, width, origins = figures._grid_layout(2, 110, 3)
    assert strip.shape == (height + 22, width, 3)
    tile = tile_of(strip, origins[1], 110).astype(int)
    assert (tile.sum(-1) > 100).mean() > 0.05  # lit pixels: 5x5 TRF in a ~16 px view

"""The shared grid numerics: distances, Mahalanobis form, Gaussian on a grid, mass within a
radius, downsampling. Expected values come from closed forms or brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erf_callback.fit import grid
from erf_callback.fit.grid import downsample_map
from tests.helpers.maps import gaussian_map, rotated_cov

# --------------------------------------------------------------------------------------------
# cumulative mass
# --------------------------------------------------------------------------------------------


def test_cumulative_mass_matches_gaussian_theory() -> None:
    sigma = 5.0
    mean = np.array([40.0, 40.0])
    cov = sigma**2 * np.eye(2)
    erf = gaussian_map((81, 81), mean, cov)
    radii = np.array([0.0, sigma, 2 * sigma, 100.0])
    measured = grid.cumulative_mass(erf, mean, radii)
    expected = 1 - math.exp(-2)  # 2-D isotropic: P(r <= k sigma) = 1 - exp(-k^2 / 2)
    assert measured[2] == pytest.approx(expected, rel=0.01)
    # At r = sigma = 5 several lattice points sit exactly on the circle (3-4-5): ~2% high.
    assert measured[1] == pytest.approx(1 - math.exp(-0.5), rel=0.03)
    assert measured[3] == pytest.approx(1.0)
    fitted = grid.cumulative_mass(grid.gaussian_on_grid(erf.shape, mean, cov), mean, radii)
    assert fitted[2] == pytest.approx(expected, rel=0.01)


def test_cumulative_mass_3d_and_unsorted_radii() -> None:
    sigma = 4.0
    mean = np.array([16.0, 16.0, 16.0])
    erf = gaussian_map((33, 33, 33), mean, sigma**2 * np.eye(3))
    radii = np.array([3 * sigma, 2 * sigma, 0.5])
    out = grid.cumulative_mass(erf, mean, radii)
    # 3-D isotropic (chi with 3 dof) at 2 sigma: erf(sqrt 2) - sqrt(2/pi) * 2 * exp(-2).
    expected = math.erf(math.sqrt(2)) - math.sqrt(2 / math.pi) * 2 * math.exp(-2)
    assert out[1] == pytest.approx(expected, rel=0.02)
    assert out[0] > out[1] > out[2] >= 0.0
    assert out[2] == pytest.approx(1 / erf.sum())  # only the centre pixel (value 1)


def test_cumulative_mass_ignores_negative_and_nan() -> None:
    erf = np.array([1.0, -5.0, np.nan, 3.0])
    out = grid.cumulative_mass(erf, np.array([0.0]), np.array([0.0, 2.5, 3.0]))
    np.testing.assert_allclose(out, [0.25, 0.25, 1.0])


# --------------------------------------------------------------------------------------------
# downsample_map
# --------------------------------------------------------------------------------------------


def test_downsample_preserves_mean_and_block_means() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((128, 256))
    out = downsample_map(a, 64)
    assert out.shape == (64, 64)
    assert out.mean() == pytest.approx(a.mean())
    assert out[3, 5] == pytest.approx(a[6:8, 20:24].mean())


def test_downsample_uneven_blocks() -> None:
    rng = np.random.default_rng(4)
    a = rng.random((130, 40))
    out = downsample_map(a, 64)
    assert out.shape == (44, 40)  # block 3, ceil(130 / 3) = 44, last block 1 row
    np.testing.assert_allclose(out[-1], a[129])
    np.testing.assert_allclose(out[0], a[:3].mean(axis=0))
    areas = np.array([3.0] * 43 + [1.0])
    assert (out * areas[:, None]).sum() == pytest.approx(a.sum())


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [((100, 100, 100), 64, (50, 50, 50)), ((1000,), 64, (63,)), ((65, 10), 64, (33, 10))],
)
def test_downsample_shapes(
    shape: tuple[int, ...], max_side: int, expected: tuple[int, ...]
) -> None:
    out = downsample_map(np.ones(shape), max_side)
    assert out.shape == expected
    assert np.allclose(out, 1.0)


def test_downsample_small_map_unchanged() -> None:
    a = np.random.default_rng(5).random((64, 64))
    out = downsample_map(a, 64)
    np.testing.assert_array_equal(out, a)
    assert out.dtype == np.float64
    assert not np.shares_memory(out, a)


# --------------------------------------------------------------------------------------------
# distances, Mahalanobis form, Gaussian on a grid
# --------------------------------------------------------------------------------------------


def brute_force_mahalanobis(shape, mean, prec) -> np.ndarray:
    out = np.empty(shape)
    for idx in np.ndindex(*shape):
        delta = np.array(idx, dtype=np.float64) - mean
        out[idx] = delta @ prec @ delta
    return out


@pytest.mark.parametrize(
    ("shape", "mean", "prec"),
    [
        ((7,), [2.5], [[0.3]]),
        ((5, 6), [1.0, 4.2], np.linalg.inv(rotated_cov(2.0, 0.7, 0.4))),
        ((3, 4, 5), [1.0, 1.5, 3.0], [[1.0, 0.2, -0.1], [0.2, 2.0, 0.3], [-0.1, 0.3, 0.5]]),
    ],
)
def test_mahalanobis_sq_matches_brute_force(shape, mean, prec) -> None:
    mean, prec = np.asarray(mean, float), np.asarray(prec, float)
    got = np.broadcast_to(grid.mahalanobis_sq(grid.open_grid(shape), mean, prec), shape)
    np.testing.assert_allclose(got, brute_force_mahalanobis(shape, mean, prec), rtol=1e-12)


def test_distance_sq_is_euclidean_and_checks_the_centre() -> None:
    got = grid.distance_sq((4, 5), (1.5, 3.0))
    yy, xx = np.mgrid[:4, :5]
    np.testing.assert_allclose(got, (yy - 1.5) ** 2 + (xx - 3.0) ** 2, rtol=1e-15)
    assert got.shape == (4, 5) and got.flags.writeable
    with pytest.raises(ValueError, match="center has 1 coordinates for a 2-D map"):
        grid.distance_sq((4, 5), (1.0,))


@pytest.mark.parametrize(
    ("shape", "mean", "cov"),
    [
        ((9, 12), (4.0, 5.5), rotated_cov(3.0, 1.2, 0.8)),
        ((11,), (5.0,), [[0.25]]),  # narrower than a pixel: still a density
        ((5, 6, 7), (2.0, 2.5, 3.0), np.diag([1.0, 2.0, 0.5])),
    ],
)
def test_gaussian_on_grid_matches_the_definition(shape, mean, cov) -> None:
    got = grid.gaussian_on_grid(shape, np.array(mean), np.array(cov))
    np.testing.assert_allclose(got, gaussian_map(shape, mean, np.array(cov)), rtol=1e-12)
    assert got.shape == shape


@pytest.mark.parametrize(
    ("mean", "cov"),
    [
        ((2.0, 2.0), np.zeros((2, 2))),  # zero width
        ((2.0, 2.0), np.diag([4.0, -1.0])),  # not positive definite
        ((2.0, 2.0), np.diag([4.0, 0.0])),  # singular
        ((math.nan, 2.0), np.eye(2)),
        ((2.0, 2.0), np.diag([math.inf, 1.0])),
        ((2.0, 2.0), np.full((2, 2), math.nan)),
    ],
)
def test_gaussian_on_grid_has_no_density_for_bad_fits(mean, cov) -> None:
    assert grid.gaussian_on_grid((5, 5), np.array(mean), cov) is None


def test_mass_within_counts_pixels_up_to_each_radius_inclusive() -> None:
    dist = np.array([0.0, 1.0, 1.0, 2.0, 3.5])
    mass = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    got = grid.mass_within(dist, mass, np.array([0.0, 0.5, 1.0, 3.4, 3.5]))
    np.testing.assert_allclose(got, np.array([1.0, 1.0, 6.0, 10.0, 20.0]) / 20.0, rtol=1e-15)
    # Radii beyond every pixel, and a total below 1 (a scale, not "no mass").
    got = grid.mass_within(dist, mass / 40.0, np.array([1.0, 10.0, 20.0]))
    np.testing.assert_allclose(got, [0.3, 1.0, 1.0], rtol=1e-15)
    assert got.shape == (3,)
    empty = grid.mass_within(dist, np.zeros(5), np.array([1.0, 2.0]))
    assert empty.shape == (2,) and not empty.any()


def test_cumulative_mass_takes_a_scalar_radius() -> None:
    got = grid.cumulative_mass(np.array([1.0, 2.0, 1.0]), np.array([1.0]), 0.0)
    np.testing.assert_allclose(got, [0.5], rtol=1e-15)


# --------------------------------------------------------------------------------------------
# unit Gaussian (factored on large 2-D grids), sum of products, bounding box
# --------------------------------------------------------------------------------------------


def _direct(coords: list[np.ndarray], mean: np.ndarray, prec: np.ndarray) -> np.ndarray:
    q = grid.mahalanobis_sq(coords, mean, prec)
    return np.broadcast_to(np.exp(-0.5 * q), tuple(len(c) for c in coords))


@pytest.mark.parametrize("seed", range(6))
def test_unit_gaussian_equals_the_exponential_of_the_quadratic_form(seed: int) -> None:
    # Random boxes (offset, 9-300 px per side), centres in and out of them, widths from a
    # third of a pixel to twice the box, correlations up to 0.999: the factored product
    # agrees with exp(-q/2) to the rounding of q itself (|q| up to ~1e3 here: ~1e-13).
    rng = np.random.default_rng(seed)
    factored = 0
    for _ in range(60):
        n, m = (int(v) for v in rng.integers(9, 300, 2))
        y0, x0 = (float(v) for v in rng.integers(0, 50, 2))
        coords = [y0 + np.arange(n, dtype=np.float64), x0 + np.arange(m, dtype=np.float64)]
        mean = np.array([rng.uniform(y0 - 20, y0 + n + 20), rng.uniform(x0 - 20, x0 + m + 20)])
        sy, sx = rng.uniform(0.3, 2.0 * max(n, m), 2)
        rho = rng.uniform(-0.999, 0.999)
        prec = np.linalg.inv(np.array([[sy * sy, rho * sy * sx], [rho * sy * sx, sx * sx]]))
        ref = _direct(coords, mean, prec)
        got = grid.unit_gaussian(coords, mean, prec)
        factored += grid._unit_gaussian_2d(coords[0], coords[1], mean, prec) is not None
        assert got.shape == (n, m)
        big = ref > 1e-200
        np.testing.assert_allclose(got[big], ref[big], rtol=5e-13)
        assert np.all(np.abs(got[~big]) < 1e-190)
    assert factored > 30  # the factored path is the one under test


def test_unit_gaussian_falls_back_where_a_partial_product_would_overflow() -> None:
    # Correlation 0.99999 on a 200 x 200 box: the cross term alone reaches e^1000.
    coords = [np.arange(200.0), np.arange(200.0)]
    s = 60.0
    rho = 0.99999
    prec = np.linalg.inv(np.array([[s * s, rho * s * s], [rho * s * s, s * s]]))
    mean = np.array([100.0, 100.0])
    assert grid._unit_gaussian_2d(coords[0], coords[1], mean, prec) is None
    got = grid.unit_gaussian(coords, mean, prec)
    np.testing.assert_allclose(got, _direct(coords, mean, prec), rtol=1e-15)


@pytest.mark.parametrize(
    "coords",
    [
        [np.arange(40.0)],
        [np.arange(30.0), np.arange(0.0, 60.0, 2.0)],  # strided rows: direct form
        [np.arange(6.0), np.arange(7.0), np.arange(5.0)],
    ],
)
def test_unit_gaussian_other_grids_take_the_direct_form(coords: list[np.ndarray]) -> None:
    d = len(coords)
    mean = np.array([float(len(c)) / 2 for c in coords])
    prec = np.linalg.inv(np.eye(d) * 9.0 + 0.5)
    np.testing.assert_allclose(
        grid.unit_gaussian(coords, mean, prec), _direct(coords, mean, prec), rtol=1e-15
    )


@pytest.mark.parametrize("shape", [(7,), (50, 60), (100, 101), (20, 21, 22)])
def test_sum_of_products_is_the_sum_of_the_products(shape: tuple[int, ...]) -> None:
    # Below and above the size where BLAS would start threads (8192): both forms agree.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=shape), rng.normal(size=shape)
    assert grid.sum_of_products(x, y) == pytest.approx(float(np.sum(x * y)), rel=1e-12)


def test_bounding_box_is_the_smallest_box_holding_the_mask() -> None:
    mask = np.zeros((9, 12), dtype=bool)
    mask[2, 5] = mask[6, 3] = mask[4, 10] = True
    assert grid.bounding_box(mask) == (slice(2, 7), slice(3, 11))
    line = np.zeros(10, dtype=bool)
    line[[4, 7]] = True
    assert grid.bounding_box(line) == (slice(4, 8),)

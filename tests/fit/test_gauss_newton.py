"""The model fit's numerics (``erf_callback.fit.gauss_newton``) against independent
computations: the normal equations against the explicit Jacobian, block means against
numpy's, the half-maximum moments against the centred ones, and the iteration's statistical
stop against the fully converged optimum.

The iteration's tests run on both implementations of the 2-D iteration (numpy, and the
compiled kernel of ``erf_callback.fit._compiled``), counting its steps on each."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erf_callback.fit import gauss_newton as gn
from erf_callback.fit import gaussian as fg
from erf_callback.fit import kernels
from tests.helpers.maps import gaussian_map, half_normal_floor, rotated_cov


def _monomials(grid: gn._Grid) -> list[np.ndarray]:
    """``1, u_i, u_i u_j (i <= j)`` on the full grid, the model's feature order."""
    u = [np.broadcast_to(a, grid.shape) for a in grid.axes]
    out = [np.ones(grid.shape), *u]
    out += [u[i] * u[j] for i in range(grid.d) for j in range(i, grid.d)]
    return out


@pytest.mark.parametrize("fit_floor", [True, False])
@pytest.mark.parametrize(
    "axes",
    [
        ((3.0, 1, 40),),
        ((0.0, 1, 23), (5.5, 2, 31)),
        ((0.0, 1, 64), (0.0, 1, 64)),
        ((1.0, 3, 9), (0.0, 1, 11), (2.0, 2, 8)),
    ],
    ids=["1d", "2d-blocks", "2d-square", "3d"],
)
def test_normal_equations_equal_the_explicit_jacobian(axes, fit_floor) -> None:
    grid, _, _ = gn._grid_of(axes)
    rng = np.random.default_rng(len(axes))
    d = grid.d
    # A bump: negative definite quadratic part, small linear part.
    coef = np.concatenate([[0.1], rng.normal(0, 0.3, d), np.zeros(d * (d + 1) // 2)])
    k = 1 + d
    for i in range(d):
        for j in range(i, d):
            coef[k] = -1.5 if i == j else rng.normal(0, 0.2)
            k += 1
    target = rng.random(grid.shape)
    w = grid.weights()
    g = np.exp(grid.eta(coef), out=w[gn._G])
    np.subtract(target, g, out=w[gn._R])
    w[gn._R] -= 0.05
    normal, grad = grid.normal_equations(w, fit_floor)

    monomials = _monomials(grid)
    np.testing.assert_allclose(
        grid.eta(coef), sum(c * m for c, m in zip(coef, monomials, strict=True))
    )
    columns = [g * m for m in monomials]
    if fit_floor:
        columns = [np.ones(grid.shape), *columns]
    jac = np.stack([c.ravel() for c in columns], axis=1)
    r = (target - g - 0.05).ravel()
    np.testing.assert_allclose(normal, jac.T @ jac, rtol=1e-12, atol=1e-12 * grid.size)
    np.testing.assert_allclose(grad, jac.T @ r, rtol=1e-12, atol=1e-12 * grid.size)


def test_grid_of_scales_the_coordinates_to_unit_range_and_is_shared() -> None:
    axes = ((3.5, 4, 10), (0.0, 1, 7))
    grid, centre, half = gn._grid_of(axes)
    assert gn._grid_of(axes)[0] is grid  # cached: repeated probes of one shape reuse it
    shared = [centre, half, *grid.axes, *grid.powers, grid._rows, grid._cols]
    assert not any(array.flags.writeable for array in shared)  # so no fit can alter it
    coords = [3.5 + 4 * np.arange(10.0), np.arange(7.0)]
    for axis, c, m, h in zip(grid.axes, coords, centre, half, strict=True):
        np.testing.assert_array_equal(axis.ravel(), (c - m) / h)
        assert axis.min() == -1.0 and axis.max() == 1.0


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((64, 64), (slice(0, 64, 2), slice(0, 64, 2))),
        ((129, 161), (slice(5, 120, 3), slice(7, 161, 4))),  # ragged ends are dropped
        ((50, 70), (slice(3, 50, 5), slice(0, 61, 6))),
    ],
)
def test_block_means_equal_numpy_reshaped_means(shape, box) -> None:
    a = np.random.default_rng(0).random(shape)
    got = gn._blocks(a, box)
    (y, sy, ny), (x, sx, nx) = ((b.start, b.step, (b.stop - b.start) // b.step) for b in box)
    expected = a[y : y + ny * sy, x : x + nx * sx].reshape(ny, sy, nx, sx).mean(axis=(1, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_half_maximum_region_moments_equal_centred_moments(seed) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, 2)
    region = (rng.random((h, w)) < rng.uniform(0.05, 0.9)).astype(np.float64)
    region[rng.integers(h), rng.integers(w)] = 1.0  # never empty
    row, col = (int(v) for v in rng.integers(0, 900, 2))
    mean, cov = fg._region_moments_2d(region, row, col)
    _, mean_ref, cov_ref = fg._moments(region, [row + np.arange(h * 1.0), col + np.arange(w * 1.0)])
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-13)
    np.testing.assert_allclose(cov, cov_ref, rtol=1e-9, atol=1e-9 * max(h, w) ** 2)


class _Counts:
    """Normal equations built and model evaluations of the 2-D iterations run while it is
    installed (:func:`_count_steps`)."""

    def __init__(self) -> None:
        self.normal: list[bool] = []  # fit_floor of each build
        self.evaluations = 0


def _count_steps(path: str, monkeypatch: pytest.MonkeyPatch) -> _Counts:
    """Runs the fit on ``path`` ("numpy" or "compiled") and counts its steps there."""
    counts = _Counts()
    if path == "numpy":
        monkeypatch.setenv(kernels.JIT_ENV, "0")
        normal_equations, eta = gn._Grid.normal_equations, gn._Grid.eta

        def counted_normal(self: gn._Grid, w: np.ndarray, fit_floor: bool):
            counts.normal.append(fit_floor)
            return normal_equations(self, w, fit_floor)

        def counted_eta(self: gn._Grid, c: np.ndarray) -> np.ndarray:
            counts.evaluations += 1
            return eta(self, c)

        monkeypatch.setattr(gn._Grid, "normal_equations", counted_normal)
        monkeypatch.setattr(gn._Grid, "eta", counted_eta)
        return counts
    monkeypatch.delenv(kernels.JIT_ENV, raising=False)
    real = kernels.compiled()
    assert real is not None, "numba is a dependency: the compiled kernels must load"

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def levenberg_marquardt(self, *args: object) -> tuple:
            out = real.levenberg_marquardt(*args)
            counts.normal += [bool(args[5])] * out[6]
            counts.evaluations += out[7]
            return out

    monkeypatch.setattr(kernels, "compiled", Counting)
    return counts


PATHS = ["numpy", "compiled"]


def _lm_case(seed: int) -> tuple[gn._Grid, np.ndarray, float, np.ndarray]:
    """A noisy cut or rotated Gaussian on a floor, as fit_floor_gaussian sets it up."""
    rng = np.random.default_rng(seed)
    shape = (64, 64)
    cov = rotated_cov(rng.uniform(4, 9), rng.uniform(4, 9), rng.uniform(0, math.pi))
    mean = rng.uniform(5, 59, 2)
    a = gaussian_map(shape, mean, cov) + 0.02 + half_normal_floor(shape, 0.02, seed)
    grid, _, _ = gn._grid_of(tuple((0.0, 1, n) for n in shape))
    floor = 0.04
    start = gn._log_linear(grid, a, floor)
    assert start is not None
    return grid, a, floor, start


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(8))
def test_the_iteration_stops_within_a_hundredth_of_a_standard_error(
    seed, path, monkeypatch
) -> None:
    grid, a, floor, start = _lm_case(seed)
    counts = _count_steps(path, monkeypatch)
    eps = gn._STEP_SE
    b, coef, converged, cost, _ = gn._levenberg_marquardt(grid, a, floor, start, True, gn._TOL)
    assert converged
    monkeypatch.setattr(gn, "_STEP_SE", 1e-9)  # converge to rounding instead
    b_opt, coef_opt, _, cost_opt, _ = gn._levenberg_marquardt(grid, a, floor, start, True, gn._TOL)
    assert counts.evaluations > 0  # on the path named
    assert cost >= cost_opt * (1 - 1e-12)
    # Distance in standard errors: parameter covariance sigma^2 (J^T J)^-1 at the optimum.
    w = grid.weights()
    np.exp(grid.eta(coef_opt), out=w[gn._G])
    np.subtract(a, w[gn._G] + b_opt, out=w[gn._R])
    normal, _ = grid.normal_equations(w, True)
    sigma2 = cost_opt / (grid.size - len(coef) - 1)
    delta = np.concatenate([[b - b_opt], coef - coef_opt])
    distance = math.sqrt(float(delta @ normal @ delta) / sigma2)
    assert distance <= 2 * eps
    # ... and the stop is not vacuous: the start is many standard errors away.
    delta0 = np.concatenate([[floor - b_opt], start - coef_opt])
    assert math.sqrt(float(delta0 @ normal @ delta0) / sigma2) > 100 * eps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(8))
def test_the_iteration_needs_three_evaluations_from_the_log_linear_start(seed, path, monkeypatch):
    # The start, one step, one confirming step. Marquardt's classic damping (1e-3 of the
    # diagonal) needs 4-5 here: it holds back the ill-conditioned monomial directions.
    grid, a, floor, start = _lm_case(seed)
    counts = _count_steps(path, monkeypatch)
    assert gn._levenberg_marquardt(grid, a, floor, start, True, gn._TOL) is not None
    assert 2 <= counts.evaluations <= 3


def test_the_damping_does_not_oscillate_on_maps_that_are_no_gaussian() -> None:
    # A ring fitted as a Gaussian has a long curved valley. Damping that jumps 10x down after
    # every success and 10x up after every failure oscillates there until the iteration cap
    # (11 of these 40 maps did not converge); Nielsen's gain-ratio update converges on all.
    failed = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        y, x = np.mgrid[:h, :w]
        ring = np.exp(-0.5 * (np.hypot(y - h / 2, x - w / 2) - min(h, w) / 4) ** 2 / 4)
        floor = (0.0, 0.01, 0.05, 0.2)[(seed // 4) % 4]
        noise = (0.0, 0.005, 0.02, 0.05)[seed % 4] * rng.normal(0, 1, (h, w))
        fit = fg.fit_gaussian(ring + floor + noise)
        if not fit.converged:
            failed.append((seed, fit.message))
    assert failed == []


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_a_noiseless_gaussian_on_a_floor_stops_once_exact(seed, path, monkeypatch) -> None:
    # From a floor a little off (what the far pixels' median gives: their Gaussian tails), the
    # log-linear start is one step from the optimum, and that step leaves residuals ~1e-14 of
    # the peak: the fit stops there, exact to ~1e-13, without a confirming step.
    rng = np.random.default_rng(seed)
    shape = (64, 64)
    cov = rotated_cov(rng.uniform(3, 7), rng.uniform(3, 7), rng.uniform(0, math.pi))
    mean = rng.uniform(24, 40, 2)
    floor = rng.uniform(0.001, 0.2)
    a = gaussian_map(shape, mean, cov) + floor
    counts = _count_steps(path, monkeypatch)
    start_floor = floor + 1e-9
    fit = gn.fit_floor_gaussian(a, mean + 0.3, cov * 1.2, start_floor, 1.0 - floor)
    assert fit is not None and fit.converged
    assert counts.normal == [True]
    np.testing.assert_allclose(fit.cov, cov, rtol=1e-12, atol=1e-12 * float(np.max(cov)))
    np.testing.assert_allclose(fit.mean, mean, rtol=1e-13)
    assert fit.floor == pytest.approx(floor, abs=1e-13)
    # ... and the same map with noise far below the peak still iterates to its optimum.
    noisy = a + rng.normal(0.0, 1e-9, shape)
    fit = gn.fit_floor_gaussian(noisy, mean + 0.3, cov * 1.2, start_floor, 1.0 - floor)
    assert fit is not None and fit.converged
    np.testing.assert_allclose(fit.cov, cov, rtol=1e-7)

"""The compiled kernels of the 2-D fit (``erf_callback.fit._compiled``) against the numpy
path they replace, kernel by kernel and through ``fit_gaussian``; and the fallback to numpy
where numba is missing, fails or is turned off."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest

import erf_callback.fit
from erf_callback import fit_gaussian
from erf_callback.fit import gauss_newton as gn
from erf_callback.fit import gaussian as fg
from erf_callback.fit import kernels
from tests.helpers.maps import gaussian_map, half_normal_floor, rotated_cov


@pytest.fixture
def jit(monkeypatch):
    monkeypatch.delenv(kernels.JIT_ENV, raising=False)
    module = kernels.compiled()
    assert module is not None, "numba is a dependency: the compiled kernels must load"
    return module


def _fit(a: np.ndarray, path: str, monkeypatch: pytest.MonkeyPatch):
    if path == "numpy":
        monkeypatch.setenv(kernels.JIT_ENV, "0")
    else:
        monkeypatch.delenv(kernels.JIT_ENV, raising=False)
    return fit_gaussian(a)


def _maps() -> list[tuple[str, bool, np.ndarray]]:
    """(name, noisy, map): clean, floored and noisy Gaussians, centred, cut on a side, cut at
    a corner, wider than the map, rotated, narrow, on square, oblong and large maps."""
    out = []
    rng = np.random.default_rng(7)
    for shape in ((64, 64), (37, 90), (9, 5), (250, 180)):
        h, w = shape
        m = min(shape)
        placements = {
            "centred": ((h / 2 + 0.3, w / 2 - 0.4), rotated_cov(m / 8, m / 11, 0.0)),
            "cut side": ((h / 2, w - 1 - 0.3 * m / 6), rotated_cov(m / 6, m / 6, 0.0)),
            "corner rotated": ((0.1 * m, 0.12 * m), rotated_cov(m / 7, m / 11, 0.5)),
            "wider": (((h - 1) / 2, (w - 1) / 2), rotated_cov(h / 3, w / 3, 0.3)),
            "narrow": ((h / 2, w / 3), rotated_cov(0.6, 0.45, 1.0)),
        }
        for place, (mean, cov) in placements.items():
            g = gaussian_map(shape, mean, cov)
            tag = f"{h}x{w} {place}"
            out.append((f"{tag} floor", False, g + 0.013))
            out.append((f"{tag} |noise|", True, g + half_normal_floor(shape, 0.01, len(out))))
            out.append((f"{tag} noise", True, g + 0.02 + rng.normal(0.0, 0.01, shape)))
    return out


_MAPS = _maps()


@pytest.mark.parametrize(("name", "noisy", "a"), _MAPS, ids=[m[0] for m in _MAPS])
def test_the_compiled_fit_gives_the_numpy_fit(name, noisy, a, monkeypatch) -> None:
    # Noiseless maps: the same optimum to rounding. Noisy maps: the iteration may stop one
    # step apart (its stop is a hundredth of a standard error), far below the noise's effect.
    ref = _fit(a, "numpy", monkeypatch)
    got = _fit(a, "compiled", monkeypatch)
    assert got.ok == ref.ok and got.method == ref.method and got.message == ref.message
    tol = 1e-4 if noisy else 1e-9
    scale = float(np.max(np.diag(ref.cov)))
    assert np.max(np.abs(got.cov - ref.cov)) <= tol * scale
    assert np.max(np.abs(got.mean - ref.mean)) <= tol * math.sqrt(scale)
    assert got.floor == pytest.approx(ref.floor, rel=tol, abs=tol * ref.amplitude)


def test_every_kernel_runs_on_maps_as_users_pass_them(jit, monkeypatch) -> None:
    # Read-only, transposed, strided, float32 and torch maps are made contiguous float64 at
    # the kernels' door: each kernel keeps the one signature it was compiled for at start
    # (a second one would be a multi-second compile in the middle of a fit).
    base = gaussian_map((48, 70), (20.0, 33.0), rotated_cov(6.0, 4.0, 0.4))
    base = base + half_normal_floor(base.shape, 0.01, 3)
    ro = base.copy()
    ro.flags.writeable = False
    maps = [ro, base.T, np.asfortranarray(base), base[::2, ::3], base.astype(np.float32)]
    for a in maps:
        ref = _fit(np.ascontiguousarray(a, dtype=np.float64), "numpy", monkeypatch)
        got = _fit(a, "compiled", monkeypatch)
        np.testing.assert_allclose(got.cov, ref.cov, rtol=1e-4)
    for window in (3, 4, 5):  # integers where floats are expected
        _fit(base, "compiled", monkeypatch)
        assert fit_gaussian(base, window=window).ok
    for name in ("levenberg_marquardt", "log_linear", "region_sums", "far_values", "clipped_stats"):
        assert len(getattr(jit, name).signatures) == 1, name


def test_evaluate_is_the_exponential_of_the_quadratic(jit) -> None:
    # Factored (one exponential per row and column, a product along rows restarted every 64
    # columns) below sum |c| = 700; direct with the exponent capped at 700 above.
    rng = np.random.default_rng(0)
    uy, ux = np.linspace(-1.0, 1.0, 23), np.linspace(-1.0, 1.0, 301)
    uy.flags.writeable = ux.flags.writeable = False  # as the fit's grid passes them
    target = rng.random((23, 301))
    for c in (
        np.array([0.2, 0.5, -0.3, -3.0, 2.5, -4.0]),
        np.array([1.0, 30.0, -20.0, -200.0, 150.0, -250.0]),
        np.array([400.0, 300.0, 10.0, 5.0, 0.0, 1.0]),  # sum 716: direct, capped
    ):
        g, r = np.empty_like(target), np.empty_like(target)
        y, x = uy[:, None], ux[None, :]
        eta = np.minimum(
            c[0] + c[1] * y + c[2] * x + c[3] * y * y + c[4] * y * x + c[5] * x * x, 700.0
        )
        ref = np.exp(eta)
        with np.errstate(over="ignore"):  # the capped case's cost overflows, as the kernel's
            cost = jit.evaluate(uy, ux, target, 0.1, c, g, r)
            ref_cost = float(np.sum((target - 0.1 - ref) ** 2))
        # Both exponents carry rounding ~ sum |c| units; the product along a row ~ 64 more.
        allowed = 2.2e-16 * (4.0 * float(np.sum(np.abs(c))) + 64.0)
        assert float(np.max(np.abs(np.log(g) - eta))) <= allowed
        np.testing.assert_allclose(r, target - 0.1 - ref, rtol=1e-12, atol=1e-13 * ref.max())
        assert cost == pytest.approx(ref_cost, rel=1e-12)


@pytest.mark.parametrize("fit_floor", [True, False])
def test_normal_equations_are_the_numpy_ones(jit, fit_floor) -> None:
    grid, _, _ = gn._grid_of(((2.0, 1, 31), (0.5, 2, 44)))
    rng = np.random.default_rng(1)
    w = grid.weights()
    w[gn._G] = rng.random(grid.shape)
    w[gn._R] = rng.normal(0.0, 1.0, grid.shape)
    ref_normal, ref_grad = grid.normal_equations(w, fit_floor)
    n = 7 if fit_floor else 6
    normal, grad = np.empty((n, n)), np.empty(n)
    jit.normal_equations(*grid.coords, w[gn._G], w[gn._R], fit_floor, normal, grad)
    np.testing.assert_allclose(normal, ref_normal, rtol=1e-12, atol=1e-12 * ref_normal.max())
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12 * np.abs(ref_grad).max())


def test_the_log_linear_start_is_the_numpy_one(jit, monkeypatch) -> None:
    grid, _, _ = gn._grid_of(((0.0, 1, 40), (0.0, 1, 52)))
    a = gaussian_map((40, 52), (17.0, 30.0), rotated_cov(5.0, 3.0, 0.7)) * 2.0 + 0.05
    monkeypatch.setenv(kernels.JIT_ENV, "0")
    ref = gn._log_linear(grid, a, 0.05)
    monkeypatch.delenv(kernels.JIT_ENV)
    got = gn._log_linear(grid, a, 0.05)
    assert ref is not None and got is not None
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_a_start_from_two_columns_is_refused_on_both_paths(monkeypatch) -> None:
    # A Gaussian whose centre lies past the map's edge: the pixels above a tenth of its
    # visible peak span two columns of the fit's box, where a quadratic along x is free up to
    # (x - x1)(x - x2): a singular system. Both implementations "solved" it, each with its own
    # rounding; the compiled one got a bump and the fit came out 4.6x off. Refused, the fit
    # starts from the half-maximum moments on both paths and recovers the Gaussian.
    cov = np.array([[12.227, -2.966], [-2.966, 14.256]])
    mean = (40.0435452, 96.92368651)
    a = gaussian_map((136, 81), mean, cov) + 0.0137979
    for path in ("numpy", "compiled"):
        fit = _fit(a, path, monkeypatch)
        np.testing.assert_allclose(fit.cov, cov, rtol=1e-6)
        np.testing.assert_allclose(fit.mean, mean, rtol=1e-8)


def test_the_half_maximum_region_is_the_numpy_one(jit, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        shape = tuple(int(n) for n in rng.integers(3, 90, 2))
        mean = rng.uniform(-5, 1.1 * max(shape), 2)
        a = gaussian_map(shape, mean, rotated_cov(*rng.uniform(0.5, 20, 2), rng.uniform(0, 3)))
        a = a + rng.uniform(0, 0.05) * rng.random(shape)
        low, peak = float(a.min()), float(a.max())
        coords = [np.arange(n, dtype=np.float64) for n in shape]
        monkeypatch.setenv(kernels.JIT_ENV, "0")
        ref = fg._half_max_init(a, coords, low, peak)
        monkeypatch.delenv(kernels.JIT_ENV)
        got = fg._half_max_init(a, coords, low, peak)
        assert ref is not None and got is not None
        # Sums of small integers: exact on both paths, so bit for bit.
        assert got[0].tolist() == ref[0].tolist() and got[1].tolist() == ref[1].tolist()


def test_the_far_floor_is_the_numpy_one(jit, monkeypatch) -> None:
    # The same far pixels (the distance computed in the same order), their median exactly and
    # their clipped mean to rounding; at window radius 5 and, where the ERF fills the map, at
    # the nearer radii with the Gaussian's tail taken off.
    rng = np.random.default_rng(3)
    for sigma in (3.0, 9.0, 20.0, 35.0):
        shape = (60, 75)
        mean = np.array([31.0, 36.5])
        cov = rotated_cov(sigma, 0.8 * sigma, 0.3)
        a = gaussian_map(shape, mean, cov) + 0.01 + rng.normal(0.0, 0.004, shape)
        idx, vals = fg._subsample(a, fg._CHECK_SAMPLE)
        prec = np.linalg.inv(cov)
        monkeypatch.setenv(kernels.JIT_ENV, "0")
        ref = fg._far_floor(idx, vals, mean, prec, 5.0, 1.0)
        monkeypatch.delenv(kernels.JIT_ENV)
        got = fg._far_floor(idx, vals, mean, prec, 5.0, 1.0)
        assert got[2] == ref[2] and got[3] == ref[3]
        assert got[0] == pytest.approx(ref[0], rel=1e-12, abs=1e-15)
        assert got[1] == pytest.approx(ref[1], rel=1e-12)


def test_clipped_stats_are_the_numpy_ones(jit) -> None:
    # Odd and even counts, a point mass at the minimum (noise clipped at zero: the quartile
    # spread), a constant (spread 0) and outliers beyond 5 spreads.
    rng = np.random.default_rng(4)
    cases = [
        rng.normal(1.0, 0.1, 501),
        rng.normal(1.0, 0.1, 500),
        np.maximum(rng.normal(0.0, 1.0, 800), 0.0),
        np.full(40, 0.25),
        np.concatenate([rng.normal(0.0, 1.0, 300), [50.0, -40.0, 90.0]]),
    ]
    # ... and many small draws with ties, where a quickselect's partition goes wrong first.
    cases += [rng.integers(0, 4, int(n)).astype(np.float64) for n in rng.integers(1, 40, 200)]
    for values in cases:
        ref = fg._clipped_stats(values.copy())
        got = jit.clipped_stats(values.copy())
        assert got[2] == ref[2] and got[3] == ref[3]
        assert got[0] == pytest.approx(ref[0], rel=1e-13, abs=1e-15)
        assert got[1] == ref[1]


def test_without_numba_the_fit_runs_on_numpy(monkeypatch, caplog) -> None:
    a = gaussian_map((40, 40), (20.0, 21.0), np.diag([16.0, 9.0])) + half_normal_floor(
        (40, 40), 0.01, 0
    )
    with_jit = _fit(a, "compiled", monkeypatch)
    monkeypatch.setattr(kernels, "_loaded", kernels._UNTRIED)
    monkeypatch.delitem(sys.modules, "erf_callback.fit._compiled", raising=False)
    monkeypatch.delattr(erf_callback.fit, "_compiled", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    with caplog.at_level(logging.DEBUG, logger=kernels.__name__):
        assert kernels.compiled() is None
        fit = fit_gaussian(a)
    assert "numba is not installed" in caplog.text
    np.testing.assert_allclose(fit.cov, with_jit.cov, rtol=1e-4)


def test_a_kernel_that_fails_to_compile_leaves_the_fit_on_numpy(monkeypatch, caplog) -> None:
    def broken(module: object) -> None:
        raise RuntimeError("cannot cache function 'evaluate': no locator available")

    monkeypatch.delenv(kernels.JIT_ENV, raising=False)
    monkeypatch.setattr(kernels, "_loaded", kernels._UNTRIED)
    monkeypatch.setattr(kernels, "_warm_up", broken)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.compiled() is None
        assert kernels.compiled() is None  # tried once, warned once
    warned = [r for r in caplog.records if r.name == kernels.__name__]
    assert len(warned) == 1 and "no locator available" in warned[0].getMessage()
    assert "using numpy" in warned[0].getMessage()
    assert fit_gaussian(gaussian_map((30, 30), (15.0, 15.0), np.eye(2) * 9.0) + 0.1).ok


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_environment_variable_turns_the_kernels_off(value, monkeypatch) -> None:
    monkeypatch.setenv(kernels.JIT_ENV, value)
    assert kernels.compiled() is None
    monkeypatch.setenv(kernels.JIT_ENV, "1")
    assert kernels.compiled() is not None

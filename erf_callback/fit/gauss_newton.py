"""Levenberg-Marquardt fit of ``floor + amplitude * Gaussian`` on a strided window of a map.

The model is written as ``floor + exp(eta(x))`` with ``eta`` a quadratic polynomial in the
pixel coordinates: ``eta = c0 + sum_i c_i x_i + sum_{i<=j} c_ij x_i x_j``. The model is linear
in the polynomial's coefficients inside the exponential, so the Jacobian is
``[1, g * features]`` with a feature matrix fixed once per window (``g = exp(eta)``): each
iteration costs one mat-vec, one ``exp`` and one small ``J^T J``. The Gaussian's mean,
covariance and amplitude follow from the coefficients in closed form.

Only the pixels of a box around the current estimate (``±box`` sigma, clipped to the map) are
used, taken with a stride that keeps at most about ``points`` of them. Point samples of a
Gaussian are still point samples of that Gaussian, so the stride costs statistical efficiency
(noise), never exactness: a clean Gaussian is recovered to rounding, however the image edge
cuts it, because the model fits only the pixels that exist.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from erf_callback.fit import kernels
from erf_callback.fit.grid import bounding_box, determinant, sum_of_products

__all__ = ["GaussianModelFit", "fit_floor_gaussian"]

# Box half-width in sigmas: a Gaussian is below exp(-12.5) ~ 4e-6 of its peak there, and the
# box holds ~100 sigma^2 of pixels per ~6 sigma^2 of Gaussian, enough to pin the floor.
_BOX_SIGMAS = 5.0
# Pixels per fit: about this many (strided); more adds time, not accuracy, on smooth ERFs.
_POINTS = 6400
# Blocks per binned fit, per number of axes: block means lose almost nothing while a block is
# small against the Gaussian (in 2-D, 40 per axis of the 10-sigma box: at most ~sigma / 4, a
# model error of ~(1/4)^4 / 120 = 3e-5 of the variance), and the fit costs a quarter of the
# full-density one. In 3-D, 1600 blocks were 12 per axis (~0.85 sigma): a noisy 26 x 17 x 19
# map came out 3.7% off where the maximum-likelihood fit is 0.8%; 8000 (20 per axis) gives
# 0.7% there, for ~10% more time.
_BLOCKS = {1: 1600, 2: 1600, 3: 8000}
# Rounds of box growth (one for a good seed; a narrow seed needs two).
_ROUNDS = 3
# The log-linear start uses the pixels above this fraction of the peak.
_LOG_LEVEL = 0.1
# Its normal equations are singular when those pixels span fewer than 3 values along an axis
# (a quadratic through 2 columns is free up to (x - x1)(x - x2)); a Cholesky pivot at most
# this share of its diagonal entry is such a system's rounding, and the start is refused
# (both implementations got a different "solution" there; one was a bump, 4.6x off).
_PIVOT_MIN = 1e-12
# Iteration cap of the Levenberg-Marquardt fit (fit_gaussian names it when it is reached).
MODEL_MAX_ITER = 60
# Relative cost change and step size below which the iteration has converged.
_TOL = 1e-12
# A root-mean-square residual at most this (the values scaled to a peak of 1) is an exact fit:
# a few hundred units of rounding, parameters right to ~1e-13.
_EXACT_RMS = 1e-13
# ... or when its next step would move the parameters by less than this many standard errors.
_STEP_SE = 1e-2


@dataclass(frozen=True)
class GaussianModelFit:
    """Result of :func:`fit_floor_gaussian` (pixel coordinates in the map's axis order)."""

    mean: np.ndarray
    cov: np.ndarray
    floor: float
    amplitude: float
    converged: bool
    residual: float  # residual sum of squares over total sum of squares, on the fitted pixels
    point_samples: bool = True  # fitted on single pixels (exact model), not block means
    # Fitted on every pixel of the map, one by one: the amplitude that is least squares given
    # the floor and the Gaussian's shape, and the R^2 of the model with it, on the whole map
    # (what GaussianFit reports, from the fit's last evaluation); else None.
    on_map: tuple[float, float] | None = None


def fit_floor_gaussian(
    a: np.ndarray,
    mean: np.ndarray,
    cov: np.ndarray,
    floor: float,
    amplitude: float,
    *,
    fit_floor: bool = True,
    points: int | None = None,
    binned: bool = False,
) -> GaussianModelFit | None:
    """Least-squares ``floor + amplitude * exp(-(x - mean)^T cov^-1 (x - mean) / 2)``.

    Args:
        a: the map (float64, 1-3 axes).
        mean, cov, floor, amplitude: the starting point (e.g. robust moments).
        fit_floor: fit the floor (else it stays at ``floor``).
        points: about how many pixels (strided) or blocks (binned) one fit uses.
        binned: average ``s x s`` blocks instead of taking every ``s``-th pixel. Blocks keep
            all the data (noise averages out as on the full map) at the price of a model
            that is exact only to ~(s / sigma)^4 / 120 (the block mean of a Gaussian is the
            Gaussian widened by (s^2 - 1) / 12, which is removed, plus a tiny kurtosis):
            the choice for noisy maps; point samples (the default) for exactness.

    Returns:
        The fit, or ``None`` when the iteration cannot produce a Gaussian (the quadratic
        never becomes negative definite, or non-finite values).

    Example:
        >>> y, x = np.mgrid[:40, :40]
        >>> g = 0.1 + 2.0 * np.exp(-((y - 3.0) ** 2 / 18 + (x - 20.0) ** 2 / 50))
        >>> fit = fit_floor_gaussian(g, np.array([6.0, 19.0]), np.diag([4.0, 20.0]), 0.0, 1.0)
        >>> np.round(np.sqrt(np.diag(fit.cov)), 6).tolist(), round(fit.floor, 6)
        ([3.0, 5.0], 0.1)
    """
    d = a.ndim
    if points is None:
        points = _BLOCKS[d] if binned else _POINTS
    scale = max(abs(amplitude), float(a.max()), -float(a.min()), 1e-300)
    result: GaussianModelFit | None = None
    used: tuple[slice, ...] | None = None
    # Rounds while the box grows: a seed narrowed by a cut or by noise gives a box too small
    # for the Gaussian the fit finds; the next round refits on the box of that Gaussian.
    for _ in range(_ROUNDS):
        # Binned fits bin only boxes too large to fit pixel by pixel.
        box = _box(a.shape, mean, cov, points, _POINTS if binned else 0)
        if used is not None and _covers(used, box):
            break
        used = box
        blocked = binned and any(sl.step > 1 for sl in box)
        if blocked:
            values = _blocks(a, box)
            axes = tuple(
                (sl.start + (sl.step - 1) / 2.0, sl.step, n)
                for sl, n in zip(box, values.shape, strict=True)
            )
        else:
            values = a[box]
            axes = tuple((sl.start, sl.step, n) for sl, n in zip(box, values.shape, strict=True))
        grid, centre, half = _grid_of(axes)
        target = values / scale
        fitted = None
        for c0 in _starts(
            grid,
            target,
            floor / scale,
            (mean - centre) / half,
            cov / np.outer(half, half),
            amplitude / scale,
        ):
            solved = _levenberg_marquardt(grid, target, floor / scale, c0, fit_floor, _TOL)
            gauss = None if solved is None else _gaussian(solved[1], d)
            if solved is not None and gauss is not None:
                fitted = solved, gauss
                break
        if fitted is None:
            return result
        (b, _, converged, rss, w), gauss = fitted
        mu_n, cov_n, amp_n = gauss
        mean = centre + half * mu_n
        cov_w = cov_n * np.outer(half, half)
        cov, peak = cov_w, 1.0
        if blocked:
            # Block means see the Gaussian widened by the block's own variance: take it off.
            cov = cov_w - np.diag([(sl.step**2 - 1) / 12.0 for sl in box])
            det, det_w = _det_if_positive_definite(cov), _det_if_positive_definite(cov_w)
            if det is None or det_w is None:
                return result
            peak = math.sqrt(det_w / det)
        floor, amplitude = float(b * scale), float(amp_n * scale * peak)
        total = float(target.sum())
        tss = sum_of_products(target, target) - total * total / target.size
        whole = not blocked and all(
            sl.step == 1 and sl.stop - sl.start == n for sl, n in zip(box, a.shape, strict=True)
        )
        result = GaussianModelFit(
            mean,
            cov,
            floor,
            amplitude,
            converged,
            rss / tss if tss > 0 else 0.0,
            not blocked,
            _on_map(w, amplitude, rss, tss) if whole else None,
        )
    return result


def _on_map(w: np.ndarray, amplitude: float, rss: float, tss: float) -> tuple[float, float] | None:
    """``(amplitude, R^2)`` with the amplitude that is least squares given the floor and the
    Gaussian's shape, from the last evaluation's weights ``w`` (``amplitude``, ``rss``,
    ``tss``: the fit's own, the latter two in its scaled units). At that amplitude the sum
    of squares is lower by ``(sum r g)^2 / sum g^2`` (r: the residual, g: the Gaussian)."""
    g = w[_G]
    rg, gg = sum_of_products(w[_R], g), sum_of_products(g, g)
    if not (gg > 0 and tss > 0):
        return None
    return amplitude * (1.0 + rg / gg), 1.0 - (rss - rg * rg / gg) / tss


def _starts(
    grid: _Grid,
    target: np.ndarray,
    floor: float,
    mean: np.ndarray,
    cov: np.ndarray,
    amplitude: float,
) -> Iterator[np.ndarray]:
    """Starting coefficients for the iteration, best first (all in the grid's units).

    The log-linear fit (exact on clean maps, one or two iterations from the optimum
    otherwise), then the given ``mean, cov, amplitude``. The second is for the iteration that
    ends on a quadratic that is no bump: on a noisy map whose ERF covers few pixels, noise
    pixels above the log-linear level can widen that start too much (a Gaussian 19 x 1.7 px
    under 4% noise gave sigma_y 10.2 for 19, from the windowed moments that stood in).
    """
    c0 = _log_linear(grid, target, floor)
    if c0 is not None and _gaussian(c0, grid.d) is not None:
        yield c0
    c0 = _coefficients(mean, cov, amplitude)
    if c0 is not None:
        yield c0


def _blocks(a: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Block means of ``a`` over ``box`` (blocks of ``step`` pixels per axis; a ragged end is
    dropped); block ``k`` of an axis is centred at ``start + (step - 1) / 2 + k step``."""
    whole = tuple(slice(b.start, b.start + (b.stop - b.start) // b.step * b.step) for b in box)
    sub = a[whole]
    if a.ndim == 2 and sub.size <= _BLOCK_PRODUCT_MAX:
        # Averaging matrices on both sides: 2-3x faster than a mean over the strided block
        # axes (whose inner loops are a few pixels long).
        (ry, sy), (rx, sx) = ((n // b.step, b.step) for b, n in zip(box, sub.shape, strict=True))
        return _block_average(ry, sy) @ sub @ _block_average(rx, sx).T
    shape: list[int] = []
    for b, n in zip(box, sub.shape, strict=True):
        shape += [n // b.step, b.step]
    return sub.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)))


# Larger boxes are block-averaged by reshaping: the averaging products grow as pixels x blocks
# per axis and would hand large matrices to a multithreaded BLAS.
_BLOCK_PRODUCT_MAX = 1 << 17


@functools.lru_cache(maxsize=32)
def _block_average(blocks: int, step: int) -> np.ndarray:
    """``(blocks, blocks * step)`` matrix whose row ``k`` averages entries ``[k step, (k + 1)
    step)`` (cached, read-only)."""
    out = np.kron(np.eye(blocks), np.full((1, step), 1.0 / step))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _grid_of(axes: tuple[tuple[float, int, int], ...]) -> tuple[_Grid, np.ndarray, np.ndarray]:
    """The fit's grid for coordinates ``first + step * k`` (``k < count``) per axis, scaled to
    [-1, 1], with the centre and half-width of that scaling.

    Cached: a callback probes maps of one shape again and again, and so does the fit's box
    (the whole map when it is small). A :class:`_Grid` is never modified after it is made.
    """
    coords = [first + step * np.arange(n, dtype=np.float64) for first, step, n in axes]
    ends = [(c[0], c[-1]) for c in (v.tolist() for v in coords)]
    centre = np.array([(lo + hi) / 2 for lo, hi in ends])
    half = np.array([max((hi - lo) / 2, 1.0) for lo, hi in ends])
    grid = _Grid(
        [(c - m) / h for c, m, h in zip(coords, centre.tolist(), half.tolist(), strict=True)]
    )
    centre.flags.writeable = half.flags.writeable = False
    return grid, centre, half


def _log_linear(grid: _Grid, target: np.ndarray, floor: float) -> np.ndarray | None:
    """Coefficients from weighted least squares of ``log(map - floor)`` on the monomials.

    Over the pixels above a tenth of the peak (where noise barely moves the logarithm), with
    weights ``(map - floor)^2`` (Caruana's estimator): one linear solve, exact on a clean
    Gaussian however it is cut, and a start one or two iterations from the optimum otherwise.
    """
    jit = kernels.compiled() if grid.d == 2 else None
    if jit is not None:
        coef = np.empty(6)
        target = kernels.contiguous(target)
        ok = jit.log_linear(*grid.coords, target, float(floor), _LOG_LEVEL, _PIVOT_MIN, coef)
        return coef if ok else None
    top = float(target.max()) - floor
    if not top > 0:
        return None
    # Only the bounding box of the pixels used is read (a few hundred of the map's pixels
    # for a compact ERF): the others have weight 0.
    used = target > floor + _LOG_LEVEL * top
    box = bounding_box(used)
    v = target[box] - floor
    used = used[box]
    w = np.zeros((2, *v.shape))
    np.multiply(v, v, out=w[0], where=used)
    np.log(v, out=w[1], where=used)
    w[1] *= w[0]
    return _solve_spd(*_split(grid.moments(w, box).take(_log_linear_index(grid.d))), _PIVOT_MIN)


def _split(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A gathered system (``k^2 + k`` entries) as its ``k x k`` matrix and right-hand side."""
    k = round(math.sqrt(len(flat) + 0.25) - 0.5)
    return flat[: k * k].reshape(k, k), flat[k * k :]


def _det_if_positive_definite(m: np.ndarray) -> float | None:
    """The determinant of a symmetric ``m``, or None when ``m`` is not positive definite."""
    if m.shape == (2, 2):  # Sylvester's criterion: both leading minors positive
        det = determinant(m)
        return det if m[0, 0] > 0 and det > 0 else None
    if not np.all(np.linalg.eigvalsh(m) > 0):
        return None
    return determinant(m)


def _solve_spd(a: np.ndarray, b: np.ndarray, pivot_min: float) -> np.ndarray | None:
    """Solve ``a x = b`` for a small symmetric positive definite ``a``; None when it is not
    (a pivot at most ``pivot_min`` times its diagonal entry) or the solution is not finite.

    Cholesky on Python floats, which is also the positive-definiteness test: one pass where
    numpy.linalg needs two calls (``cholesky`` to test, ``solve`` to solve), each with more
    call overhead than these 4-10 unknowns cost to factorise.
    """
    n = len(b)
    rows = a.tolist()
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        row, li = rows[i], low[i]
        for j in range(i + 1):
            lj = low[j]
            s = row[j]
            for k in range(j):
                s -= li[k] * lj[k]
            if i > j:
                li[j] = s / lj[j]
            elif s > pivot_min * row[i] and s > 0.0:
                li[i] = math.sqrt(s)
            else:
                return None
    x = b.tolist()
    for i in range(n):  # L y = b
        li = low[i]
        s = x[i]
        for k in range(i):
            s -= li[k] * x[k]
        x[i] = s / li[i]
    for i in range(n - 1, -1, -1):  # L^T x = y
        s = x[i]
        for k in range(i + 1, n):
            s -= low[k][i] * x[k]
        x[i] = s / low[i][i]
    return np.array(x) if math.isfinite(sum(x)) else None


def _predicted_drop(step: np.ndarray, grad: np.ndarray, lam: float, scale: np.ndarray) -> float:
    """Drop of the residual sum of squares that the linearised model predicts for ``step``,
    the solution of ``(J^T J + lam diag(scale)) step = J^T r``: ``step . J^T r + lam step^T
    diag(scale) step`` (from ``|r|^2 - |r - J step|^2``)."""
    st = step.tolist()
    return sum(s * g for s, g in zip(st, grad.tolist(), strict=True)) + lam * sum(
        c * s * s for c, s in zip(scale.tolist(), st, strict=True)
    )


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Solve ``a x = b``; None when ``a`` is singular or the solution is not finite.

    For the damped normal equations, positive definite by construction (a Gram matrix plus
    a positive diagonal), so no factorisation is spent on testing it.
    """
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return None
    return x if math.isfinite(sum(x.tolist())) else None


def _box(
    shape: tuple[int, ...], mean: np.ndarray, cov: np.ndarray, points: int, dense: int = 0
) -> tuple[slice, ...]:
    """The +-5 sigma box, clipped to the map, with a step that leaves about ``points``
    samples; single pixels (step 1) when the box has at most ``dense`` pixels."""
    d = len(shape)
    if math.prod(shape) <= max(points, dense):
        return tuple(slice(0, n, 1) for n in shape)
    per_axis = points ** (1.0 / d)
    bounds = []
    for m, var, n in zip(mean.tolist(), cov.diagonal().tolist(), shape, strict=True):
        h = _BOX_SIGMAS * math.sqrt(max(var, 0.25))
        lo = min(max(math.floor(m - h), 0), n - 1)
        bounds.append((lo, min(max(math.ceil(m + h) + 1, lo + 1), n)))
    if math.prod(hi - lo for lo, hi in bounds) <= dense:
        return tuple(slice(lo, hi, 1) for lo, hi in bounds)
    return tuple(slice(lo, hi, max(1, math.ceil((hi - lo) / per_axis))) for lo, hi in bounds)


def _covers(used: tuple[slice, ...], box: tuple[slice, ...]) -> bool:
    """Whether the box already fitted on spans (nearly) all of the box the fit now asks for."""
    for u, b in zip(used, box, strict=True):
        slack = 0.1 * (b.stop - b.start)
        if u.start > b.start + slack or u.stop < b.stop - slack:
            return False
    return True


def _pairs(d: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(d) for j in range(i, d)]


_POWERS = np.arange(5.0)


@functools.cache
def _monomial_index(d: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Where monomial a times monomial b, and monomial a alone, sit in the order-4 moment
    tensor of :meth:`_Grid.moments` (monomials ``1, u_i, u_i u_j (i <= j)``)."""
    exps = [(0,) * d]
    exps += [tuple(int(k == i) for k in range(d)) for i in range(d)]
    exps += [tuple(int(k == i) + int(k == j) for k in range(d)) for i, j in _pairs(d)]
    e = np.array(exps)
    pair = tuple((e[:, None, i] + e[None, :, i]) for i in range(d))
    single = tuple(e[:, i] for i in range(d))
    return pair, single


@functools.cache
def _log_linear_index(d: int) -> np.ndarray:
    """Flat indices into the ``(2, 5, ..., 5)`` moments of :func:`_log_linear`'s weights that
    give its normal matrix (row-major; ``sum w m_a m_b``) and right-hand side (``sum w log
    m_a``) in one ``take``."""
    pair, single = _monomial_index(d)
    shape = (2,) + (5,) * d
    index = np.concatenate(
        [
            np.ravel_multi_index((np.zeros(pair[0].shape, dtype=int), *pair), shape).ravel(),
            np.ravel_multi_index((np.ones(single[0].shape, dtype=int), *single), shape),
        ]
    )
    index.flags.writeable = False
    return index


# The slots of the weight buffer (:meth:`_Grid.weights`): g^2, r g, g and r.
_GG, _RG, _G, _R = range(4)


@functools.cache
def _gather_index(d: int, fit_floor: bool) -> np.ndarray:
    """Flat indices into the ``(4, 5, ..., 5)`` moments of the weight buffer that give the
    normal matrix (row-major) followed by the gradient ``J^T r`` in one ``take``.

    Parameters are ``[floor,] coefficients``: the floor's column is ``[N, sum g m_a]`` (``N``
    is set after the gather; its slot reads a placeholder) and its gradient ``sum r``.
    """
    pair, single = _monomial_index(d)
    shape = (4,) + (5,) * d
    k = len(single[0])

    def at(slot: int, powers: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.ravel_multi_index((np.full(powers[0].shape, slot), *powers), shape)

    gg, gm, rgm = at(_GG, pair), at(_G, single), at(_RG, single)
    if fit_floor:
        normal = np.empty((k + 1, k + 1), dtype=np.intp)
        normal[1:, 1:] = gg
        normal[0, 1:] = normal[1:, 0] = gm
        normal[0, 0] = 0
        r_sum = at(_R, tuple(np.zeros(1, dtype=int) for _ in range(d)))
        index = np.concatenate([normal.ravel(), r_sum, rgm])
    else:
        index = np.concatenate([gg.ravel(), rgm])
    index.flags.writeable = False
    return index


class _Grid:
    """The open grid of a strided box and what the fit needs of it.

    The monomials ``1, u_i, u_i u_j (i <= j)`` are never stored as N x k columns: sums of
    ``w * monomial * monomial`` are moments of ``w`` up to order 4, read off one tensor
    ``sum_x w(x) prod_i u_i^p_i`` (``p_i <= 4``) built by contracting one axis at a time with
    a small power table. That makes ``J^T J`` a few passes over the box instead of ``N k^2``.
    """

    def __init__(self, u: list[np.ndarray]) -> None:
        d = len(u)
        self.d = d
        self.coords = tuple(u)  # per axis, in [-1, 1]
        self.shape = tuple(len(v) for v in u)
        self.size = math.prod(self.shape)
        self.axes = [v.reshape([-1 if k == i else 1 for k in range(d)]) for i, v in enumerate(u)]
        self.powers = [v[:, None] ** _POWERS for v in u]
        if d == 2:
            # [1, y, y^2] and [1, x, x^2]^T: eta = rows @ C @ cols (see eta).
            self._rows = np.ascontiguousarray(self.powers[0][:, :3])
            self._cols = np.ascontiguousarray(self.powers[1][:, :3].T)
            self._rows.flags.writeable = self._cols.flags.writeable = False
        # Grids are shared through _grid_of's cache: nothing may write into one.
        for array in (*self.coords, *self.axes, *self.powers):
            array.flags.writeable = False

    def weights(self) -> np.ndarray:
        """A fresh ``(4, *shape)`` buffer for :meth:`normal_equations`: slots ``_GG, _RG,
        _G, _R`` (the model fills g and r, the normal equations the products)."""
        return np.empty((4, *self.shape))

    def eta(self, c: np.ndarray) -> np.ndarray:
        """``c . monomials`` at every grid point."""
        d, u = self.d, self.axes
        if d == 2:
            # [1, y, y^2] C [1, x, x^2]^T: two small matrix products (BLAS) in place of five
            # broadcast passes over the grid, 3x faster at 64 x 64.
            c0, c1, c2, c3, c4, c5 = c.tolist()
            quad = np.array([[c0, c2, c5], [c1, c4, 0.0], [c3, 0.0, 0.0]])
            return (self._rows @ quad) @ self._cols
        out = c[0] + sum(c[1 + i] * u[i] for i in range(d))
        for k, (i, j) in enumerate(_pairs(d)):
            out = out + c[1 + d + k] * (u[i] * u[j])
        return np.broadcast_to(out, self.shape).copy() if out.shape != self.shape else out

    def moments(self, w: np.ndarray, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """``sum_x w[b](x) prod_i u_i^p_i`` for each leading index b and ``p_i <= 4``.

        With ``box``, ``w`` covers only that box of the grid.
        """
        p = self.powers if box is None else [q[s] for q, s in zip(self.powers, box, strict=True)]
        if self.d == 1:
            return w @ p[0]
        if self.d == 2:
            return p[0].T @ w @ p[1]
        return np.einsum("bzyx,zi,yj,xk->bijk", w, *p, optimize=True)

    def normal_equations(self, w: np.ndarray, fit_floor: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(J^T J, J^T r)`` for the parameters ``[floor,] coefficients``.

        ``w`` is a :meth:`weights` buffer holding g and r; the products are written into it.
        The entries are moments of g^2, r g, g and r (``sum g^2 m_a m_b``, ``sum r g m_a``,
        ``sum g m_a``, ``sum r``), gathered in one ``take``.
        """
        np.multiply(w[_G], w[_G], out=w[_GG])
        np.multiply(w[_R], w[_G], out=w[_RG])
        normal, grad = _split(self.moments(w).take(_gather_index(self.d, fit_floor)))
        if fit_floor:
            normal[0, 0] = float(self.size)
        return normal, grad


def _coefficients(mean: np.ndarray, cov: np.ndarray, amplitude: float) -> np.ndarray | None:
    """Polynomial coefficients of ``log(amplitude) - (x - mean)^T cov^-1 (x - mean) / 2``."""
    d = len(mean)
    try:
        prec = np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        return None
    if not amplitude > 0 or not np.all(np.isfinite(prec)):
        return None
    lin = prec @ mean
    c0 = math.log(amplitude) - 0.5 * float(mean @ lin)
    quad = [-0.5 * prec[i, i] if i == j else -prec[i, j] for i, j in _pairs(d)]
    return np.concatenate([[c0], lin, quad])


def _gaussian(coef: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Mean, covariance and peak from the coefficients, or None if not a Gaussian bump."""
    if d == 2:
        # Closed form on Python floats (numpy costs more in call overhead than the algebra).
        c0, c1, c2, c3, c4, c5 = coef.tolist()
        p00, p01, p11 = -2.0 * c3, -c4, -2.0 * c5
        det = p00 * p11 - p01 * p01
        if not (p00 > 0 and det > 0):
            return None
        s00, s01, s11 = p11 / det, -p01 / det, p00 / det
        m0, m1 = s00 * c1 + s01 * c2, s01 * c1 + s11 * c2
        log_amp = c0 + 0.5 * (m0 * c1 + m1 * c2)
        if not (math.isfinite(s00 + s01 + s11 + m0 + m1) and log_amp < 700):
            return None
        return np.array([m0, m1]), np.array([[s00, s01], [s01, s11]]), math.exp(log_amp)
    prec = np.empty((d, d))
    for k, (i, j) in enumerate(_pairs(d)):
        v = coef[1 + d + k]
        if i == j:
            prec[i, i] = -2.0 * v
        else:
            prec[i, j] = prec[j, i] = -v
    if d == 1:
        if not prec[0, 0] > 0:
            return None
        cov = np.array([[1.0 / float(prec[0, 0])]])
    else:
        try:
            np.linalg.cholesky(prec)
        except np.linalg.LinAlgError:
            return None
        cov = np.linalg.inv(prec)
    mean = cov @ coef[1 : 1 + d]
    log_amp = coef[0] + 0.5 * float(mean @ coef[1 : 1 + d])
    if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(mean)) and log_amp < 700):
        return None
    return mean, cov, math.exp(log_amp)


def _levenberg_marquardt(
    grid: _Grid,
    target: np.ndarray,
    b: float,
    coef: np.ndarray,
    fit_floor: bool,
    tol: float,
) -> tuple[float, np.ndarray, bool, float, np.ndarray] | None:
    """``(floor, coefficients, converged, residual sum of squares, weights)`` from the start
    ``(b, coef)``, the weights a :meth:`_Grid.weights` buffer whose slots ``_G`` and ``_R``
    hold the model's Gaussian and the residual there; None when the start cannot be
    evaluated."""
    jit = kernels.compiled() if grid.d == 2 else None
    if jit is not None:
        w, spare = grid.weights(), grid.weights()
        evaluated, b, coef, converged, cost, state, _, _ = jit.levenberg_marquardt(
            *grid.coords,
            kernels.contiguous(target),
            float(b),
            kernels.contiguous(coef),
            bool(fit_floor),
            float(tol),
            MODEL_MAX_ITER,
            _EXACT_RMS,
            _STEP_SE,
            w[_G],
            w[_R],
            spare[_G],
            spare[_R],
        )
        return (b, coef, converged, cost, spare if state else w) if evaluated else None

    # Two weight buffers: the accepted state's and the trial's (swapped on acceptance).
    spare = grid.weights()

    def evaluate(b_: float, c_: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float] | None:
        eta = grid.eta(c_)
        # The grid's coordinates lie in [-1, 1], so |eta| <= sum |c|: below 700 the exp cannot
        # overflow. Else exp(700) is finite: a wild trial step gives a huge cost and is
        # rejected, without overflow warnings (np.errstate costs more than the exp here).
        if sum(map(abs, c_.tolist())) >= 700.0:
            np.minimum(eta, 700.0, out=eta)
        g = np.exp(eta, out=w[_G])
        r = np.subtract(target, g, out=w[_R])
        r -= b_
        cost = sum_of_products(r, r)
        return (w, cost) if math.isfinite(cost) else None

    state = evaluate(b, coef, grid.weights())
    if state is None:
        return None
    w, cost = state
    # A fit whose residuals are at the rounding of the (peak-scaled) values is exact: a
    # noiseless Gaussian on a floor, one step from the log-linear start, would otherwise take
    # one more step and evaluation to get from 1e-14 of the peak to 1e-17.
    exact = grid.size * _EXACT_RMS**2

    # Damping starts small (Madsen and Nielsen's choice for a start believed good; the
    # log-linear start is exact on clean Gaussians). The monomials' normal matrix is badly
    # conditioned, so Marquardt's classic 1e-3 times its diagonal holds back its weak
    # directions for several iterations (5 evaluations instead of 3 on cut noisy maps).
    lam = 1e-6
    # A step s moves the parameters by sqrt(s^T J^T J s) / sigma standard errors (their
    # covariance is sigma^2 (J^T J)^-1, sigma^2 = cost / (N - p)), and s^T J^T J s is the drop
    # of the cost the linearised model predicts for it. A predicted drop below
    # _STEP_SE^2 sigma^2 would move the fit by under a hundredth of its own uncertainty (a
    # relative cost change of 1.6e-8 to 6e-8 on these 1600-6400 points, like scipy's
    # least_squares default ftol=1e-8). On a noiseless map sigma is rounding, so the fit
    # still converges to rounding.
    still = max(_STEP_SE**2 / max(grid.size - len(coef) - int(fit_floor), 1), tol)
    nu = 2.0
    for _ in range(MODEL_MAX_ITER):
        if cost <= exact:
            return b, coef, True, cost, w
        normal, grad = grid.normal_equations(w, fit_floor)
        diagonal = normal.diagonal()
        scale = np.where(diagonal > 0, diagonal, 1.0)
        for _ in range(20):
            step = _solve(normal + np.diag(lam * scale), grad)
            if step is None:
                lam, nu = lam * nu, 2.0 * nu
                continue
            predicted = _predicted_drop(step, grad, lam, scale)
            if lam <= 1e-2 and predicted <= still * cost:
                # The model's own prediction of the step's gain says the step would not move
                # the fit by a hundredth of its standard error: the minimum is reached, and
                # the step that would only confirm it is not evaluated.
                return b, coef, True, cost, w
            nb, nc = (b + float(step[0]), coef + step[1:]) if fit_floor else (b, coef + step)
            trial = evaluate(nb, nc, spare)
            if trial is not None and trial[1] <= cost:
                break
            if trial is not None and trial[1] <= cost * (1.0 + 1e-9) and lam <= 1e-2:
                # A nearly undamped step that cannot lower the cost: at the minimum to
                # rounding (the usual way a fit on noisy data ends; no need to damp further).
                return b, coef, True, cost, w
            lam, nu = lam * nu, 2.0 * nu
        else:
            # No step lowers the cost: a minimum to within rounding.
            return b, coef, True, cost, w
        params = [b, *coef.tolist()] if fit_floor else coef.tolist()
        small = max(abs(s) / (abs(p) + 1e-3) for s, p in zip(step.tolist(), params, strict=True))
        drop = cost - trial[1]
        spare = w
        b, coef, (w, cost) = nb, nc, trial
        # Nielsen's update: damping follows how well the linear model predicted the drop
        # (gain ratio rho), without the 10x up / 10x down oscillation in curved valleys.
        rho = drop / predicted if predicted > 0 else 0.0
        lam, nu = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-12), 2.0
        if drop <= tol * max(cost, 1e-300) or small < 100 * tol:
            return b, coef, True, cost, w
    return b, coef, False, cost, w

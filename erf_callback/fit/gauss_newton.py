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

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianModelFit", "fit_floor_gaussian"]

# Box half-width in sigmas: a Gaussian is below exp(-12.5) ~ 4e-6 of its peak there, and the
# box holds ~100 sigma^2 of pixels per ~6 sigma^2 of Gaussian, enough to pin the floor.
_BOX_SIGMAS = 5.0
# Pixels per fit: about this many (strided); more adds time, not accuracy, on smooth ERFs.
_POINTS = 6400
# Pixels per round while the box is still being found.
_COARSE = 1600
_MAX_ITER = 60
# Relative cost change and step size below which the iteration has converged.
_TOL = 1e-12
# Looser while the box is still being found: the last round refines from there.
_COARSE_TOL = 1e-6


@dataclass(frozen=True)
class GaussianModelFit:
    """Result of :func:`fit_floor_gaussian` (pixel coordinates in the map's axis order)."""

    mean: np.ndarray
    cov: np.ndarray
    floor: float
    amplitude: float
    converged: bool
    residual: float  # residual sum of squares over total sum of squares, on the fitted pixels


def fit_floor_gaussian(
    a: np.ndarray,
    mean: np.ndarray,
    cov: np.ndarray,
    floor: float,
    amplitude: float,
    *,
    fit_floor: bool = True,
    points: int = _POINTS,
) -> GaussianModelFit | None:
    """Least-squares ``floor + amplitude * exp(-(x - mean)^T cov^-1 (x - mean) / 2)``.

    Args:
        a: the map (float64, 1-3 axes).
        mean, cov, floor, amplitude: the starting point (e.g. robust moments).
        fit_floor: fit the floor (else it stays at ``floor``).
        points: about how many pixels (strided) one fit uses.

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
    scale = max(abs(amplitude), float(np.max(np.abs(a))), 1e-300)
    result: GaussianModelFit | None = None
    used: tuple[slice, ...] | None = None
    budget = min(points, _COARSE)
    # Rounds on a coarse stride until the box stops growing (a seed narrowed by a cut or by
    # noise gives a box too small for the Gaussian it finds), then one round at full density
    # from the converged coarse solution (a few iterations) for the statistical precision.
    for _ in range(6):
        box = _box(a.shape, mean, cov, budget)
        if used is not None and _covers(used, box):
            if budget == points:
                break
            budget = points
            box = _box(a.shape, mean, cov, budget)
            if box == used:
                break
        used = box
        coords = [np.arange(s.start, s.stop, s.step, dtype=np.float64) for s in box]
        centre = np.array([(c[0] + c[-1]) / 2 for c in coords])
        half = np.array([max((c[-1] - c[0]) / 2, 1.0) for c in coords])
        feats = _features([(c - m) / h for c, m, h in zip(coords, centre, half, strict=True)])
        target = a[box].reshape(-1) / scale
        c0 = _coefficients((mean - centre) / half, cov / np.outer(half, half), amplitude / scale)
        if c0 is None:
            return result
        tol = _TOL if budget == points else _COARSE_TOL
        solved = _levenberg_marquardt(feats, target, floor / scale, c0, fit_floor, tol)
        if solved is None:
            return result
        b, coef, converged, rss = solved
        gauss = _gaussian(coef, d)
        if gauss is None:
            return result
        mu_n, cov_n, amp_n = gauss
        mean = centre + half * mu_n
        cov = cov_n * np.outer(half, half)
        floor, amplitude = b * scale, amp_n * scale
        tss = float(np.sum((target - target.mean()) ** 2))
        result = GaussianModelFit(mean, cov, floor, amplitude, converged, rss / tss if tss else 0.0)
    return result


def _box(
    shape: tuple[int, ...], mean: np.ndarray, cov: np.ndarray, points: int
) -> tuple[slice, ...]:
    d = len(shape)
    half = _BOX_SIGMAS * np.sqrt(np.clip(np.diag(cov), 0.25, None))
    per_axis = points ** (1.0 / d)
    out = []
    for m, h, n in zip(mean, half, shape, strict=True):
        lo = int(np.clip(math.floor(m - h), 0, n - 1))
        hi = int(np.clip(math.ceil(m + h) + 1, lo + 1, n))
        step = max(1, math.ceil((hi - lo) / per_axis))
        out.append(slice(lo, hi, step))
    return tuple(out)


def _covers(used: tuple[slice, ...], box: tuple[slice, ...]) -> bool:
    """Whether the box already fitted on spans (nearly) all of the box the fit now asks for."""
    for u, b in zip(used, box, strict=True):
        slack = 0.1 * (b.stop - b.start)
        if u.start > b.start + slack or u.stop < b.stop - slack:
            return False
    return True


def _pairs(d: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(d) for j in range(i, d)]


def _features(u: list[np.ndarray]) -> np.ndarray:
    """Columns ``1, u_i, u_i u_j (i <= j)`` on the open grid ``u``, shape (n_pixels, k)."""
    d = len(u)
    grids = np.meshgrid(*u, indexing="ij")
    cols = [np.ones(grids[0].size)] + [g.reshape(-1) for g in grids]
    cols += [(grids[i] * grids[j]).reshape(-1) for i, j in _pairs(d)]
    return np.stack(cols, axis=1)


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
    prec = np.empty((d, d))
    for k, (i, j) in enumerate(_pairs(d)):
        v = coef[1 + d + k]
        if i == j:
            prec[i, i] = -2.0 * v
        else:
            prec[i, j] = prec[j, i] = -v
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
    feats: np.ndarray,
    target: np.ndarray,
    b: float,
    coef: np.ndarray,
    fit_floor: bool,
    tol: float,
) -> tuple[float, np.ndarray, bool, float] | None:
    n, k = feats.shape
    off = 1 if fit_floor else 0
    jac = np.empty((n, k + off))
    if fit_floor:
        jac[:, 0] = 1.0

    def evaluate(b_: float, c_: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        with np.errstate(over="ignore", invalid="ignore"):
            g = np.exp(feats @ c_)
            r = target - b_ - g
            cost = float(r @ r)
        return (g, r, cost) if math.isfinite(cost) else None

    state = evaluate(b, coef)
    if state is None:
        return None
    g, r, cost = state
    lam = 1e-3
    for _ in range(_MAX_ITER):
        np.multiply(feats, g[:, None], out=jac[:, off:])
        jac_tj = jac.T @ jac
        grad = jac.T @ r
        scale = np.diag(jac_tj).copy()
        scale[scale <= 0] = 1.0
        diag = np.diag(scale)
        for _ in range(20):
            try:
                step = np.linalg.solve(jac_tj + lam * diag, grad)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            nb, nc = (b + step[0], coef + step[1:]) if fit_floor else (b, coef + step)
            trial = evaluate(nb, nc)
            if trial is not None and trial[2] <= cost:
                break
            lam *= 10.0
        else:
            # No step lowers the cost: a minimum to within rounding.
            return b, coef, True, cost
        params = np.append(b, coef) if fit_floor else coef
        small = float(np.max(np.abs(step) / (np.abs(params) + 1e-3)))
        drop = cost - trial[2]
        b, coef, (g, r, cost) = nb, nc, trial
        lam = max(lam / 10.0, 1e-12)
        if drop <= tol * max(cost, 1e-300) or small < 100 * tol:
            return b, coef, True, cost
    return b, coef, False, cost

"""Compiled (numba) kernels of the 2-D floor + Gaussian fit; imported through :mod:`.kernels`.

Each kernel is one pass (or a few) over the map doing what a chain of numpy calls does in
:mod:`.gauss_newton` and :mod:`.gaussian`: on a 64 x 64 map those chains cost more in
per-call overhead than in arithmetic. The numpy versions stay as the fallback (and for 1-
and 3-D maps); ``tests/fit/test_kernels.py`` holds the two to the same results.

Results agree with the numpy path to rounding, not bit for bit: sums run in another order,
and :func:`evaluate` builds the exponential from one per row, one per column and a product
along the row (see there).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "cholesky_solve",
    "clipped_stats",
    "evaluate",
    "far_values",
    "levenberg_marquardt",
    "log_linear",
    "normal_equations",
    "region_sums",
]

# Annotations are for readers and mypy; numba types the arguments from the values passed.
Array = np.ndarray

# Monomials [1, y, x, y^2, y x, x^2] as exponents of y and of x (the coefficient order of
# gauss_newton's 2-D quadratic).
_P = (0, 1, 0, 2, 1, 0)
_Q = (0, 0, 1, 0, 1, 2)
# The product along a row restarts from a direct exponential every this many columns, so
# its rounding stays below ~_RESTART units (7e-15 relative).
_RESTART = 64


@njit(cache=True)
def evaluate(uy: Array, ux: Array, target: Array, b: float, c: Array, g: Array, r: Array) -> float:
    """Writes the model's Gaussian ``g = exp(eta)`` and the residual ``r = target - b - g``
    on the grid ``uy x ux`` (``eta`` the quadratic with coefficients ``c``); returns the sum
    of squares of ``r`` (NaN or Inf when not finite).

    ``exp(eta) = exp(c0 + c1 y + c3 y^2) exp(c2 x + c5 x^2) exp(c4 y x)``, the last a
    geometric sequence along a row of equally spaced ``x``: one exponential per row and per
    column and two products per pixel instead of an exponential per pixel. Every partial
    product's exponent is bounded by ``sum |c|`` (``|y|, |x| <= 1``), so below 700 none
    overflows; above, the direct form with the exponent capped at 700 (a wild trial step
    gets a huge cost and is rejected).
    """
    ny, nx = target.shape
    big = 0.0
    for k in range(6):
        big += abs(c[k])
    cost = 0.0
    if not big < 700.0:
        for i in range(ny):
            y = uy[i]
            a0 = c[0] + c[1] * y + c[3] * y * y
            a1 = c[2] + c[4] * y
            for j in range(nx):
                x = ux[j]
                eta = min(a0 + (a1 + c[5] * x) * x, 700.0)
                gij = math.exp(eta)
                rij = target[i, j] - b - gij
                g[i, j] = gij
                r[i, j] = rij
                cost += rij * rij
        return cost
    col = np.empty(nx)
    for j in range(nx):
        x = ux[j]
        col[j] = math.exp((c[2] + c[5] * x) * x)
    dx = (ux[nx - 1] - ux[0]) / (nx - 1) if nx > 1 else 0.0
    for i in range(ny):
        y = uy[i]
        row = math.exp(c[0] + c[1] * y + c[3] * y * y)
        ratio = math.exp(c[4] * y * dx)
        cross = 1.0
        for j in range(nx):
            if j % _RESTART == 0:
                cross = math.exp(c[4] * y * ux[j])
            gij = row * col[j] * cross
            cross *= ratio
            rij = target[i, j] - b - gij
            g[i, j] = gij
            r[i, j] = rij
            cost += rij * rij
    return cost


@njit(cache=True)
def _add_row(m: Array, y: float, sums: Array, order: int) -> None:
    """Adds one row's sums ``sums[q] = sum_j w x_j^q`` at height ``y`` to the moments up to
    ``order``: ``m[p, q] += y^p sums[q]`` for ``p + q <= order``."""
    yp = 1.0
    for p in range(order + 1):
        for q in range(order + 1 - p):
            m[p, q] += sums[q] * yp
        yp *= y


@njit(cache=True)
def _gather(m4: Array, m2: Array, normal: Array, rhs: Array, o: int) -> None:
    """The monomials' normal matrix ``sum w m_a m_b`` from the order-4 moments ``m4`` and the
    right-hand side ``sum v m_a`` from the order-2 moments ``m2``, from row and column ``o``
    on."""
    for a in range(6):
        for k in range(6):
            normal[o + a, o + k] = m4[_P[a] + _P[k], _Q[a] + _Q[k]]
        rhs[o + a] = m2[_P[a], _Q[a]]


@njit(cache=True, fastmath={"reassoc", "contract"})
def normal_equations(
    uy: Array, ux: Array, g: Array, r: Array, fit_floor: bool, normal: Array, grad: Array
) -> None:
    """Fills ``normal = J^T J`` and ``grad = J^T r`` for the parameters ``[floor,]
    coefficients`` from the model's ``g`` and ``r`` (see ``gauss_newton._Grid``): moments
    of ``g^2`` up to order 4, of ``r g`` and ``g`` up to order 2, and ``sum r``, summed
    along each row first."""
    ny, nx = g.shape
    mgg = np.zeros((5, 5))
    mrg = np.zeros((3, 3))
    mg = np.zeros((3, 3))
    row = np.empty(5)  # one row's sums, handed to _add_row
    rsum = 0.0
    for i in range(ny):
        a0 = a1 = a2 = a3 = a4 = 0.0
        b0 = b1 = b2 = 0.0
        e0 = e1 = e2 = 0.0
        s = 0.0
        for j in range(nx):
            x = ux[j]
            x2 = x * x
            gij = g[i, j]
            rij = r[i, j]
            gg = gij * gij
            rg = rij * gij
            a0 += gg
            a1 += gg * x
            a2 += gg * x2
            a3 += gg * x2 * x
            a4 += gg * x2 * x2
            b0 += rg
            b1 += rg * x
            b2 += rg * x2
            e0 += gij
            e1 += gij * x
            e2 += gij * x2
            s += rij
        row[0], row[1], row[2], row[3], row[4] = a0, a1, a2, a3, a4
        _add_row(mgg, uy[i], row, 4)
        row[0], row[1], row[2] = b0, b1, b2
        _add_row(mrg, uy[i], row, 2)
        row[0], row[1], row[2] = e0, e1, e2
        _add_row(mg, uy[i], row, 2)
        rsum += s
    _gather(mgg, mrg, normal, grad, 1 if fit_floor else 0)
    if fit_floor:
        for a in range(6):
            normal[0, 1 + a] = mg[_P[a], _Q[a]]
            normal[1 + a, 0] = mg[_P[a], _Q[a]]
        normal[0, 0] = float(ny * nx)
        grad[0] = rsum


@njit(cache=True)
def cholesky_solve(m: Array, rhs: Array, out: Array, pivot_min: float) -> bool:
    """Solves ``m out = rhs`` for a symmetric ``m``; False when ``m`` is not positive
    definite (a pivot at most ``pivot_min`` times its diagonal entry: rounding, where the
    system is singular) or the solution is not finite (Cholesky is also the test)."""
    n = rhs.shape[0]
    low = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = m[i, j]
            for k in range(j):
                s -= low[i, k] * low[j, k]
            if i > j:
                low[i, j] = s / low[j, j]
            elif s > pivot_min * m[i, i] and s > 0.0:
                low[i, i] = math.sqrt(s)
            else:
                return False
    for i in range(n):
        s = rhs[i]
        for k in range(i):
            s -= low[i, k] * out[k]
        out[i] = s / low[i, i]
    for i in range(n - 1, -1, -1):
        s = out[i]
        for k in range(i + 1, n):
            s -= low[k, i] * out[k]
        out[i] = s / low[i, i]
    total = 0.0
    for i in range(n):
        total += out[i]
    return math.isfinite(total)


@njit(cache=True)
def levenberg_marquardt(
    uy: Array,
    ux: Array,
    target: Array,
    b: float,
    coef: Array,
    fit_floor: bool,
    tol: float,
    max_iter: int,
    exact_rms: float,
    step_se: float,
    g0: Array,
    r0: Array,
    g1: Array,
    r1: Array,
) -> tuple[bool, float, Array, bool, float, int, int, int]:
    """``gauss_newton._levenberg_marquardt`` on a 2-D grid, step for step (its comments give
    the reasons). ``g0, r0`` and ``g1, r1``: the two states' buffers.

    Returns ``(evaluated, floor, coefficients, converged, cost, state, iterations,
    evaluations)``: ``evaluated`` is False when the start cannot be evaluated; ``state`` (0 or
    1) says which buffers hold the final ``g`` and ``r``; the counts are of the normal
    equations built and of the model's evaluations (the start's included).
    """
    coef = coef.copy()
    cost = evaluate(uy, ux, target, b, coef, g0, r0)
    if not math.isfinite(cost):
        return False, b, coef, False, cost, 0, 0, 1
    state = 0
    size = target.size
    exact = size * exact_rms * exact_rms
    n = 7 if fit_floor else 6
    o = 1 if fit_floor else 0
    still = max(step_se * step_se / max(size - n, 1), tol)
    lam = 1e-6
    nu = 2.0
    normal = np.empty((n, n))
    grad = np.empty(n)
    damped = np.empty((n, n))
    step = np.empty(n)
    scale = np.empty(n)
    trial_coef = np.empty(6)
    built = 0
    evaluations = 1
    for _ in range(max_iter):
        if cost <= exact:
            return True, b, coef, True, cost, state, built, evaluations
        built += 1
        if state == 0:
            normal_equations(uy, ux, g0, r0, fit_floor, normal, grad)
        else:
            normal_equations(uy, ux, g1, r1, fit_floor, normal, grad)
        for k in range(n):
            scale[k] = normal[k, k] if normal[k, k] > 0 else 1.0
        accepted = False
        trial_cost = 0.0
        predicted = 0.0
        trial_b = b
        for _inner in range(20):
            for i in range(n):
                for j in range(n):
                    damped[i, j] = normal[i, j]
                damped[i, i] += lam * scale[i]
            if not cholesky_solve(damped, grad, step, 0.0):
                lam, nu = lam * nu, 2.0 * nu
                continue
            predicted = 0.0
            for k in range(n):
                predicted += step[k] * grad[k] + lam * scale[k] * step[k] * step[k]
            if lam <= 1e-2 and predicted <= still * cost:
                return True, b, coef, True, cost, state, built, evaluations
            trial_b = b + step[0] if fit_floor else b
            for k in range(6):
                trial_coef[k] = coef[k] + step[o + k]
            evaluations += 1
            if state == 0:
                trial_cost = evaluate(uy, ux, target, trial_b, trial_coef, g1, r1)
            else:
                trial_cost = evaluate(uy, ux, target, trial_b, trial_coef, g0, r0)
            finite = math.isfinite(trial_cost)
            if finite and trial_cost <= cost:
                accepted = True
                break
            if finite and trial_cost <= cost * (1.0 + 1e-9) and lam <= 1e-2:
                return True, b, coef, True, cost, state, built, evaluations
            lam, nu = lam * nu, 2.0 * nu
        if not accepted:
            return True, b, coef, True, cost, state, built, evaluations
        small = 0.0
        for k in range(n):
            p = (b if k == 0 else coef[k - 1]) if fit_floor else coef[k]
            small = max(small, abs(step[k]) / (abs(p) + 1e-3))
        drop = cost - trial_cost
        b = trial_b
        for k in range(6):
            coef[k] = trial_coef[k]
        cost = trial_cost
        state = 1 - state
        rho = drop / predicted if predicted > 0 else 0.0
        lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-12)
        nu = 2.0
        if drop <= tol * max(cost, 1e-300) or small < 100 * tol:
            return True, b, coef, True, cost, state, built, evaluations
    return True, b, coef, False, cost, state, built, evaluations


@njit(cache=True)
def log_linear(
    uy: Array, ux: Array, target: Array, floor: float, level: float, pivot_min: float, out: Array
) -> bool:
    """``gauss_newton._log_linear`` on a 2-D grid: weighted least squares of ``log(target -
    floor)`` on the monomials over the pixels above ``floor + level * (max - floor)``, weights
    ``(target - floor)^2``. Writes the coefficients into ``out``; False when there is no
    such pixel or the system is singular (see :func:`cholesky_solve`)."""
    ny, nx = target.shape
    top = -np.inf
    for i in range(ny):
        for j in range(nx):
            top = max(top, target[i, j])
    top -= floor
    if not top > 0:
        return False
    cut = floor + level * top
    m4 = np.zeros((5, 5))
    m2 = np.zeros((3, 3))
    row = np.empty(5)
    for i in range(ny):
        a0 = a1 = a2 = a3 = a4 = 0.0
        b0 = b1 = b2 = 0.0
        for j in range(nx):
            t = target[i, j]
            if t > cut:
                v = t - floor
                w = v * v
                wl = w * math.log(v)
                x = ux[j]
                x2 = x * x
                a0 += w
                a1 += w * x
                a2 += w * x2
                a3 += w * x2 * x
                a4 += w * x2 * x2
                b0 += wl
                b1 += wl * x
                b2 += wl * x2
        row[0], row[1], row[2], row[3], row[4] = a0, a1, a2, a3, a4
        _add_row(m4, uy[i], row, 4)
        row[0], row[1], row[2] = b0, b1, b2
        _add_row(m2, uy[i], row, 2)
    normal = np.empty((6, 6))
    rhs = np.empty(6)
    _gather(m4, m2, normal, rhs, 0)
    return cholesky_solve(normal, rhs, out, pivot_min)


@njit(cache=True)
def region_sums(a: Array, level: float, out: Array) -> tuple[int, int]:
    """Raw moments of the region ``a >= level`` in the coordinates of its bounding box:
    writes ``[1, i, i^2]^T region [1, j, j^2]`` (3 x 3) into ``out`` and returns the box's
    first row and column (``(-1, -1)`` for an empty region). Sums of small integers: exact,
    as ``gaussian._region_moments_2d`` computes them."""
    ny, nx = a.shape
    r0, r1, c0, c1 = ny, -1, nx, -1
    for i in range(ny):
        for j in range(nx):
            if a[i, j] >= level:
                r0 = min(r0, i)
                r1 = max(r1, i)
                c0 = min(c0, j)
                c1 = max(c1, j)
    if r1 < 0:
        return -1, -1
    for p in range(3):
        for q in range(3):
            out[p, q] = 0.0
    for i in range(r0, r1 + 1):
        s0 = s1 = s2 = 0.0
        for j in range(c0, c1 + 1):
            if a[i, j] >= level:
                x = float(j - c0)
                s0 += 1.0
                s1 += x
                s2 += x * x
        y = float(i - r0)
        out[0, 0] += s0
        out[0, 1] += s1
        out[0, 2] += s2
        out[1, 0] += y * s0
        out[1, 1] += y * s1
        out[2, 0] += y * y * s0
    return r0, c0


@njit(cache=True)
def far_values(
    iy: Array,
    ix: Array,
    vals: Array,
    m0: float,
    m1: float,
    p00: float,
    p01: float,
    p11: float,
    radii: Array,
    min_pixels: int,
    amplitude: float,
    out: Array,
) -> int:
    """``gaussian._far_floor``'s selection: the values at the sampled pixels whose squared
    Mahalanobis distance (mean ``m0, m1``, precision ``p``) exceeds the first radius of
    ``radii`` that leaves at least ``min_pixels`` of them; beyond a radius under
    ``radii[0]`` (the window) each less the Gaussian's tail there (``amplitude``: its
    peak). Written into ``out``; returns their count (0: no radius leaves enough)."""
    ny, nx = vals.shape
    d2 = np.empty((ny, nx))
    twice = 2.0 * p01
    for i in range(ny):
        dy = iy[i] - m0
        for j in range(nx):
            dx = ix[j] - m1
            # mahalanobis_sq's order of operations: the same pixels fall outside.
            d2[i, j] = p00 * dy * dy + twice * dy * dx + p11 * dx * dx
    for k in range(radii.shape[0]):
        r2 = radii[k] * radii[k]
        n = 0
        for i in range(ny):
            for j in range(nx):
                if d2[i, j] > r2:
                    n += 1
        if n >= min_pixels:
            n = 0
            for i in range(ny):
                for j in range(nx):
                    if d2[i, j] > r2:
                        v = vals[i, j]
                        if radii[k] < radii[0]:
                            v -= amplitude * math.exp(-0.5 * d2[i, j])
                        out[n] = v
                        n += 1
            return n
    return 0


@njit(cache=True)
def _select(buf: Array, k: int, n: int) -> float:
    """The ``k``-th smallest of ``buf[:n]`` (0-based), by quickselect in place: afterwards
    ``buf[:k]`` holds values at most it. (``np.partition`` does the same, but numba takes
    seconds longer to compile it than these loops.)"""
    lo, hi = 0, n - 1
    while hi > lo:
        a, b, c = buf[lo], buf[(lo + hi) // 2], buf[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                swap = buf[i]
                buf[i] = buf[j]
                buf[j] = swap
                i += 1
                j -= 1
        # [lo, j] <= pivot, [i, hi] >= pivot, and everything between equals it.
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


@njit(cache=True)
def _median(buf: Array) -> float:
    """``gaussian._median`` of ``buf`` (reordered in place): the middle order statistic, or
    the mean of the middle two."""
    n = buf.shape[0]
    k = n // 2
    upper = _select(buf, k, n)
    if n % 2:
        return upper
    lower = buf[0]
    for i in range(1, k):
        lower = max(lower, buf[i])
    return 0.5 * (lower + upper)


@njit(cache=True)
def clipped_stats(values: Array) -> tuple[float, float, int, float]:
    """``gaussian._clipped_stats`` (its docstring gives the reasons): the mean, robust spread
    and count of the values within 5 spreads of their median, and the median."""
    # Element loops throughout: numba compiles array expressions and slice assignments
    # several times slower than the loops they stand for.
    n = values.shape[0]
    buf = np.empty(n)
    for i in range(n):
        buf[i] = values[i]
    med = _median(buf)
    deviation = np.empty(n)
    low = values[0]
    at_low = 0
    for i in range(n):
        deviation[i] = abs(values[i] - med)
        buf[i] = deviation[i]
        low = min(low, values[i])
    for i in range(n):
        if values[i] == low:
            at_low += 1
    spread = 1.4826 * _median(buf)
    if 4 * at_low >= n:
        q1, q3 = (n - 1) // 4, (3 * (n - 1)) // 4
        for i in range(n):
            buf[i] = values[i]
        upper = _select(buf, q3, n)
        quartiles = (upper - _select(buf, q1, q3 + 1)) / 1.349
        if spread < 0.5 * quartiles:
            spread = quartiles
    if spread == 0.0:
        return med, 0.0, n, med
    total = 0.0
    kept = 0
    for i in range(n):
        if deviation[i] <= 5.0 * spread:
            total += values[i]
            kept += 1
    return total / kept, spread, kept, med

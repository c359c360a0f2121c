"""Numerics on the pixel grid shared by the fit, the metrics, the pictures and the history.

Coordinates are pixel indices in the map's axis order ((x,), (y, x) or (z, y, x)): pixel
``(r, c)`` has its centre at coordinate ``(r, c)``. Everything is numpy; nothing here draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "bounding_box",
    "cumulative_mass",
    "determinant",
    "distance_sq",
    "downsample_map",
    "gaussian_on_grid",
    "mahalanobis_sq",
    "mass_within",
    "open_grid",
    "sum_of_products",
    "unit_gaussian",
]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True of a non-empty ``mask``, one slice per axis.

    Example:
        >>> bounding_box(np.array([[0, 0, 0], [0, 1, 1]], dtype=bool))
        (slice(1, 2, None), slice(1, 3, None))
    """
    d = mask.ndim
    box = []
    for i in range(d):
        others = tuple(k for k in range(d) if k != i)
        hits = np.logical_or.reduce(mask, axis=others) if others else mask
        # First and last True by argmax (a C loop that stops at the first hit; np.flatnonzero
        # and ndarray.any go through several Python-level wrappers).
        box.append(slice(int(hits.argmax()), hits.size - int(hits[::-1].argmax())))
    return tuple(box)


def determinant(m: np.ndarray) -> float:
    """Determinant of a small square matrix: closed form up to 2 x 2 (numpy.linalg's call
    overhead is most of the cost at that size), ``numpy.linalg.det`` above.

    Example:
        >>> determinant(np.array([[2.0, 1.0], [1.0, 3.0]]))
        5.0
    """
    if m.shape == (2, 2):
        return float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
    if m.shape == (1, 1):
        return float(m[0, 0])
    return float(np.linalg.det(m))


def open_grid(shape: Sequence[int]) -> list[np.ndarray]:
    """One float64 coordinate vector per axis (``np.arange(n)``), as the functions here take."""
    return [np.arange(n, dtype=np.float64) for n in shape]


def mahalanobis_sq(coords: list[np.ndarray], mean: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """``(p - mean)^T prec (p - mean)`` at every point of the open grid ``coords``.

    Example:
        >>> mahalanobis_sq([np.arange(3.0)], np.array([1.0]), np.array([[4.0]])).tolist()
        [4.0, 0.0, 4.0]
    """
    d = len(coords)
    shape_of = [[-1 if k == i else 1 for k in range(d)] for i in range(d)]
    delta = [(coords[i] - mean[i]).reshape(shape_of[i]) for i in range(d)]
    out = prec[0, 0] * delta[0] * delta[0]
    for i in range(d):
        for j in range(i, d):
            if i == j == 0:
                continue
            factor = prec[i, j] if i == j else 2.0 * prec[i, j]
            out = out + factor * delta[i] * delta[j]
    return out


def unit_gaussian(coords: list[np.ndarray], mean: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """``exp(-(p - mean)^T prec (p - mean) / 2)`` at every point of the open grid ``coords``.

    The full-size result of ``np.exp(-0.5 * mahalanobis_sq(coords, mean, prec))``, to a few
    units of rounding. On a large 2-D grid of consecutive rows the exponential is factored:
    the exponent is ``A_i + B_j + C_j * i`` (``C_j`` from the cross term), so row ``i`` is
    ``exp(B_j) * exp(C_j)^i * exp(A_i)``, the powers built by doubling the rows already
    made: three exponentials along one axis and a few products instead of an exponential per
    pixel (the costly part on large maps). It falls back to the direct form where a partial
    product could overflow (correlations near 1).

    Example:
        >>> g = unit_gaussian([np.arange(3.0), np.arange(4.0)], np.array([1.0, 1.5]), np.eye(2))
        >>> bool(np.allclose(g, np.exp(-0.5 * mahalanobis_sq(
        ...     [np.arange(3.0), np.arange(4.0)], np.array([1.0, 1.5]), np.eye(2)))))
        True
    """
    if len(coords) == 2 and len(coords[0]) * len(coords[1]) >= _FACTORED_MIN:
        out = _unit_gaussian_2d(coords[0], coords[1], mean, prec)
        if out is not None:
            return out
    return np.exp(-0.5 * mahalanobis_sq(coords, mean, prec))


# Below this many pixels the direct form costs no more (numpy's per-call overhead dominates).
_FACTORED_MIN = 8192


def _unit_gaussian_2d(
    y: np.ndarray, x: np.ndarray, mean: np.ndarray, prec: np.ndarray
) -> np.ndarray | None:
    n, m = len(y), len(x)
    if n > 1 and not np.all(np.diff(y) == 1.0):
        return None
    p00, p01, p11 = float(prec[0, 0]), 0.5 * float(prec[0, 1] + prec[1, 0]), float(prec[1, 1])
    dy = y - float(mean[0])
    dx = x - float(mean[1])
    rows = -0.5 * p00 * (dy * dy)  # A_i
    cross = -p01 * dx  # C_j: the exponent gains C_j per row
    first = -0.5 * p11 * (dx * dx) + cross * float(dy[0])  # B_j + C_j dy_0
    # Every partial product is exp(first_j + cross_j * i) or exp(cross_j * w): both must stay
    # finite (the whole exponent is <= 0; its parts need not be).
    big = float(np.max(np.abs(cross))) * n + float(np.max(np.abs(first)))
    if not (math.isfinite(big) and big < 600.0 and float(np.min(rows)) > -600.0):
        return None
    out = np.empty((n, m))
    out[0] = np.exp(first)
    ratio = np.exp(cross)
    done = 1
    while done < n:  # rows [done, 2 done) from rows [0, done), contiguous blocks
        k = min(done, n - done)
        np.multiply(out[:k], ratio, out=out[done : done + k])
        done += k
        if done < n:
            ratio = ratio * ratio
    out *= np.exp(rows)[:, None]
    return out


def sum_of_products(x: np.ndarray, y: np.ndarray) -> float:
    """``sum(x * y)`` over two arrays of one shape, on one thread.

    BLAS ``dot`` is the cheapest call up to 10000 elements, where OpenBLAS keeps it on one
    thread; above that it spawns threads, which costs milliseconds on a busy machine for
    microseconds of work, so ``einsum`` (one pass, no temporary) takes over.

    Example:
        >>> sum_of_products(np.arange(3.0), np.ones(3))
        3.0
    """
    if x.size <= _BLAS_DOT_MAX:
        return float(np.vdot(x, y))
    return float(np.einsum(_EINSUM_DOT[x.ndim], x, y))


_BLAS_DOT_MAX = 8192
_EINSUM_DOT = {1: "i,i->", 2: "ij,ij->", 3: "ijk,ijk->"}


def distance_sq(shape: Sequence[int], center: ArrayLike) -> np.ndarray:
    """Squared Euclidean distance of every pixel centre of a ``shape`` grid from ``center``.

    Example:
        >>> distance_sq((1, 3), (0.0, 1.0)).tolist()
        [[1.0, 0.0, 1.0]]
    """
    c = np.asarray(center, dtype=np.float64).reshape(-1)
    if c.shape[0] != len(shape):
        raise ValueError(f"center has {c.shape[0]} coordinates for a {len(shape)}-D map")
    full = mahalanobis_sq(open_grid(shape), c, np.eye(len(shape)))
    return np.broadcast_to(full, tuple(shape)).astype(np.float64, copy=True)


def mass_within(dist: np.ndarray, mass: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Fraction of ``mass`` at pixels with ``dist <= r`` for each (ascending) ``r`` in radii."""
    total = float(mass.sum())
    if not total > 0:
        return np.zeros(len(radii))
    # Bin every pixel by the first radius that contains it: O(n log k), no full sort.
    idx = np.searchsorted(radii, dist.ravel(), side="left")
    binned = np.bincount(idx, weights=mass.ravel(), minlength=len(radii) + 1)
    return np.cumsum(binned[: len(radii)]) / total


def cumulative_mass(erf: np.ndarray, mean: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Fraction of the map's mass within distance ``r`` of ``mean``, for each ``r`` in radii.

    Pixels count by their centre (pixel index = coordinate); negative and non-finite values
    count as 0.

    Example:
        >>> cumulative_mass(np.array([1.0, 2.0, 1.0]), np.array([1.0]), np.array([0.0, 1.0]))
        array([0.5, 1. ])
    """
    erf = np.asarray(erf, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    mass = np.where(np.isfinite(erf), np.maximum(erf, 0.0), 0.0)
    order = np.argsort(radii, kind="stable")
    out = np.empty(len(radii))
    out[order] = mass_within(np.sqrt(distance_sq(erf.shape, mean)), mass, radii[order])
    return out


def gaussian_on_grid(shape: Sequence[int], mean: np.ndarray, cov: np.ndarray) -> np.ndarray | None:
    """Unnormalised Gaussian ``exp(-d^T cov^-1 d / 2)`` at every pixel centre, or ``None``.

    ``None`` when the covariance is not finite and positive definite (no density to draw).

    Example:
        >>> gaussian_on_grid((3,), np.array([1.0]), np.array([[1.0]])).round(4).tolist()
        [0.6065, 1.0, 0.6065]
    """
    d = len(shape)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = np.asarray(cov, dtype=np.float64).reshape(d, d)
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        return None
    cov = 0.5 * (cov + cov.T)
    if np.linalg.eigvalsh(cov).min() <= 0:
        return None
    return unit_gaussian(open_grid(shape), mean, np.linalg.inv(cov))


def downsample_map(erf: np.ndarray, max_side: int = 64) -> np.ndarray:
    """Area-average pool so that every axis is at most ``max_side`` (for storing histories).

    Along an axis of length ``n > max_side`` the block size is ``b = ceil(n / max_side)`` and
    the new length ``ceil(n / b)``; the last block may be shorter and is averaged over its
    real extent. Mean-pooling keeps the value per area: the sum of each output pixel times
    its block's area equals the total of the input. Axes already short enough are untouched,
    and a map that fits is returned as a float64 copy (never a view of the caller's buffer).

    Args:
        erf: map with any number of axes.
        max_side: maximum length of every axis.

    Returns:
        The pooled float64 map.

    Example:
        >>> downsample_map(np.ones((130, 40)), max_side=64).shape
        (44, 40)
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    out = np.array(erf, dtype=np.float64)
    for axis, n in enumerate(out.shape):
        if n <= max_side:
            continue
        b = math.ceil(n / max_side)
        starts = np.arange(0, n, b)
        counts = np.diff(np.append(starts, n)).astype(np.float64)
        sums = np.add.reduceat(out, starts, axis=axis)
        shape = [1] * out.ndim
        shape[axis] = len(starts)
        out = sums / counts.reshape(shape)
    return out

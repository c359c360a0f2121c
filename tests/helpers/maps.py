"""Synthetic ERF maps with known answers (numpy float64, pixel index = coordinate), and the
least-squares fits they are held against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["gaussian_map", "half_normal_floor", "least_squares_line_sigma", "rotated_cov"]


def gaussian_map(
    shape: Sequence[int], mean: Sequence[float] | np.ndarray, cov: np.ndarray | Sequence
) -> np.ndarray:
    """Unnormalised Gaussian ``exp(-d^T cov^-1 d / 2)`` sampled at the pixel centres.

    Computed directly from the definition (not with the library's grid helpers), so tests
    that compare the library against it compare two independent computations.
    """
    offsets = np.stack(np.indices(tuple(shape)), axis=-1).astype(np.float64)
    offsets -= np.asarray(mean, dtype=np.float64)
    prec = np.linalg.inv(np.asarray(cov, dtype=np.float64))
    return np.exp(-0.5 * np.einsum("...i,ij,...j->...", offsets, prec, offsets))


def rotated_cov(sigma_a: float, sigma_b: float, angle: float) -> np.ndarray:
    """2-D covariance with std ``sigma_a`` along ``(cos angle, sin angle)`` in (y, x) order and
    ``sigma_b`` along the perpendicular direction (``R diag(a^2, b^2) R^T``)."""
    u = np.array([math.cos(angle), math.sin(angle)])
    v = np.array([-math.sin(angle), math.cos(angle)])
    return sigma_a**2 * np.outer(u, u) + sigma_b**2 * np.outer(v, v)


def half_normal_floor(shape: Sequence[int], mean: float, seed: int = 0) -> np.ndarray:
    """|N(0, s^2)| noise with expectation ``mean`` (s = mean * sqrt(pi / 2)).

    Like the |gradient| noise of real ERF maps it is skewed: its median is
    ``s * 0.6745 = 0.845 * mean``, so a floor estimate that takes the median instead of the
    mean is 15% low.
    """
    scale = mean * math.sqrt(math.pi / 2)
    return np.abs(np.random.default_rng(seed).normal(0.0, scale, tuple(shape)))


def least_squares_line_sigma(
    line: np.ndarray, mean: float, sigma: float, floor_at_least: float = -math.inf
) -> float:
    """Sigma of scipy's least-squares fit of ``floor + amplitude * Gaussian`` to a 1-D map,
    started at the truth ``(mean, sigma)``, with the floor bounded below by ``floor_at_least``:
    the maximum-likelihood fit under Gaussian noise, free or under that bound."""
    from scipy.optimize import least_squares

    n = len(line)

    def residual(p: np.ndarray) -> np.ndarray:
        return p[3] + p[0] * gaussian_map((n,), [p[1]], [[p[2] ** 2]]) - line

    low = [-np.inf, -np.inf, -np.inf, floor_at_least]
    start = [1.0, mean, sigma, max(0.0, floor_at_least)]
    return abs(float(least_squares(residual, start, bounds=(low, np.inf)).x[2]))

"""Size metrics of an ERF map that do not assume a Gaussian shape.

Each function takes a non-negative float64 map with 1-3 spatial dims and pixel coordinates in
the map's axis order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike

from erf_callback.fit.grid import distance_sq

__all__ = [
    "DEFAULT_AREA_THRESHOLDS",
    "MetricConfig",
    "area_ratio",
    "axis_mass",
    "border_mass",
    "energy_radius",
    "radius_from_sigmas",
]

DEFAULT_AREA_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)


@dataclass(frozen=True)
class MetricConfig:
    """Choices behind :meth:`ERFMap.metrics`.

    Attributes:
        radius_factor: ``radius = radius_factor * geometric_mean(sigmas)``. The default 2 makes
            the radius the 2-sigma extent: the disc of that radius holds 86% of a 2-D
            Gaussian's mass (95% per axis).
        energy_fraction: mass fraction held by the disc of ``energy_radius``.
        area_thresholds: thresholds ``t`` of RepLKNet's high-contribution area ratio.
        fit_method: method of :func:`fit_gaussian` used for the sigma metrics.
        border_warning: warn once per layer when ``border_mass`` exceeds this.
        area_center: where the squares of ``area_ratio@t`` are centred. ``"unit"`` (default):
            on the probed unit's receptive-field centre (``ERFMap.location``, rounded half
            up). ``"replknet"``: at ``(H // 2, W // 2)`` whatever the unit, computed exactly
            as RepLKNet's erf/analyze_erf.py does (same sums, same ratio arithmetic; see
            :func:`area_ratio` for the non-square maps where their script goes wrong).

    Example:
        >>> from erf_callback import MetricConfig
        >>> MetricConfig(radius_factor=1.0).radius_factor
        1.0
    """

    radius_factor: float = 2.0
    energy_fraction: float = 0.95
    area_thresholds: tuple[float, ...] = field(default=DEFAULT_AREA_THRESHOLDS)
    fit_method: str = "robust"
    border_warning: float = 0.01
    area_center: Literal["unit", "replknet"] = "unit"

    def __post_init__(self) -> None:
        if self.area_center not in ("unit", "replknet"):
            raise ValueError(f"area_center must be 'unit' or 'replknet'; got {self.area_center!r}")
        if self.fit_method not in ("robust", "moments", "least_squares"):
            raise ValueError(
                "fit_method must be 'robust', 'moments' or 'least_squares'; got "
                f"{self.fit_method!r}"
            )
        if not (_is_real(self.radius_factor) and 0 < self.radius_factor < math.inf):
            raise ValueError(
                f"radius_factor must be a finite number > 0; got {self.radius_factor!r}"
            )
        if not (_is_real(self.energy_fraction) and 0 < self.energy_fraction <= 1):
            raise ValueError(f"energy_fraction must be in (0, 1]; got {self.energy_fraction!r}")
        if not (_is_real(self.border_warning) and 0 <= self.border_warning <= 1):
            raise ValueError(
                f"border_warning must be a mass fraction in [0, 1]; got {self.border_warning!r}"
            )
        thresholds: object = self.area_thresholds
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
            raise ValueError(
                f"area_thresholds must be a sequence of numbers in (0, 1), e.g. (0.2, 0.5); got "
                f"{thresholds!r}"
            )
        for t in thresholds:
            if not (_is_real(t) and 0 < t < 1):
                raise ValueError(f"area thresholds must be numbers in (0, 1); got {t!r}")
        if len({float(t) for t in thresholds}) != len(thresholds):
            raise ValueError(f"area_thresholds has duplicates: {tuple(thresholds)!r}")


def _is_real(value: object) -> bool:
    """A real number that is not a bool (``True > 0`` would pass every range check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def energy_radius(
    erf: np.ndarray, center: ArrayLike, fraction: float = 0.95, floor: float = 0.0
) -> float:
    """Radius of the smallest disc (ball) around ``center`` holding ``fraction`` of the mass.

    The mass is ``max(erf - floor, 0)``; the radius is the distance of the pixel centre whose
    inclusion brings the cumulative mass (pixels sorted by distance) to ``fraction``.

    Example:
        >>> import numpy as np
        >>> energy_radius(np.pad(np.ones((3, 3)), 2), (3.0, 3.0), fraction=1.0)  # corner pixel
        1.4142135623730951
    """
    mass = np.clip(erf - floor, 0.0, None)
    total = float(mass.sum())
    if not total > 0 or not np.all(np.isfinite(center)):
        return float("nan")
    r2 = distance_sq(erf.shape, center)
    flat_r2, flat_m = r2.ravel(), mass.ravel()
    goal = fraction * total
    # One O(N) histogram finds the shell where the cumulative mass crosses the goal; only the
    # pixels of that shell are sorted, so the answer is exact without sorting the whole map.
    r = np.sqrt(flat_r2)
    width = 0.5
    bins = (r / width).astype(np.int64)
    shell_mass = np.bincount(bins, weights=flat_m)
    cum = np.cumsum(shell_mass)
    shell = int(np.searchsorted(cum, goal * (1 - 1e-12)))
    shell = min(shell, len(cum) - 1)
    before = float(cum[shell - 1]) if shell > 0 else 0.0
    in_shell = bins == shell
    order = np.argsort(r[in_shell], kind="stable")
    shell_cum = before + np.cumsum(flat_m[in_shell][order])
    k = int(np.searchsorted(shell_cum, goal * (1 - 1e-12)))
    k = min(k, len(order) - 1)
    return float(r[in_shell][order][k])


def area_ratio(
    erf: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_AREA_THRESHOLDS,
    center: Sequence[int] | None = None,
) -> dict[float, float]:
    """RepLKNet's high-contribution area ratio (Ding et al., CVPR 2022, erf/analyze_erf.py).

    ``A = log10(erf + 1)``, ``A /= A.max()``; for ``i = 1, 2, ...`` take the square (cube in
    3-D, interval in 1-D) of side ``2i + 1`` around ``center``; the first whose sum exceeds
    ``t`` of the total gives ``ratio = (2i + 1)^d / (H * W * ...)`` (capped at 1; squares are
    clipped at the map's edge). ``center=None`` is RepLKNet's convention, ``(H // 2, W // 2)``,
    and then the result is their script's bit for bit: the deciding squares are summed with
    ``np.sum`` as they do and a 2-D ratio is ``(2i + 1) / H * (2i + 1) / W``. (Their script
    stops at ``i < H // 2``, and on a map taller than wide its squares can outgrow the width,
    where its slicing wraps around and its ratio can exceed 1; here such squares are clipped
    and the ratio capped at 1. Square maps, which they use, never get there.)

    Example:
        >>> import numpy as np
        >>> a = np.zeros((9, 9)); a[3:6, 3:6] = 1.0  # all mass in the central 3x3
        >>> area_ratio(a, (0.5,))[0.5] == 9 / 81
        True
        >>> b = np.zeros((9, 9)); b[0:3, 0:3] = 1.0  # the same mass around pixel (1, 1)
        >>> area_ratio(b, (0.5,), center=(1, 1))[0.5] == 9 / 81
        True
    """
    a = np.log10(erf + 1.0)
    top = float(a.max()) if a.size else 0.0
    if not top > 0 or not np.all(np.isfinite(a)):
        return {float(t): float("nan") for t in thresholds}
    a = a / top
    replknet = center is None
    c = [n // 2 for n in a.shape] if replknet else [int(v) for v in center]  # type: ignore[union-attr]
    # Integral image with a zero border: any axis-aligned box sum in 2^d lookups.
    s = a
    for axis in range(a.ndim):
        s = np.cumsum(s, axis=axis)
    s = np.pad(s, [(1, 0)] * a.ndim)
    total = float(np.sum(a)) if replknet else float(s[(-1,) * a.ndim])
    max_i = max(max(ci, n - 1 - ci) for ci, n in zip(c, a.shape, strict=True))
    i = np.arange(1, max(max_i, 1) + 1)
    lo = [np.clip(ci - i, 0, n) for ci, n in zip(c, a.shape, strict=True)]
    hi = [np.clip(ci + i + 1, 0, n) for ci, n in zip(c, a.shape, strict=True)]
    sums = np.zeros(len(i))
    for corner in range(1 << a.ndim):
        idx = tuple((hi[k] if corner >> k & 1 else lo[k]) for k in range(a.ndim))
        sign = (-1) ** (a.ndim - bin(corner).count("1"))
        sums += sign * s[idx]
    out: dict[float, float] = {}
    size = math.prod(a.shape)
    for t in thresholds:
        hit = np.nonzero(sums / total > t)[0]
        k = int(hit[0]) if hit.size else len(i) - 1
        if replknet and hit.size:
            k = _replknet_first_hit(a, c, i, k, total, t)
        side = 2 * int(i[k]) + 1
        if replknet and a.ndim == 2:
            out[float(t)] = min(side / a.shape[0] * side / a.shape[1], 1.0)
        else:
            out[float(t)] = min(side**a.ndim / size, 1.0)
    return out


def _replknet_first_hit(
    a: np.ndarray, c: Sequence[int], i: np.ndarray, k: int, total: float, t: float
) -> int:
    """Move the integral image's first hit ``k`` to the one of ``np.sum`` over the square.

    The two sums can differ in the last bits, which flips a comparison only at a tie; checking
    the neighbours of ``k`` with RepLKNet's own summation makes the choice theirs exactly.
    """

    def exceeds(j: int) -> bool:
        box = tuple(slice(max(ci - int(i[j]), 0), ci + int(i[j]) + 1) for ci in c)
        return bool(np.sum(a[box]) / total > t)

    while k > 0 and exceeds(k - 1):
        k -= 1
    while k + 1 < len(i) and not exceeds(k):
        k += 1
    return k


def border_mass(mean: np.ndarray, cov: np.ndarray, shape: Sequence[int]) -> float:
    """Fraction of the fitted Gaussian's mass that lies outside the input.

    The input is the box of pixel edges ``[-0.5, n_i - 0.5]`` along every axis. The mass
    inside is integrated exactly for rotated Gaussians too: along the first axis by
    Gauss-Legendre quadrature of the marginal density times the conditional mass of the other
    axes inside the box (a conditional of a Gaussian is a Gaussian, so this recurses down to a
    normal CDF difference in 1-D). Accurate to ~1e-9 absolute, far below any use of it. A value
    above ~1% means the image edge cuts the ERF, so every size metric depends on the input
    size: probe with a larger input.

    Example:
        >>> import numpy as np
        >>> round(border_mass(np.array([0.0]), np.array([[4.0]]), [64]), 3)  # centred on pixel 0
        0.401
        >>> cov = np.array([[9.0, 8.0], [8.0, 9.0]])  # rotated, cut at the corner
        >>> round(border_mass(np.array([2.0, 2.0]), cov, (64, 64)), 3)
        0.255
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    d = len(mean)
    cov = np.asarray(cov, dtype=np.float64).reshape(d, d)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
        return float("nan")
    lo = np.full(d, -0.5)
    hi = np.asarray(shape, dtype=np.float64) - 0.5
    # Union bound: the mass outside the box is at most the sum of the per-axis masses outside
    # the axis' range. When that is negligible, so is the answer (no quadrature needed).
    bound = sum(1.0 - axis_mass(mean, cov, shape))
    if bound < 1e-12:
        return max(bound, 0.0)
    inside = _box_mass(mean, (cov + cov.T) / 2, lo, hi)
    return float(min(max(1.0 - inside, 0.0), 1.0))


def axis_mass(mean: np.ndarray, cov: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Per axis, the marginal mass of ``N(mean, cov)`` inside ``[-0.5, n - 0.5]``.

    Their product is the mass inside the map for an axis-aligned Gaussian (an approximation
    for rotated ones; :func:`border_mass` is exact).

    Example:
        >>> axis_mass(np.array([-0.5, 10.0]), np.eye(2), (20, 21)).round(6).tolist()
        [0.5, 1.0]
    """
    means = np.asarray(mean, dtype=np.float64).tolist()
    variances = np.asarray(cov, dtype=np.float64).diagonal().tolist()
    out = []
    for mu, var, n in zip(means, variances, shape, strict=True):
        sd = math.sqrt(max(var, 0.0))
        if sd == 0.0:
            out.append(1.0 if -0.5 <= mu <= n - 0.5 else 0.0)
        else:
            out.append(_normal_cdf_diff(-0.5, n - 0.5, mu, sd))
    return np.array(out)


# Gauss-Legendre nodes on [-1, 1] for the box-mass quadrature. The integrand is a normal
# density (on at most +-_Z_MAX sd) times a smooth conditional CDF difference.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)
_Z_MAX = 9.0


def _box_mass(mean: np.ndarray, cov: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Mass of ``N(mean, cov)`` inside the box ``[lo, hi]`` (recursion over the axes)."""
    var = float(cov[0, 0])
    if len(mean) == 1 or not var > 0:
        if not var > 0:
            if not lo[0] <= mean[0] <= hi[0]:
                return 0.0
            if len(mean) == 1:
                return 1.0
            # A degenerate first axis pins x_0 at its mean; only the other axes are integrated.
            return _box_mass(mean[1:], cov[1:, 1:], lo[1:], hi[1:])
        return _normal_cdf_diff(lo[0], hi[0], float(mean[0]), math.sqrt(var))
    sd = math.sqrt(var)
    za = max((lo[0] - mean[0]) / sd, -_Z_MAX)
    zb = min((hi[0] - mean[0]) / sd, _Z_MAX)
    if not zb > za:
        return 0.0
    z = 0.5 * (zb - za) * _GL_NODES + 0.5 * (zb + za)
    w = 0.5 * (zb - za) * _GL_WEIGHTS * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    # Conditional of the remaining axes given x_0 = mean_0 + sd z.
    gain = cov[1:, 0] / var
    cond_cov = cov[1:, 1:] - np.outer(gain, cov[0, 1:])
    if len(mean) == 2:
        cond_sd = math.sqrt(max(float(cond_cov[0, 0]), 0.0))
        mu = mean[1] + gain[0] * sd * z
        if cond_sd == 0.0:
            part = ((mu >= lo[1]) & (mu <= hi[1])).astype(np.float64)
        else:
            k = 1.0 / (cond_sd * math.sqrt(2.0))
            part = 0.5 * (_erf((hi[1] - mu) * k) - _erf((lo[1] - mu) * k))
        return float(np.sum(w * part))
    parts = [_box_mass(mean[1:] + gain * sd * zi, cond_cov, lo[1:], hi[1:]) for zi in z]
    return float(np.sum(w * np.asarray(parts)))


def _normal_cdf_diff(lo: float, hi: float, mu: float, sd: float) -> float:
    k = 1.0 / (sd * math.sqrt(2.0))
    return 0.5 * (math.erf((hi - mu) * k) - math.erf((lo - mu) * k))


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; torch's is vectorised (math.erf per node costs 30x more).
    return torch.special.erf(torch.from_numpy(x)).numpy()


def radius_from_sigmas(sigmas: ArrayLike, factor: float = 2.0) -> float:
    """``factor`` times the geometric mean of the per-axis sigmas."""
    sig = np.asarray(sigmas, dtype=np.float64)
    if sig.size == 0 or not np.all(np.isfinite(sig)):
        return float("nan")
    if np.any(sig <= 0):
        return 0.0
    return float(factor * np.exp(np.mean(np.log(sig))))

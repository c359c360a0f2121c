"""Size metrics of an ERF map that do not assume a Gaussian shape.

Each function takes a non-negative float64 map with 1-3 spatial dims and pixel coordinates in
the map's axis order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from erf_callback.fit.grid import distance_sq

__all__ = [
    "DEFAULT_AREA_THRESHOLDS",
    "MetricConfig",
    "area_ratio",
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

    def __post_init__(self) -> None:
        if not self.radius_factor > 0:
            raise ValueError(f"radius_factor must be > 0; got {self.radius_factor}")
        if not 0 < self.energy_fraction <= 1:
            raise ValueError(f"energy_fraction must be in (0, 1]; got {self.energy_fraction}")
        for t in self.area_thresholds:
            if not 0 < t < 1:
                raise ValueError(f"area thresholds must be in (0, 1); got {t}")


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

    ``A = log10(erf + 1)``, ``A /= A.max()``; for ``i = 1, 2, ...`` take the centred square
    (cube in 3-D, interval in 1-D) of side ``2i + 1``; the first whose sum exceeds ``t`` of the
    total gives ``ratio = (2i + 1)^d / (H * W * ...)`` (capped at 1). The centre defaults to
    ``(H // 2, W // 2)`` as in the published script.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((9, 9)); a[3:6, 3:6] = 1.0  # all mass in the central 3x3
        >>> area_ratio(a, (0.5,))[0.5] == 9 / 81
        True
    """
    a = np.log10(erf + 1.0)
    top = float(a.max()) if a.size else 0.0
    if not top > 0 or not np.all(np.isfinite(a)):
        return {float(t): float("nan") for t in thresholds}
    a = a / top
    c = [n // 2 for n in a.shape] if center is None else [round(v) for v in center]
    # Integral image with a zero border: any axis-aligned box sum in 2^d lookups.
    s = a
    for axis in range(a.ndim):
        s = np.cumsum(s, axis=axis)
    s = np.pad(s, [(1, 0)] * a.ndim)
    total = float(s[(-1,) * a.ndim])
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
        side = 2 * int(i[hit[0]]) + 1 if hit.size else 2 * int(i[-1]) + 1
        out[float(t)] = min(side**a.ndim / size, 1.0)
    return out


def border_mass(mean: np.ndarray, cov: np.ndarray, shape: Sequence[int]) -> float:
    """Fraction of the fitted Gaussian's mass that lies outside the input.

    Per axis the marginal mass inside ``[-0.5, n - 0.5]`` (pixel edges) is exact; the product
    over axes is exact for axis-aligned Gaussians and a close approximation for rotated ones.
    A value above ~1% means the image edge cuts the ERF, so every size metric depends on the
    input size: probe with a larger input.

    Example:
        >>> import numpy as np
        >>> round(border_mass(np.array([0.0]), np.array([[4.0]]), [64]), 3)  # centred on pixel 0
        0.401
    """
    inside = 1.0
    for mu, var, n in zip(mean, np.diag(cov), shape, strict=True):
        if not math.isfinite(mu) or not math.isfinite(var):
            return float("nan")
        sd = math.sqrt(max(var, 0.0))
        if sd == 0.0:
            inside *= 1.0 if -0.5 <= mu <= n - 0.5 else 0.0
            continue
        z = 1.0 / (sd * math.sqrt(2.0))
        inside *= 0.5 * (math.erf((n - 0.5 - mu) * z) - math.erf((-0.5 - mu) * z))
    return max(0.0, 1.0 - inside)


def radius_from_sigmas(sigmas: ArrayLike, factor: float = 2.0) -> float:
    """``factor`` times the geometric mean of the per-axis sigmas."""
    sig = np.asarray(sigmas, dtype=np.float64)
    if sig.size == 0 or not np.all(np.isfinite(sig)):
        return float("nan")
    if np.any(sig <= 0):
        return 0.0
    return float(factor * np.exp(np.mean(np.log(sig))))

"""Truncated normals: what a cut takes from a Gaussian's moments, and how to put it back.

Two cuts matter to the fit: the image edge (a tail running out of the map) and the moment
window of the robust iteration (a Mahalanobis ball). Closed forms for d <= 3; no scipy.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["chi2_cdf", "normal_mass", "restore_edge_cut", "truncated_variance_factor"]

# Edge restoration only where the untruncated Gaussian keeps at least this share inside.
_MIN_VISIBLE = 0.75


def restore_edge_cut(
    a: np.ndarray, mass: float, mean: np.ndarray, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Undo the truncation of a Gaussian tail by the image edges, where the map shows one.

    Per axis, the visible mean and variance are taken as those of a truncated normal and
    untruncated; the mass measured in the two edge slabs is compared with what that Gaussian
    puts there. Their ratio weights the correction: 1 when they agree, falling to 0 both for
    maps that stay clear of the edges (compact maps keep their exact moments) and for edges
    holding far more than a Gaussian tail. Cuts that would leave less than 75% of the Gaussian
    visible are not restored: there a tail cannot be told from a flat band.

    Example:
        >>> import numpy as np
        >>> a = np.exp(-0.5 * (np.arange(40.0) - 3.0) ** 2 / 9.0)  # sigma 3, cut 1 sd left
        >>> vis = (a * np.arange(40.0)).sum() / a.sum()
        >>> var = (a * (np.arange(40.0) - vis) ** 2).sum() / a.sum()
        >>> mean, cov = restore_edge_cut(a, a.sum(), np.array([vis]), np.array([[var]]))
        >>> round(float(np.sqrt(cov[0, 0])), 2)
        3.0
    """
    mean, cov = mean.copy(), cov.copy()
    scale = np.ones(a.ndim)
    for i, n in enumerate(a.shape):
        var = cov[i, i]
        if not var > 0:
            continue
        others = tuple(k for k in range(a.ndim) if k != i)
        marginal = a.sum(axis=others) if others else a
        measured = float(marginal[0] + marginal[-1])
        if measured <= 0.0:
            continue
        mu = mean[i]
        lo, hi = -0.5, n - 0.5
        true_mu, true_var = _untruncate(mu, var, lo, hi)
        sd = math.sqrt(true_var)
        inside = normal_mass(lo, hi, true_mu, sd)
        if inside < _MIN_VISIBLE:
            # Cut this hard, a Gaussian tail cannot be told from a flat band (the middle of an
            # ever wider Gaussian): keep the visible moments; border_mass flags such maps.
            continue
        edge = normal_mass(lo, lo + 1, true_mu, sd) + normal_mass(hi - 1, hi, true_mu, sd)
        predicted = mass / inside * edge if inside > 0 else 0.0
        if not predicted > 1e-12 * mass:
            continue
        # 1 where the edges hold what the untruncated Gaussian predicts; back to 0 both for no
        # edge mass (compact maps) and for far more than a tail (a band or box cut by the edge,
        # which is not a Gaussian to extrapolate).
        ratio = measured / predicted
        weight = ratio if ratio <= 1.0 else max(0.0, 2.0 - ratio)
        mean[i] += weight * (true_mu - mu)
        new_var = var + weight * (true_var - var)
        scale[i] = math.sqrt(new_var / var)
    return mean, cov * np.outer(scale, scale)


def normal_mass(lo: float, hi: float, mu: float, sd: float) -> float:
    """Mass of ``N(mu, sd^2)`` in ``[lo, hi]``.

    Example:
        >>> round(normal_mass(-1.0, 1.0, 0.0, 1.0), 4)
        0.6827
    """
    z = 1.0 / (sd * math.sqrt(2.0))
    return 0.5 * (math.erf((hi - mu) * z) - math.erf((lo - mu) * z))


def _untruncate(mu_obs: float, var_obs: float, lo: float, hi: float) -> tuple[float, float]:
    """Mean and variance of the normal whose truncation to [lo, hi] has the observed moments.

    Fixed-point iteration on the truncated-normal moment formulas (mild truncation converges
    in a few steps; a hard cut is left as observed).
    """
    mu, var = mu_obs, var_obs
    for _ in range(50):
        sd = math.sqrt(var)
        alpha, beta = (lo - mu) / sd, (hi - mu) / sd
        z = normal_mass(lo, hi, mu, sd)
        if not z > 1e-6:
            return mu_obs, var_obs
        pa, pb = _phi(alpha), _phi(beta)
        shift = (pa - pb) / z
        ratio = 1.0 + (alpha * pa - beta * pb) / z - shift * shift
        new_mu = mu_obs - sd * shift
        new_var = var_obs / ratio if ratio > 0 else var_obs
        done = abs(new_var - var) <= 1e-14 * var and abs(new_mu - mu) <= 1e-12 * (1 + abs(mu))
        mu, var = new_mu, new_var
        if done:
            break
    return mu, var


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def truncated_variance_factor(d: int, r2: float) -> float:
    """``Var`` of a d-D Gaussian truncated to Mahalanobis radius ``sqrt(r2)`` over ``Var``.

    Equals ``P(chi2_{d+2} <= r2) / P(chi2_d <= r2)``; closed forms for d <= 3 avoid scipy.

    Example:
        >>> round(truncated_variance_factor(1, 1.0), 4)  # a normal cut at +-1 sd
        0.2911
    """
    return chi2_cdf(d + 2, r2) / chi2_cdf(d, r2)


def chi2_cdf(k: int, x: float) -> float:
    """``P(chi2_k <= x)`` in closed form (any k; used for k <= 5).

    Example:
        >>> round(chi2_cdf(2, 2.0), 4)  # 1 - exp(-1)
        0.6321
    """
    if k % 2 == 0:
        # P(chi2_{2m} <= x) = 1 - exp(-x/2) sum_{i<m} (x/2)^i / i!
        h, term, total = x / 2.0, 1.0, 0.0
        for i in range(k // 2):
            if i:
                term *= h / i
            total += term
        return 1.0 - math.exp(-h) * total
    # odd k: erf term plus the series sqrt(2x/pi) exp(-x/2) sum x^i / (1*3*...*(2i+1))
    s, term, total = math.sqrt(x), 1.0, 0.0
    for i in range((k - 1) // 2):
        if i:
            term *= x / (2 * i + 1)
        total += term
    return math.erf(s / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * s * math.exp(-x / 2) * total

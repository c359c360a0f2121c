"""Measuring a map: the Gaussian fit, the size metrics, and the pixel-grid numerics they share.

numpy, with compiled (numba) kernels for the 2-D model fit where numba loads (see
:mod:`erf_callback.fit.kernels`); torch tensors are accepted and converted. Nothing here knows
about models.
"""

from erf_callback.fit.gaussian import FitMethod, GaussianFit, fit_gaussian
from erf_callback.fit.metrics import (
    MetricConfig,
    area_ratio,
    border_mass,
    energy_radius,
    radius_from_sigmas,
)

__all__ = [
    "FitMethod",
    "GaussianFit",
    "MetricConfig",
    "area_ratio",
    "border_mass",
    "energy_radius",
    "fit_gaussian",
    "radius_from_sigmas",
]

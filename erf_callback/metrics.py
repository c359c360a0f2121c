"""Compatibility alias of :mod:`erf_callback.fit.metrics` (the path documented in 0.1)."""

from erf_callback.fit.metrics import (
    DEFAULT_AREA_THRESHOLDS,
    MetricConfig,
    area_ratio,
    border_mass,
    energy_radius,
    radius_from_sigmas,
)

__all__ = [
    "DEFAULT_AREA_THRESHOLDS",
    "MetricConfig",
    "area_ratio",
    "border_mass",
    "energy_radius",
    "radius_from_sigmas",
]

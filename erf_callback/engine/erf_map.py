"""The measured ERF of one layer and the metrics derived from it."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from erf_callback.fit.gaussian import GaussianFit, fit_gaussian
from erf_callback.fit.metrics import (
    MetricConfig,
    area_ratio,
    border_mass,
    energy_radius,
    radius_from_sigmas,
)
from erf_callback.trf import RFGeometry
from erf_callback.warnings import ERFWarning

__all__ = ["ERFMap", "ERFMaps", "Status", "axis_suffixes"]

Status = Literal["ok", "nonfinite", "zero"]

_AXIS_NAMES = {1: ("",), 2: ("y", "x"), 3: ("z", "y", "x")}


def axis_suffixes(spatial_dims: int) -> tuple[str, ...]:
    """Metric-name suffixes per axis: ``("",)`` in 1-D, ``("_y", "_x")`` in 2-D, ... ."""
    return tuple(f"_{a}" if a else "" for a in _AXIS_NAMES[spatial_dims])


@dataclass(eq=False)
class ERFMap:
    """The effective receptive field of one probed unit, averaged over the probe samples.

    Attributes:
        grad: float64 CPU tensor shaped like the input's spatial dims: the mean over samples of
            the input-gradient of the probed unit, reduced over input channels (non-negative).
        layer: the probed layer's name (``"output"`` for the model output).
        position: the probed unit's index in the layer's output grid.
        output_shape: the layer output's ``(C, *spatial)``.
        location: the probed unit's centre in input-pixel coordinates (centre of its TRF).
        geometry: the theoretical receptive field, or None if it could not be traced.
        num_samples: how many inputs were averaged.
        reduction: ``"abs"`` or ``"replknet"``.
        status: ``"ok"``, ``"nonfinite"`` (NaN/Inf gradients) or ``"zero"`` (all-zero map).
        config: the choices behind :meth:`metrics`.

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.ReLU())
        >>> m = compute_erf(net, torch.randn(4, 1, 16, 16))["output"]
        >>> sorted(m.metrics())[:3]
        ['area_ratio@0.2', 'area_ratio@0.3', 'area_ratio@0.5']
    """

    grad: torch.Tensor
    layer: str
    position: tuple[int, ...]
    output_shape: tuple[int, ...]
    location: tuple[float, ...]
    geometry: RFGeometry | None = None
    num_samples: int = 0
    reduction: str = "abs"
    status: Status = "ok"
    config: MetricConfig = field(default_factory=MetricConfig)

    def __repr__(self) -> str:
        """One line: what was probed and the map's shape, never the map's values.

        Example:
            >>> import torch
            >>> m = ERFMap(torch.zeros(8, 8, dtype=torch.float64), "layer4", (2, 2), (16, 4, 4),
            ...            (4.0, 4.0), num_samples=3)
            >>> m
            ERFMap(layer='layer4', map=(8, 8) float64, position=(2, 2), location=(4.0, 4.0), \
output_shape=(16, 4, 4), trf=(nan, nan), num_samples=3, reduction='abs', status='ok')
        """
        dtype = str(self.grad.dtype).removeprefix("torch.")
        trf = tuple(round(float(v), 3) for v in self.trf)
        return (
            f"ERFMap(layer={self.layer!r}, map={tuple(self.grad.shape)} {dtype}, "
            f"position={tuple(self.position)}, location={tuple(self.location)}, "
            f"output_shape={tuple(self.output_shape)}, trf={trf}, "
            f"num_samples={self.num_samples}, reduction={self.reduction!r}, status={self.status!r})"
        )

    @property
    def spatial_dims(self) -> int:
        return self.grad.dim()

    @cached_property
    def _array(self) -> np.ndarray:
        return self.grad.numpy()

    def numpy(self) -> np.ndarray:
        """The map as a float64 NumPy array (shares memory with :attr:`grad`)."""
        return self._array

    @cached_property
    def gaussian(self) -> GaussianFit:
        """The Gaussian fit with ``config.fit_method`` (computed once, then cached)."""
        with warnings.catch_warnings():
            # The status already says why an invalid map has no fit; one warning is enough.
            warnings.simplefilter("ignore", ERFWarning)
            return fit_gaussian(self._array, self.config.fit_method)  # type: ignore[arg-type]

    @property
    def trf(self) -> tuple[float, ...]:
        """Theoretical receptive field width per axis, in input pixels (NaN: not traced).

        Unclipped: the width of the window the unit sees with the network's padding, so it can
        exceed the input (435 px for a ResNet-18's last stage, also on a 224x224 input) and is
        ``inf`` for global operations. Clip it yourself (``min(trf, size)``) for the part of
        the window that holds image pixels.
        """
        if self.geometry is None:
            return (float("nan"),) * self.spatial_dims
        return self.geometry.width

    def metrics(self) -> dict[str, float]:
        """Flat ``name -> float`` dict, ready for a logger; keys are documented in docs/metrics.md.

        When :attr:`status` is not ``"ok"`` every value is NaN except ``trf_*``, which depend
        on the architecture only.
        """
        d = self.spatial_dims
        suffixes = axis_suffixes(d)
        cfg = self.config
        fit = self.gaussian
        ok = self.status == "ok" and fit.ok
        nan = float("nan")
        out: dict[str, float] = {}
        sig = fit.sigma if ok else np.full(d, nan)
        for s, v in zip(suffixes, sig, strict=True):
            out[f"sigma{s}"] = float(v)
        radius = radius_from_sigmas(sig, cfg.radius_factor) if ok else nan
        out["radius"] = radius
        out["gaussian_r2"] = float(fit.r2) if ok else nan
        out["center_offset"] = (
            float(np.linalg.norm(fit.mean - np.asarray(self.location))) if ok else nan
        )
        out["energy_radius"] = (
            energy_radius(self._array, fit.mean, cfg.energy_fraction, max(fit.floor, 0.0))
            if ok
            else nan
        )
        ratios = (
            area_ratio(self._array, cfg.area_thresholds, self._area_center())
            if ok
            else {float(t): nan for t in cfg.area_thresholds}
        )
        for t, v in ratios.items():
            out[f"area_ratio@{t:g}"] = v
        trf = self.trf
        for s, v in zip(suffixes, trf, strict=True):
            out[f"trf{s}"] = float(v)
        out["erf_trf_ratio"] = _erf_trf_ratio(radius, trf)
        out["border_mass"] = border_mass(fit.mean, fit.cov, self.grad.shape) if ok else nan
        if ok and out["border_mass"] > cfg.border_warning:
            warnings.warn(
                f"The ERF of {self.layer!r} reaches the input's border "
                f"({100 * out['border_mass']:.1f}% of the fitted Gaussian lies outside the "
                f"{tuple(self.grad.shape)} input): its size metrics depend on the input size. "
                "Probe with larger inputs to measure it whole.",
                ERFWarning,
                stacklevel=2,
            )
        return out

    def _area_center(self) -> tuple[int, ...] | None:
        """Centre of the area-ratio squares: the unit's location, or None for RepLKNet's."""
        if self.config.area_center == "replknet":
            return None  # (H // 2, W // 2), as their script, whichever unit was probed
        return tuple(
            min(max(math.floor(v + 0.5), 0), n - 1)
            for v, n in zip(self.location, self.grad.shape, strict=True)
        )


class ERFMaps(dict[str, ERFMap]):
    """What :func:`~erf_callback.compute_erf` returns: the probed layers' maps by name, in the
    order they were asked for.

    A plain ``dict`` in every way; in a Jupyter notebook it displays as the maps' annotated
    heatmaps side by side (:mod:`erf_callback.notebook`).

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3) for _ in range(3)])
        >>> maps = compute_erf(net, torch.randn(4, 1, 16, 16), layers=["0", "2"])
        >>> isinstance(maps, dict), list(maps)
        (True, ['0', '2'])
    """


def _erf_trf_ratio(radius: float, trf: tuple[float, ...]) -> float:
    """ERF diameter ``2 * radius`` over the geometric-mean TRF width (0 for a global TRF)."""
    if not math.isfinite(radius) or any(math.isnan(t) for t in trf):
        return float("nan")
    if any(math.isinf(t) for t in trf):
        return 0.0
    return 2.0 * radius / math.exp(sum(math.log(t) for t in trf) / len(trf))

"""``ProbeConfig``: what is probed and how, shared by :func:`compute_erf` and ``ERFMonitor``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from erf_callback.engine.transforms import OutputTransform
from erf_callback.fit.metrics import MetricConfig

__all__ = ["DEFAULT", "OUTPUT", "Default", "ProbeConfig", "Reduction"]

#: Name of the model output in ``layers`` (``layers=None`` probes it).
OUTPUT = "output"

Reduction = Literal["abs", "replknet"]
Position = Sequence[int] | Mapping[str, Sequence[int]]
Channels = int | Sequence[int]
Transforms = OutputTransform | Mapping[str, OutputTransform]


class Default:
    """Marker of a keyword argument left at its default (so ``None`` can be a real value)."""

    _instance: Default | None = None

    def __new__(cls) -> Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<default>"


#: The single :class:`Default` marker.
DEFAULT = Default()


@dataclass(frozen=True)
class ProbeConfig:
    """Which unit is probed, how its gradient is reduced, and how the map is measured.

    One frozen object carries every probe option, so :func:`~erf_callback.compute_erf` and
    :class:`~erf_callback.ERFMonitor` take exactly the same choices. Their keyword arguments of
    the same names override the fields of a given config.

    Attributes:
        position: the probed unit's index in the layer's output grid (default: the centre,
            ``size // 2`` per axis). A mapping gives one position per layer.
        channels: output channels summed into the probed unit (default: all).
        reduction: ``"abs"`` (sum over input channels of absolute gradients) or ``"replknet"``
            (unit = sum of ReLU of channels; map = sum of ReLU of the gradient, as in
            RepLKNet's erf/visualize_erf.py).
        output_transform: turns a layer's raw output (tuple, dict, ViT tokens) into a tensor
            ``(N, C, *spatial)``; one callable for all layers or a mapping per layer.
        chunk_size: samples per forward/backward; bounds peak memory. ``None``: all at once.
        metrics: metric choices (radius factor, energy fraction, fit method, ...).

    Example:
        >>> from erf_callback import ProbeConfig
        >>> cfg = ProbeConfig(channels=[0, 1], reduction="replknet")
        >>> cfg.replace(chunk_size=8).chunk_size, cfg.chunk_size
        (8, 32)
    """

    position: Position | None = None
    channels: Channels | None = None
    reduction: Reduction = "abs"
    output_transform: Transforms | None = None
    chunk_size: int | None = 32
    metrics: MetricConfig = field(default_factory=MetricConfig)

    def __post_init__(self) -> None:
        if self.reduction not in ("abs", "replknet"):
            raise ValueError(f"reduction must be 'abs' or 'replknet'; got {self.reduction!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None; got {self.chunk_size!r}")
        if not isinstance(self.metrics, MetricConfig):
            raise TypeError(f"metrics must be a MetricConfig; got {type(self.metrics).__name__}")

    def replace(self, **changes: Any) -> ProbeConfig:
        """A copy with ``changes``; values that are :data:`DEFAULT` are left out."""
        given = {k: v for k, v in changes.items() if not isinstance(v, Default)}
        return dataclasses.replace(self, **given) if given else self

"""Theoretical receptive field (TRF) by tracing the geometry of a forward pass.

INTERFACE STUB: the implementation is being written. The engine relies on exactly this API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class AxisRF:
    """Receptive-field geometry of one tensor axis, in input-pixel coordinates.

    Output index ``i`` along this axis sees input pixels
    ``[start + i * jump, start + i * jump + size - 1]``.

    Attributes:
        start: input coordinate of the first pixel seen by output index 0 (may be negative:
            padding).
        jump: input pixels between neighbouring output indices (product of strides).
        size: TRF width in input pixels; ``math.inf`` when the unit sees the whole input
            (global pooling, attention, fully connected).
        exact: False when a fallback rule (unknown resampling op, adaptive pooling with uneven
            windows, interpolation) was used anywhere on the way.
    """

    start: float = 0.0
    jump: float = 1.0
    size: float = 1.0
    exact: bool = True

    def center(self, index: float) -> float:
        """Input coordinate of the centre of output index ``index``'s receptive field."""
        if math.isinf(self.size):
            return self.start + index * self.jump
        return self.start + index * self.jump + (self.size - 1) / 2


@dataclass(frozen=True)
class RFGeometry:
    """Receptive-field geometry of a spatial tensor: one :class:`AxisRF` per spatial axis."""

    axes: tuple[AxisRF, ...]

    @property
    def width(self) -> tuple[float, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def exact(self) -> bool:
        return all(a.exact for a in self.axes)

    def center(self, position: tuple[int, ...]) -> tuple[float, ...]:
        return tuple(a.center(p) for a, p in zip(self.axes, position, strict=True))


class ReceptiveFieldTracer(TorchFunctionMode):
    """Propagates :class:`AxisRF` geometry through every torch function call of a forward.

    Use as a context manager around a forward pass that starts at ``root`` (N, C, *spatial).
    Never raises from inside the forward: an op it cannot handle only degrades geometry.
    """

    def __init__(self, root: torch.Tensor) -> None:
        super().__init__()
        raise NotImplementedError

    def geometry(self, tensor: torch.Tensor) -> RFGeometry | None:
        """Geometry of ``tensor`` laid out (N, C, *spatial); None if it was never traced."""
        raise NotImplementedError

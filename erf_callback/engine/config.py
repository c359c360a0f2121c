"""``ProbeConfig``: what is probed and how, shared by :func:`compute_erf` and ``ERFMonitor``."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from erf_callback.engine.transforms import OutputTransform
from erf_callback.fit.metrics import MetricConfig

__all__ = [
    "AUTO",
    "DEFAULT",
    "OUTPUT",
    "ChunkSize",
    "Default",
    "ProbeConfig",
    "Reduction",
    "as_python",
    "is_int",
]

#: Name of the model output in ``layers`` (``layers=None`` probes it).
OUTPUT = "output"

Reduction = Literal["abs", "replknet"]
Position = Sequence[int] | Mapping[str, Sequence[int]]
Channels = int | Sequence[int]
Transforms = OutputTransform | Mapping[str, OutputTransform]
#: ``chunk_size="auto"``: chosen from the probe's activation size and ``memory_budget``.
AUTO: Final = "auto"
ChunkSize = int | Literal["auto"]


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
        chunk_size: samples per forward/backward. ``"auto"`` (default): as many as fit in
            ``memory_budget``, from the measured activation size of one sample's truncated
            forward; on CUDA an out-of-memory error halves the chunk and retries. An int: that
            many samples. ``None``: all at once.
        memory_budget: bytes of saved activations one chunk may use with ``chunk_size="auto"``.
            ``None``: 64 MiB on CPU (capped at a quarter of the available RAM), half of the
            free device memory on CUDA. See docs/engine.md, "Memory".
        optimize: let the probe run the model faster without changing any result: inputs in
            ``channels_last`` with ``channels_last`` copies of the conv weights (2-D conv nets
            on CPU, and on CUDA GPUs whose tensor cores run the dtype) and eval-mode BatchNorm
            folded into a copy of the preceding convolution.
            The model is never modified; ``False`` runs its modules exactly as written.
        metrics: metric choices (radius factor, energy fraction, fit method, ...).

    Example:
        >>> from erf_callback import ProbeConfig
        >>> cfg = ProbeConfig(channels=[0, 1], reduction="replknet")
        >>> cfg.replace(chunk_size=8).chunk_size, cfg.chunk_size
        (8, 'auto')
    """

    position: Position | None = None
    channels: Channels | None = None
    reduction: Reduction = "abs"
    output_transform: Transforms | None = None
    chunk_size: ChunkSize | None = AUTO
    memory_budget: int | None = None
    optimize: bool = True
    metrics: MetricConfig = field(default_factory=MetricConfig)

    def __post_init__(self) -> None:
        if self.reduction not in ("abs", "replknet"):
            raise ValueError(f"reduction must be 'abs' or 'replknet'; got {self.reduction!r}")
        if (
            self.chunk_size is not None
            and self.chunk_size != AUTO
            and not _positive_int(self.chunk_size)
        ):
            raise ValueError(
                f"chunk_size must be a positive int, 'auto' or None (all at once); got "
                f"{self.chunk_size!r}"
            )
        if self.memory_budget is not None and not _positive_int(self.memory_budget):
            raise ValueError(
                f"memory_budget must be a positive int (bytes) or None; got {self.memory_budget!r}"
            )
        if not isinstance(self.optimize, bool):
            raise ValueError(f"optimize must be True or False; got {self.optimize!r}")
        if self.channels is not None:
            object.__setattr__(self, "channels", as_python(self.channels))
            _check_channels(self.channels)
        if isinstance(self.position, Mapping):
            for name, pos in self.position.items():
                _check_position(pos, f"position[{name!r}]")
        elif self.position is not None:
            _check_position(self.position, "position")
        transforms: Any = self.output_transform  # checked here, whatever the annotation says
        named = transforms.items() if isinstance(transforms, Mapping) else [("", transforms)]
        for name, transform in named:
            if transform is not None and not callable(transform):
                what = f"output_transform[{name!r}]" if name else "output_transform"
                raise ValueError(
                    f"{what} must be a callable (layer output -> tensor (N, C, *spatial)), a "
                    f"mapping of layer names to callables, or None; got {transform!r}"
                )
        if not isinstance(self.metrics, MetricConfig):
            raise TypeError(f"metrics must be a MetricConfig; got {type(self.metrics).__name__}")

    def replace(self, **changes: Any) -> ProbeConfig:
        """A copy with ``changes``; values that are :data:`DEFAULT` are left out.

        ``metrics=None`` means the default :class:`MetricConfig` (as ``config=None`` /
        ``metric_config=None`` do in the functions that take these options).
        """
        given = {k: v for k, v in changes.items() if not isinstance(v, Default)}
        if "metrics" in given and given["metrics"] is None:
            given["metrics"] = MetricConfig()
        return dataclasses.replace(self, **given) if given else self


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count; 2.0 and True do not).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def _check_channels(channels: Any) -> None:
    allowed = (
        "channels must be an int or a non-empty sequence of distinct ints (channel indices, "
        "negative ones allowed), or None for all channels"
    )
    if is_int(channels):
        return
    items = _as_list(channels)
    if items is None:
        raise ValueError(f"{allowed}; got {channels!r}")
    if not items or not all(is_int(c) for c in items):
        raise ValueError(f"{allowed}; got {channels!r}")
    if len({int(c) for c in items}) != len(items):
        raise ValueError(f"{allowed}; got duplicates in {channels!r} (each would count twice)")


def _check_position(position: Any, what: str) -> None:
    if position is None:
        return
    items = _as_list(position)
    if items is None:
        raise ValueError(
            f"{what} must be a sequence of ints (one index per spatial axis); got {position!r}"
        )
    if not all(is_int(p) for p in items):
        raise ValueError(
            f"{what} must hold integer indices (one per spatial axis, e.g. (7, 7)); got "
            f"{tuple(items)!r}. Non-integers are not rounded: pass the unit's index."
        )


def as_python(value: Any) -> Any:
    """The Python number or list a NumPy array or tensor holds (``.tolist()``); anything else
    unchanged. One channel picked by ``logits.argmax()`` is then that channel, and an array
    of steps a list of steps.

    Example:
        >>> import torch
        >>> as_python(torch.tensor(3)), as_python(torch.tensor([1, 2])), as_python((3,))
        (3, [1, 2], (3,))
    """
    return value.tolist() if callable(getattr(value, "tolist", None)) else value


def _as_list(value: Any) -> list[Any] | None:
    """The items of a sequence, NumPy array or tensor (as Python scalars); None otherwise."""
    items = as_python(value)
    if items is not value:  # numpy arrays, tensors
        return items if isinstance(items, list) else None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    return list(value)

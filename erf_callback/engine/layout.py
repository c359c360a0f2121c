"""How the inputs' axes map to the ``(N, C, *spatial)`` layout that a probe runs in.

Every probe runs on inputs laid out ``(N, C, *spatial)``: the TRF tracer's root, the sum over
input channels and the map's shape all read them so. Inputs that a model takes in another
layout are brought to it, and the model gets them back as they were at every forward:

* ``"standard"``: ``(N, C, *spatial)``, as given.
* ``"no_channel"``: ``(N, *spatial)`` for a model that adds the channel axis itself
  (grayscale ``(N, H, W)``, raw audio ``(N, L)``): a channel axis of 1 is added, and
  squeezed away for the model.
* ``"channels_last"``: ``(N, *spatial, C)`` for a model that moves the channels to axis 1
  itself (NumPy and PIL images ``(N, H, W, C)``, an RL environment's observations): the
  channel axis moves to 1, and back for the model.

* :class:`Reshaped`: inputs that the model reshapes itself before its first spatial layer
  (flat images ``(N, 784)`` viewed as ``(N, 1, 28, 28)``): reshaped so, and back for the
  model.

``compute_erf`` finds the layout on its first, traced sample (the probed layers have one
spatial axis more than ``(N, C, *spatial)`` gives: no channel axis; their spatial axes do not
all come from the inputs' axes 2, 3, ..., but do from 1, 2, ...: channels last; another rank,
and the first spatial layer gets as many elements per sample as the inputs hold: reshaped)
and remembers it per model in :data:`LAYOUTS`.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from erf_callback.trf.geometry import TensorRF

__all__ = [
    "LAYOUTS",
    "Layout",
    "LayoutMemory",
    "Reshaped",
    "carries_every_spatial_axis",
    "to_model",
    "to_probe",
]


class Reshaped(NamedTuple):
    """Inputs that the model reshapes itself: each sample, ``given`` as the user holds it
    (flat MNIST: ``(784,)``), is ``probed`` as the model's first spatial layer receives it
    (``(1, 28, 28)``). Row-major order is kept both ways, so each map pixel is one input
    element."""

    given: tuple[int, ...]
    probed: tuple[int, ...]


Layout = Literal["standard", "no_channel", "channels_last"] | Reshaped


def to_probe(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x`` as the user gave it, viewed in the probe's ``(N, C, *spatial)`` layout.

    Example:
        >>> to_probe(torch.zeros(2, 8, 6, 3), "channels_last").shape
        torch.Size([2, 3, 8, 6])
    """
    if isinstance(layout, Reshaped):
        return x.reshape(x.shape[0], *layout.probed)
    if layout == "no_channel":
        return x.unsqueeze(1)
    if layout == "channels_last":
        return x.movedim(-1, 1)
    return x


def to_model(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A fresh copy of the probe's chunk ``x`` in the layout the model takes (the model may
    write into its input; the chunk is a view of the caller's inputs and the gradient's leaf).

    Example:
        >>> to_model(torch.zeros(2, 3, 8, 6), "channels_last").shape
        torch.Size([2, 8, 6, 3])
    """
    if isinstance(layout, Reshaped):
        return x.clone().reshape(x.shape[0], *layout.given)
    if layout == "no_channel":
        return x.clone().squeeze(1)
    if layout == "channels_last":
        return x.movedim(1, -1).clone(memory_format=torch.contiguous_format)
    return x.clone()


def carries_every_spatial_axis(rec: TensorRF | None, spatial_dims: int) -> bool:
    """Whether every spatial axis of a traced ``(N, C, *spatial)`` output comes from a
    spatial axis of the probe's inputs (each from a different one): what a model on inputs
    in the probe's layout gives. An output axis that comes from the inputs' channel axis
    (a model that permutes its input) or that the tracer lost (an op it cannot follow)
    breaks it."""
    if rec is None or len(rec.dims) != spatial_dims + 2:
        return False
    axes = [d[0] for d in rec.dims[2:] if d is not None]
    return len(axes) == spatial_dims and len(set(axes)) == spatial_dims


class LayoutMemory:
    """Per model (held weakly), the layout found for an input shape and probed layers, so
    that the next probe starts in it instead of finding it out again."""

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Layout]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _key(x: torch.Tensor, names: Sequence[str]) -> Hashable:
        return tuple(x.shape[1:]), tuple(names)

    def remember(
        self, net: nn.Module, x: torch.Tensor, names: Sequence[str], layout: Layout
    ) -> None:
        """Note that ``net`` takes inputs shaped like ``x`` (as the user gave them) in
        ``layout`` when ``names`` are probed."""
        self._known.setdefault(net, {})[self._key(x, names)] = layout

    def recall(self, net: nn.Module, x: torch.Tensor, names: Sequence[str]) -> Layout | None:
        """The layout remembered for these inputs and layers, if any."""
        return self._known.get(net, {}).get(self._key(x, names))


#: The layouts found so far (see :class:`LayoutMemory`).
LAYOUTS = LayoutMemory()

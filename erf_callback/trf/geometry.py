"""Receptive-field geometry: the public types and the algebra the per-op rules are written in.

:class:`AxisRF` describes one axis (``start``, ``jump``, ``size``, ``exact``) and
:class:`RFGeometry` a whole spatial tensor. The tracer keeps one :class:`TensorRF` record per
traced tensor: for each tensor dim either nothing or the input spatial axis the dim indexes with
its :class:`AxisRF`, plus "extra" dependencies on input axes that no dim carries any more
(after a global mean every value depends on the whole input).

The functions below are the whole algebra: a sliding window (conv, pool, pad, slicing,
interpolation), pinning one index, making a dim global, reducing it, and unions of fields. Rules
combine them; none of them knows about torch functions.

Example:
    >>> conv = window(AxisRF(), offset=-1, step=2, span=2)  # k=3, s=2, p=1
    >>> conv
    AxisRF(start=-1.0, jump=2.0, size=3.0, exact=True)
    >>> RFGeometry((conv, conv)).box((2, 0))
    ((3.0, 5.0), (-1.0, 1.0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

__all__ = [
    "GLOBAL_INEXACT",
    "INF",
    "AxisRF",
    "DimRF",
    "RFGeometry",
    "TensorRF",
    "absorb",
    "build",
    "centred_global",
    "combine",
    "contract",
    "merge_extra",
    "pin",
    "reduced",
    "union",
    "window",
]


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

    Example:
        >>> AxisRF(start=-1.0, jump=2.0, size=5.0).center(3)
        7.0
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
    """Receptive-field geometry of a spatial tensor: one :class:`AxisRF` per spatial axis.

    Example:
        >>> geo = RFGeometry((AxisRF(size=3.0), AxisRF(size=math.inf, exact=False)))
        >>> geo.width, geo.exact
        ((3.0, inf), False)
    """

    axes: tuple[AxisRF, ...]

    @property
    def width(self) -> tuple[float, ...]:
        """TRF width in input pixels per input spatial axis (``math.inf`` for global).

        Rounded to 9 decimals: resampling by non-dyadic factors (an upsampling by 3) carries
        jumps like 1/3, and 3.9999999999999996 is 4 to anyone reading the metric.
        """
        return tuple(a.size if math.isinf(a.size) else round(a.size, 9) for a in self.axes)

    @property
    def exact(self) -> bool:
        """True when no fallback rule was used on any axis."""
        return all(a.exact for a in self.axes)

    def center(self, position: tuple[int, ...]) -> tuple[float, ...]:
        """Input coordinates of the TRF centre of the unit at spatial ``position``."""
        return tuple(a.center(p) for a, p in zip(self.axes, position, strict=True))

    def box(self, position: Sequence[int]) -> tuple[tuple[float, float], ...]:
        """First and last input pixel of the TRF of the unit at ``position``, per axis.

        The box is unclipped: it may start before pixel 0 or end after the last pixel (and is
        infinite on axes with a global receptive field).

        Example:
            >>> RFGeometry((AxisRF(jump=2.0, start=-1.0, size=5.0),)).box((3,))
            ((5.0, 9.0),)
        """
        return tuple(
            (a.start + p * a.jump, a.start + p * a.jump + a.size - 1)
            for a, p in zip(self.axes, position, strict=True)
        )


# ---------------------------------------------------------------------------------------------
# Per-tensor records.
# ---------------------------------------------------------------------------------------------

DimRF = tuple[int, AxisRF]
"""``(input spatial axis, geometry)`` carried by one tensor dim."""

INF = math.inf
GLOBAL_INEXACT = AxisRF(0.0, 0.0, INF, False)
"""A dependency on the whole of an axis whose exact extent was lost (fallback rules)."""


class TensorRF(NamedTuple):
    """Geometry of one traced tensor.

    Attributes:
        dims: per tensor dim, ``(input_axis, AxisRF)`` or None (batch, channels, tokens...).
        extra: per input axis not carried by any dim, the window every value depends on
            (``jump`` is meaningless there and kept at 0; ``size=inf`` for global context).

    Example:
        >>> root = TensorRF((None, None, (0, AxisRF()), (1, AxisRF())), {})
        >>> [d is None for d in root.dims]
        [True, True, False, False]
    """

    dims: tuple[DimRF | None, ...]
    extra: Mapping[int, AxisRF]


# ---------------------------------------------------------------------------------------------
# AxisRF algebra.
# ---------------------------------------------------------------------------------------------


def window(rf: AxisRF, offset: float, step: float, span: float, exact: bool = True) -> AxisRF:
    """Sliding-window transform: output ``i`` reads inputs ``[i*step + offset, ... + span]``.

    This single rule covers conv, pooling, padding (``span=0``), slicing and interpolation.
    For a global field the start is kept at the window centre so that ``center()`` stays
    meaningful.

    Example:
        >>> window(window(AxisRF(), -1, 1, 2), -1, 1, 2)  # two 3x3 convs, padding 1
        AxisRF(start=-2.0, jump=1.0, size=5.0, exact=True)
    """
    if math.isinf(rf.size):
        return AxisRF(
            rf.start + (offset + span / 2) * rf.jump, rf.jump * step, INF, rf.exact and exact
        )
    return AxisRF(
        rf.start + offset * rf.jump, rf.jump * step, rf.size + span * rf.jump, rf.exact and exact
    )


def pin(rf: AxisRF, index: float) -> AxisRF:
    """Field of a single index along a dim, seen identically by every output (jump 0).

    Example:
        >>> pin(AxisRF(start=-1.0, jump=2.0, size=3.0), 2)
        AxisRF(start=3.0, jump=0.0, size=3.0, exact=True)
    """
    return AxisRF(rf.start + index * rf.jump, 0.0, rf.size, rf.exact)


def centred_global(rf: AxisRF, exact: bool | None = None) -> AxisRF:
    """Make every index of a dim global, keeping each index's centre (softmax along a dim).

    Example:
        >>> centred_global(AxisRF(start=-1.0, size=3.0))
        AxisRF(start=0.0, jump=1.0, size=inf, exact=True)
    """
    start = rf.start if math.isinf(rf.size) else rf.start + (rf.size - 1) / 2
    return AxisRF(start, rf.jump, INF, rf.exact if exact is None else exact)


def reduced(rf: AxisRF, n: int, exact: bool = True) -> AxisRF:
    """Field of the single unit left after reducing ``n`` units of ``rf`` (keepdim).

    Example:
        >>> reduced(AxisRF(), 8)  # global mean over 8 pixels: centred on pixel 3.5
        AxisRF(start=3.5, jump=8.0, size=inf, exact=True)
    """
    half = (n - 1) * rf.jump / 2
    centre = rf.start + half if math.isinf(rf.size) else rf.start + half + (rf.size - 1) / 2
    return AxisRF(centre, rf.jump * n, INF, rf.exact and exact)


def union(a: AxisRF | None, b: AxisRF, n: int) -> AxisRF:
    """Union of two fields of the same dim of length ``n`` (an AxisRF superset of both).

    Example:
        >>> union(AxisRF(start=-1.0, size=3.0), AxisRF(start=-2.0, size=5.0), 8)
        AxisRF(start=-2.0, jump=1.0, size=5.0, exact=True)
    """
    if a is None or a == b:
        return b
    exact = a.exact and b.exact
    a_inf, b_inf = math.isinf(a.size), math.isinf(b.size)
    if a_inf or b_inf:
        # Keep the index -> centre mapping of a field that still has a real grid.
        if a_inf and b_inf:
            base = a if a.jump != 0 or b.jump == 0 else b
            return AxisRF(base.start, base.jump, INF, exact)
        finite = b if a_inf else a
        return centred_global(finite, exact)
    if a.jump == b.jump:
        lo = min(a.start, b.start)
        hi = max(a.start + a.size, b.start + b.size)
        return AxisRF(lo, a.jump, hi - lo, exact)
    # Different jumps: no affine form. Use the larger jump and widen the window so that it
    # contains both fields at every index; the bounds are linear in the index, so checking the
    # first and last index suffices.
    jump = max(a.jump, b.jump)
    last = max(n - 1, 0)
    los, his = [], []
    for f in (a, b):
        for i in (0, last):
            los.append(f.start + i * (f.jump - jump))
            his.append(f.start + f.size + i * (f.jump - jump))
    lo = min(los)
    return AxisRF(lo, jump, max(his) - lo, False)


def merge_extra(extra: dict[int, AxisRF], axis: int, rf: AxisRF) -> None:
    """Add a dependency of every value on ``rf`` along input ``axis`` to ``extra``."""
    extra[axis] = union(extra.get(axis), rf, 1)


def contract(
    dims: list[DimRF | None], extra: dict[int, AxisRF], k: int, n: int, exact: bool = True
) -> None:
    """Dim ``k`` (length ``n``) is summed over: its axis becomes a global extra dependency."""
    dm = dims[k]
    if dm is not None:
        a, rf = dm
        merge_extra(extra, a, replace(reduced(rf, n, exact), jump=0.0))
        dims[k] = None


def build(
    dims: Sequence[DimRF | None], extra: Mapping[int, AxisRF], shape: Sequence[int]
) -> TensorRF:
    """Normalise: an extra dependency on an axis that a dim carries is folded into that dim.

    Example:
        >>> ctx = AxisRF(start=3.5, jump=0.0, size=INF)  # e.g. x + x.mean(-1, keepdim=True)
        >>> rec = build([(0, AxisRF(size=3.0))], {0: ctx}, [8])
        >>> rec.dims[0][1], dict(rec.extra)  # every index global, centred where it was
        (AxisRF(start=1.0, jump=1.0, size=inf, exact=True), {})
    """
    if not extra:
        return TensorRF(tuple(dims), {})
    out = list(dims)
    left: dict[int, AxisRF] = {}
    for a, e in extra.items():
        carried = False
        for k, dm in enumerate(out):
            if dm is not None and dm[0] == a:
                out[k] = (a, union(dm[1], e, shape[k]))
                carried = True
        if not carried:
            left[a] = e
    return TensorRF(tuple(out), left)


def absorb(rec: TensorRF, extra: dict[int, AxisRF], exact: bool = False) -> None:
    """Fold a whole record into global extra dependencies (unknown mixing of all dims)."""
    for a, e in rec.extra.items():
        merge_extra(extra, a, e if exact else replace(e, exact=False))
    for dm in rec.dims:
        if dm is not None:
            merge_extra(
                extra, dm[0], GLOBAL_INEXACT if not exact else AxisRF(0.0, 0.0, INF, dm[1].exact)
            )


def combine(
    items: Iterable[tuple[Sequence[DimRF | None], Sequence[int]]],
    out_shape: Sequence[int],
    extra: dict[int, AxisRF],
) -> TensorRF:
    """Broadcasting union of several inputs' dims, each aligned from the right with the output.

    Args:
        items: per input, its dims and shape (already rearranged for the op if needed).
        out_shape: output shape.
        extra: extra dependencies collected so far (updated in place).

    Returns:
        The output's record.

    Example:
        >>> conv = [(0, AxisRF(start=-1.0, size=3.0))]
        >>> combine([(conv, [8]), ([(0, AxisRF())], [8])], [8], {}).dims  # conv(x) + x
        ((0, AxisRF(start=-1.0, jump=1.0, size=3.0, exact=True)),)
    """
    n = len(out_shape)
    contrib: list[list[DimRF]] = [[] for _ in range(n)]
    for dims, shape in items:
        off = n - len(dims)
        for k, dm in enumerate(dims):
            if dm is None:
                continue
            a, rf = dm
            j = k + off
            if j < 0:  # a dim the output does not have: lost in an unknown way
                merge_extra(extra, a, GLOBAL_INEXACT)
                continue
            size_in, size_out = shape[k], out_shape[j]
            if size_in == size_out:
                contrib[j].append(dm)
            elif size_in == 1:  # broadcast: every output index sees the same unit
                contrib[j].append((a, pin(rf, 0)))
            else:  # unknown resampling along this dim
                jump = rf.jump * size_in / size_out if size_out else rf.jump
                contrib[j].append((a, AxisRF(rf.start, jump, rf.size, False)))
    out_dims: list[DimRF | None] = [None] * n
    for j, cs in enumerate(contrib):
        if not cs:
            continue
        axis = cs[0][0]
        if any(c[0] != axis for c in cs):
            # Two different input axes land on one dim (x + x.transpose(-1, -2)): give up.
            for c in cs:
                merge_extra(extra, c[0], GLOBAL_INEXACT)
            continue
        rf = cs[0][1]
        for c in cs[1:]:
            rf = union(rf, c[1], out_shape[j])
        out_dims[j] = (axis, rf)
    return build(out_dims, extra, out_shape)

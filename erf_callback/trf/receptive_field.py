"""Theoretical receptive field (TRF) by tracing the geometry of a forward pass.

:class:`ReceptiveFieldTracer` is a :class:`~torch.overrides.TorchFunctionMode`: every torch
function called during the traced forward (``torch.*``, ``torch.nn.functional.*`` and
``Tensor`` methods) is seen once, at the top level, and the tracer propagates an affine
"which input pixels does this unit see" description from the input (``root``) to each tensor
derived from it. Per tensor it keeps, for each tensor dim, either nothing or the input spatial
axis the dim indexes together with an :class:`AxisRF`; plus, per input axis, an "extra"
:class:`AxisRF` for dependencies that are not attached to any dim (e.g. after a global mean the
spatial dims are gone but every value depends on the whole input).

Rules, from most to least exact:

* **Exact (closed form)**: ``conv{1,2,3}d`` (int/tuple/'same'/'valid' padding, dilation,
  stride), ``conv_transpose{1,2,3}d`` with stride 1, ``max/avg/lp_pool{1,2,3}d`` (incl.
  ``return_indices`` and dilation), ``adaptive_{avg,max}_pool`` when the input size is divisible
  by the output size or the output size is 1 (global), ``F.pad`` (any mode; the TRF ignores
  where border padding takes its values from, as is conventional), ``pixel_unshuffle``,
  ``Tensor.unfold``, basic slicing/indexing, ``split``/``chunk``/``narrow``/``select``,
  permutations (``permute``/``transpose``/``movedim``/``.mT``...), reshapes that keep the
  spatial dims, reductions over spatial dims (``mean``/``amax``/``norm``/... → global),
  ``softmax``/``sort``/``topk`` along a spatial dim (global along it), ``matmul``/``linear``/
  ``einsum``/attention (contracted spatial dims → global), and broadcasting elementwise ops:
  each output dim is the union (hull) of the inputs' receptive fields on that dim.
* **Marked non-exact** (``exact=False``): ``conv_transpose`` with stride > 1 (the set of
  contributing inputs is periodic, not affine; we report the affine hull), interpolation
  (``jump *= in/out``, size grows by ``(taps - 1) * jump`` with taps = 1 nearest, 2 linear,
  4 cubic; the window is centred on PyTorch's continuous source coordinate, so ``center()``
  is the sampling position; exact only for nearest down-sampling by an integer factor and
  linear/cubic down-sampling by an even integer without ``align_corners``), adaptive pooling
  with uneven bins, ``pixel_shuffle``, ``cat`` along a spatial dim, unions of fields with different
  jumps, and any unknown op that changes the size of a dim carrying geometry (resampling
  fallback: ``jump *= in/out``, size kept).
* **Global fallback** (``size=inf``, ``exact=False``): reshapes that merge or split spatial
  dims or move spatial content into other dims (ViT patch tokens, flatten before ``Linear``),
  advanced indexing, ``flip``/``roll``/``gather``/``index_select`` along a spatial dim, FFTs,
  ``F.unfold``/``F.fold``/``grid_sample``, and any op whose bookkeeping raised. Anything
  computed from such a tensor inherits the global dependency, so when ViT tokens are reshaped
  back to a ``(N, C, h, w)`` grid, :meth:`ReceptiveFieldTracer.geometry` reports ``size=inf``
  for every axis (never ``None``), with centres on the natural ``h x w`` grid over the input.

Normalisation layers (batch/layer/group/instance norm) are treated as elementwise: their
statistics are not counted as receptive field, which is the usual TRF convention. Unknown ops
that keep the shape are also treated as elementwise; only ops listed above are known to mix
positions.
"""

from __future__ import annotations

import math
import operator
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["AxisRF", "RFGeometry", "ReceptiveFieldTracer"]


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
        """TRF width in input pixels per input spatial axis (``math.inf`` for global)."""
        return tuple(a.size for a in self.axes)

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
# Per-tensor records and AxisRF algebra.
# ---------------------------------------------------------------------------------------------

_Dim = tuple[int, AxisRF]  # (input spatial axis, geometry) carried by one tensor dim
_INF = math.inf
# A dependency on the whole of an axis whose exact extent we lost (fallback rules).
_GLOBAL_INEXACT = AxisRF(0.0, 0.0, _INF, False)


class _Rec(NamedTuple):
    """Geometry of one traced tensor.

    Attributes:
        dims: per tensor dim, ``(input_axis, AxisRF)`` or None (batch, channels, tokens...).
        extra: per input axis not carried by any dim, the window every value depends on
            (``jump`` is meaningless there and kept at 0; ``size=inf`` for global context).
    """

    dims: tuple[_Dim | None, ...]
    extra: Mapping[int, AxisRF]


def _window(rf: AxisRF, offset: float, step: float, span: float, exact: bool = True) -> AxisRF:
    """Sliding-window transform: output ``i`` reads inputs ``[i*step + offset, ... + span]``.

    This single rule covers conv, pooling, padding (``span=0``), slicing and interpolation.
    For a global field the start is kept at the window centre so that ``center()`` stays
    meaningful.
    """
    if math.isinf(rf.size):
        return AxisRF(
            rf.start + (offset + span / 2) * rf.jump, rf.jump * step, _INF, rf.exact and exact
        )
    return AxisRF(
        rf.start + offset * rf.jump, rf.jump * step, rf.size + span * rf.jump, rf.exact and exact
    )


def _pin(rf: AxisRF, index: float) -> AxisRF:
    """Field of a single index along a dim, seen identically by every output (jump 0)."""
    return AxisRF(rf.start + index * rf.jump, 0.0, rf.size, rf.exact)


def _centred_global(rf: AxisRF, exact: bool | None = None) -> AxisRF:
    """Make every index of a dim global, keeping each index's centre (softmax along a dim)."""
    start = rf.start if math.isinf(rf.size) else rf.start + (rf.size - 1) / 2
    return AxisRF(start, rf.jump, _INF, rf.exact if exact is None else exact)


def _reduced(rf: AxisRF, n: int, exact: bool = True) -> AxisRF:
    """Field of the single unit left after reducing ``n`` units of ``rf`` (keepdim)."""
    half = (n - 1) * rf.jump / 2
    centre = rf.start + half if math.isinf(rf.size) else rf.start + half + (rf.size - 1) / 2
    return AxisRF(centre, rf.jump * n, _INF, rf.exact and exact)


def _union(a: AxisRF | None, b: AxisRF, n: int) -> AxisRF:
    """Union of two fields of the same dim of length ``n`` (an AxisRF superset of both)."""
    if a is None or a == b:
        return b
    exact = a.exact and b.exact
    a_inf, b_inf = math.isinf(a.size), math.isinf(b.size)
    if a_inf or b_inf:
        # Keep the index -> centre mapping of a field that still has a real grid.
        if a_inf and b_inf:
            base = a if a.jump != 0 or b.jump == 0 else b
            return AxisRF(base.start, base.jump, _INF, exact)
        finite = b if a_inf else a
        return _centred_global(finite, exact)
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


def _merge_extra(extra: dict[int, AxisRF], axis: int, rf: AxisRF) -> None:
    extra[axis] = _union(extra.get(axis), rf, 1)


def _contract(
    dims: list[_Dim | None], extra: dict[int, AxisRF], k: int, n: int, exact: bool = True
) -> None:
    """Dim ``k`` (length ``n``) is summed over: its axis becomes a global extra dependency."""
    dm = dims[k]
    if dm is not None:
        a, rf = dm
        _merge_extra(extra, a, replace(_reduced(rf, n, exact), jump=0.0))
        dims[k] = None


def _build(dims: Sequence[_Dim | None], extra: Mapping[int, AxisRF], shape: Sequence[int]) -> _Rec:
    """Normalise: an extra dependency on an axis that a dim carries is folded into that dim."""
    if not extra:
        return _Rec(tuple(dims), {})
    dims = list(dims)
    left: dict[int, AxisRF] = {}
    for a, e in extra.items():
        carried = False
        for k, dm in enumerate(dims):
            if dm is not None and dm[0] == a:
                dims[k] = (a, _union(dm[1], e, shape[k]))
                carried = True
        if not carried:
            left[a] = e
    return _Rec(tuple(dims), left)


def _absorb(rec: _Rec, extra: dict[int, AxisRF], exact: bool = False) -> None:
    """Fold a whole record into global extra dependencies (unknown mixing of all dims)."""
    for a, e in rec.extra.items():
        _merge_extra(extra, a, e if exact else replace(e, exact=False))
    for dm in rec.dims:
        if dm is not None:
            _merge_extra(
                extra, dm[0], _GLOBAL_INEXACT if not exact else AxisRF(0.0, 0.0, _INF, dm[1].exact)
            )


def _combine(
    items: Iterable[tuple[Sequence[_Dim | None], Sequence[int]]],
    out_shape: Sequence[int],
    extra: dict[int, AxisRF],
) -> _Rec:
    """Broadcasting union of several inputs' dims, each aligned from the right with the output.

    Args:
        items: per input, its dims and shape (already rearranged for the op if needed).
        out_shape: output shape.
        extra: extra dependencies collected so far (updated in place).
    """
    n = len(out_shape)
    contrib: list[list[_Dim]] = [[] for _ in range(n)]
    for dims, shape in items:
        off = n - len(dims)
        for k, dm in enumerate(dims):
            if dm is None:
                continue
            a, rf = dm
            j = k + off
            if j < 0:  # a dim the output does not have: lost in an unknown way
                _merge_extra(extra, a, _GLOBAL_INEXACT)
                continue
            size_in, size_out = shape[k], out_shape[j]
            if size_in == size_out:
                contrib[j].append(dm)
            elif size_in == 1:  # broadcast: every output index sees the same unit
                contrib[j].append((a, _pin(rf, 0)))
            else:  # unknown resampling along this dim
                jump = rf.jump * size_in / size_out if size_out else rf.jump
                contrib[j].append((a, AxisRF(rf.start, jump, rf.size, False)))
    out_dims: list[_Dim | None] = [None] * n
    for j, cs in enumerate(contrib):
        if not cs:
            continue
        axis = cs[0][0]
        if any(c[0] != axis for c in cs):
            # Two different input axes land on one dim (x + x.transpose(-1, -2)): give up.
            for c in cs:
                _merge_extra(extra, c[0], _GLOBAL_INEXACT)
            continue
        rf = cs[0][1]
        for c in cs[1:]:
            rf = _union(rf, c[1], out_shape[j])
        out_dims[j] = (axis, rf)
    return _build(out_dims, extra, out_shape)


# ---------------------------------------------------------------------------------------------
# Argument helpers.
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _arg(
    args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None
) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _ntuple(v: Any, n: int) -> tuple[Any, ...]:
    if isinstance(v, (list, tuple, torch.Size)):
        v = tuple(v)
        return v * n if len(v) == 1 else v
    return (v,) * n


def _dims_arg(dim: Any, ndim: int) -> list[int] | None:
    """Normalise a ``dim`` argument (int or sequence) to non-negative ints; None = all."""
    if dim is None or dim is _MISSING:
        return None
    if isinstance(dim, int) and not isinstance(dim, bool):
        return [dim % ndim] if ndim else []
    if isinstance(dim, (list, tuple, torch.Size)):
        if len(dim) == 0:
            return None
        if all(isinstance(d, int) and not isinstance(d, bool) for d in dim):
            return [d % ndim for d in dim]
    raise _UnhandledError


class _UnhandledError(Exception):
    """Raised by a rule that cannot interpret its arguments: use the conservative fallback."""


class _Skip:
    """Handler result: the outputs do not depend on the inputs' values (``zeros_like``)."""


_SKIP = _Skip()

_Result = _Rec | Sequence[_Rec | None] | _Skip | None
_Handler = Callable[["ReceptiveFieldTracer", Any, tuple, dict, Any, list[torch.Tensor]], _Result]
_HANDLERS: dict[str, _Handler] = {}


def _register(*names: str) -> Callable[[_Handler], _Handler]:
    def deco(fn: _Handler) -> _Handler:
        for name in names:
            _HANDLERS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# The tracer.
# ---------------------------------------------------------------------------------------------


class ReceptiveFieldTracer(TorchFunctionMode):
    """Propagates :class:`AxisRF` geometry through every torch function call of a forward.

    Use as a context manager around a forward pass that starts at ``root`` (N, C, *spatial).
    Never raises from inside the forward: an op it cannot handle only degrades geometry.

    Records are keyed by ``id(tensor)`` and hold a weak reference that is checked on lookup,
    so a recycled id never aliases a dead tensor and the tracer does not keep activations
    alive (which matters under ``no_grad``).

    Attributes:
        degraded_ops: names of ops whose bookkeeping raised and fell back to "global,
            non-exact" (for debugging; empty in normal operation).
    """

    def __init__(self, root: torch.Tensor) -> None:
        super().__init__()
        if root.ndim < 3:
            raise ValueError(f"root must be (N, C, *spatial), got shape {tuple(root.shape)}")
        self._root = root
        self._nd = root.ndim - 2
        self._root_size = tuple(int(s) for s in root.shape[2:])
        self._recs: dict[int, tuple[weakref.ref, _Rec]] = {}
        self.degraded_ops: set[str] = set()
        unit = AxisRF(0.0, 1.0, 1.0, True)
        self._store(root, _Rec((None, None, *((k, unit) for k in range(self._nd))), {}))

    # -- bookkeeping -------------------------------------------------------------------------

    def _store(self, t: torch.Tensor, rec: _Rec) -> None:
        self._recs[id(t)] = (weakref.ref(t), rec)

    def _lookup(self, t: Any) -> _Rec | None:
        if not isinstance(t, torch.Tensor):
            return None
        e = self._recs.get(id(t))
        if e is None or e[0]() is not t:
            return None
        return e[1]

    def _sources(self, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, _Rec]]:
        """Traced tensors among the arguments (and inside list/tuple arguments, e.g. cat)."""
        # Hot path (runs for every op): inline lookups, no helper calls.
        recs, tensor = self._recs, torch.Tensor
        found = []
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, tensor):
                e = recs.get(id(a))
                if e is not None and e[0]() is a:
                    found.append((a, e[1]))
            elif isinstance(a, (list, tuple)):
                for b in a:
                    e = recs.get(id(b))
                    if e is not None and e[0]() is b:
                        found.append((b, e[1]))
        return found

    def _generic(self, srcs: Sequence[tuple[torch.Tensor, _Rec]], out: torch.Tensor) -> _Rec:
        if len(srcs) == 1 and srcs[0][0].shape == out.shape:
            return srcs[0][1]  # the common elementwise case: share the record
        extra: dict[int, AxisRF] = {}
        for _, r in srcs:
            for a, e in r.extra.items():
                _merge_extra(extra, a, e)
        return _combine(((r.dims, t.shape) for t, r in srcs), out.shape, extra)

    # -- TorchFunctionMode -------------------------------------------------------------------

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        # The user's op runs outside any try block: its own exceptions (including a hook
        # aborting the forward) must propagate unchanged.
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) or out is None or isinstance(out, (tuple, list)):
            try:
                self._propagate(func, args, kwargs, out)
            except Exception:  # never break the user's forward
                self._degrade(func, args, kwargs, out)
        return out

    def _propagate(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", None)
        if name == "__get__":  # property access: x.T, x.mT, x.data ...
            name = "attr:" + getattr(getattr(func, "__self__", None), "__name__", "")
        if out is None:
            if name == "__setitem__" and args:
                target, value = args[0], _arg(args, kwargs, 2, "value")
                srcs = [(t, r) for t in (target, value) if (r := self._lookup(t)) is not None]
                srcs += [(t, r) for t, r in self._sources(args[1:2], {}) if t is not value]
                if srcs:
                    self._store(target, self._generic(srcs, target))
            return
        if isinstance(out, torch.Tensor):
            outs = [out]
        else:
            outs = [t for t in out if isinstance(t, torch.Tensor)]
            if not outs:
                return
        srcs = self._sources(args, kwargs)
        if not srcs:
            return
        handler = _HANDLERS.get(name) if name is not None else None
        if handler is None and name and name.startswith("_") and not name.startswith("__"):
            handler = _HANDLERS.get(name.lstrip("_"))
        if handler is None and name and name.startswith("fft_"):
            handler = _HANDLERS["<mix>"]
        res: _Result = None
        if handler is not None:
            try:
                res = handler(self, func, args, kwargs, out, outs)
            except _UnhandledError:
                res = _HANDLERS["<mix>"](self, func, args, kwargs, out, outs)
        if isinstance(res, _Skip):
            return
        if res is None:
            recs: Sequence[_Rec | None] = [self._generic(srcs, t) for t in outs]
        elif isinstance(res, _Rec):
            recs = [res] * len(outs)
        else:
            recs = res
        for t, r in zip(outs, recs, strict=True):
            self._store(t, r if r is not None else self._generic(srcs, t))

    def _degrade(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Conservative fallback after a bug: outputs depend globally on every traced axis."""
        try:
            self.degraded_ops.add(str(getattr(func, "__name__", func)))
            outs = (
                [out]
                if isinstance(out, torch.Tensor)
                else [t for t in (out or ()) if isinstance(t, torch.Tensor)]
            )
            extra: dict[int, AxisRF] = {}
            for _, r in self._sources(args, kwargs):
                _absorb(r, extra)
            if extra:
                for t in outs:
                    self._store(t, _Rec((None,) * t.ndim, extra))
        except Exception:  # last line of defence
            pass

    # -- public query ------------------------------------------------------------------------

    def geometry(self, tensor: torch.Tensor) -> RFGeometry | None:
        """Geometry of ``tensor`` laid out (N, C, *spatial); None if it was never traced.

        Axis ``k`` of the result describes input spatial axis ``k`` as indexed by tensor dim
        ``2 + k``. A dependency not attached to that dim (global pooling, tokens reshaped back
        to a grid) is reported as ``size=inf`` with centres on the natural grid that splits the
        input evenly into the tensor's spatial size.
        """
        rec = self._lookup(tensor)
        if rec is None:
            return None
        axes = []
        for k in range(self._nd):
            d = 2 + k
            dm = rec.dims[d] if d < len(rec.dims) else None
            if dm is not None and dm[0] == k:
                axes.append(dm[1])
                continue
            elsewhere = [x[1] for x in rec.dims if x is not None and x[0] == k]
            if elsewhere:  # the axis sits on another dim: not the layout we were promised
                axes.append(replace(elsewhere[0], exact=False))
                continue
            e = rec.extra.get(k, _GLOBAL_INEXACT)
            if math.isinf(e.size):
                m = int(tensor.shape[d]) if d < tensor.ndim else 1
                jump = self._root_size[k] / max(m, 1)
                axes.append(AxisRF((jump - 1) / 2, jump, _INF, e.exact))
            else:
                axes.append(e)
        return RFGeometry(tuple(axes))


# ---------------------------------------------------------------------------------------------
# Rules. Each returns a record (or one per output), None for the generic rule, or _SKIP.
# ---------------------------------------------------------------------------------------------


def _input_rec(
    tr: ReceptiveFieldTracer, args: tuple, kwargs: dict, name: str = "input"
) -> tuple[torch.Tensor, _Rec]:
    x = _arg(args, kwargs, 0, name)
    if not isinstance(x, torch.Tensor):
        x = _arg(args, kwargs, 0, "self")
    rec = tr._lookup(x)
    if rec is None:
        raise _UnhandledError  # only a secondary operand is traced (e.g. a computed conv weight)
    return x, rec


def _other_extras(
    tr: ReceptiveFieldTracer, args: tuple, kwargs: dict, x: torch.Tensor
) -> dict[int, AxisRF]:
    """Secondary traced operands (weights computed from the input...) count as global."""
    extra: dict[int, AxisRF] = {}
    for t, r in tr._sources(args, kwargs):
        if t is not x:
            _absorb(r, extra)
    for a, e in tr._lookup(x).extra.items():
        _merge_extra(extra, a, e)
    return extra


def _spatial_windows(
    tr: ReceptiveFieldTracer,
    args: tuple,
    kwargs: dict,
    out: torch.Tensor,
    nd: int,
    windows: Sequence[tuple[float, float, float, bool]],
    mix_channels: bool = True,
) -> _Rec:
    """Apply one sliding-window transform per trailing spatial dim (conv, pool, pad...)."""
    x, rec = _input_rec(tr, args, kwargs)
    if out.ndim != x.ndim or x.ndim < nd:
        raise _UnhandledError
    dims = list(rec.dims)
    extra = _other_extras(tr, args, kwargs, x)
    base = x.ndim - nd
    for i, (off, step, span, exact) in enumerate(windows):
        dm = dims[base + i]
        if dm is not None:
            dims[base + i] = (dm[0], _window(dm[1], off, step, span, exact))
    if mix_channels and base >= 1:
        _contract(dims, extra, base - 1, x.shape[base - 1])
    return _build(dims, extra, out.shape)


_CONV_RE = re.compile(r"conv(_transpose)?([123])d")


@_register(
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
)
def _h_conv(tr, func, args, kwargs, out, outs):
    name = func.__name__.lstrip("_")
    w = _arg(args, kwargs, 1, "weight")
    nd = w.ndim - 2
    if name == "convolution":
        transposed = bool(_arg(args, kwargs, 6, "transposed", False))
        stride, padding, dilation = (
            _arg(args, kwargs, i, n, dflt)
            for i, n, dflt in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
        )
    else:
        transposed = _CONV_RE.fullmatch(name).group(1) is not None
        stride = _arg(args, kwargs, 3, "stride", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _arg(args, kwargs, 7 if transposed else 5, "dilation", 1)
    ks = tuple(int(k) for k in w.shape[2:])
    st, dl = _ntuple(stride, nd), _ntuple(dilation, nd)
    if padding == "valid":
        pd: tuple = (0,) * nd
    elif padding == "same":
        # PyTorch pads d*(k-1) in total, the smaller half on the left.
        pd = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl, strict=True))
    else:
        pd = _ntuple(padding, nd)
    windows = []
    for k, s, p, d in zip(ks, st, pd, dl, strict=True):
        span = (k - 1) * d
        if transposed:
            # out o = i*s - p + t*d: input i feeds o for i in [(o+p-span)/s, (o+p)/s].
            windows.append(((p - span) / s, 1 / s, span / s, s == 1))
        else:
            windows.append((-p, s, span, True))
    return _spatial_windows(tr, args, kwargs, out, nd, windows)


_POOL_RE = re.compile(r"(max|avg|lp)_pool([123])d(?:_with_indices)?")


@_register(
    *(
        f"{kind}_pool{n}d{suffix}"
        for kind in ("max", "avg", "lp")
        for n in (1, 2, 3)
        for suffix in ("", "_with_indices")
        if suffix == "" or kind == "max"
    )
)
def _h_pool(tr, func, args, kwargs, out, outs):
    kind, nd = _POOL_RE.fullmatch(func.__name__.lstrip("_")).groups()
    nd = int(nd)
    if kind == "lp":  # lp_pool(input, norm_type, kernel_size, stride, ceil_mode)
        ks = _arg(args, kwargs, 2, "kernel_size")
        stride = _arg(args, kwargs, 3, "stride")
        padding, dilation = 0, 1
    else:
        ks = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride")
        padding = _arg(args, kwargs, 3, "padding", 0)
        dilation = _arg(args, kwargs, 4, "dilation", 1) if kind == "max" else 1
    ks = _ntuple(ks, nd)
    # stride=None (F.*) or [] (torch.* builtins) means "same as kernel_size".
    st = (
        ks
        if stride is None or (isinstance(stride, (list, tuple)) and not stride)
        else (_ntuple(stride, nd))
    )
    windows = [
        (-p, s, (k - 1) * d, True)
        for k, s, p, d in zip(ks, st, _ntuple(padding, nd), _ntuple(dilation, nd), strict=True)
    ]
    res = _spatial_windows(tr, args, kwargs, outs[0], nd, windows, mix_channels=False)
    return [res] * len(outs)


def _adaptive_window(n: int, m: int) -> tuple[float, float, float, bool]:
    """Window of adaptive pooling from ``n`` to ``m`` units (PyTorch's floor/ceil bins)."""
    if n % m == 0:
        k = n // m
        return (0, k, k - 1, True)
    win = max(math.ceil((i + 1) * n / m) - math.floor(i * n / m) for i in range(m))
    return (0, n / m, win - 1, False)


@_register(
    *(
        f"adaptive_{kind}_pool{n}d{suffix}"
        for kind in ("avg", "max")
        for n in (1, 2, 3)
        for suffix in ("", "_with_indices")
    )
)
def _h_adaptive(tr, func, args, kwargs, out, outs):
    nd = int(re.search(r"([123])d", func.__name__).group(1))
    x, rec = _input_rec(tr, args, kwargs)
    o = outs[0]
    dims = list(rec.dims)
    base = x.ndim - nd
    for i in range(nd):
        n, m = int(x.shape[base + i]), int(o.shape[base + i])
        dm = dims[base + i]
        if dm is None or m == 0:
            continue
        if m == 1:  # global pooling
            dims[base + i] = (dm[0], _reduced(dm[1], n))
        else:
            dims[base + i] = (dm[0], _window(dm[1], *_adaptive_window(n, m)))
    res = _build(dims, _other_extras(tr, args, kwargs, x), o.shape)
    return [res] * len(outs)


@_register(
    "pad",
    "constant_pad_nd",
    *(f"{m}_pad{n}d" for m in ("reflection", "replication", "circular") for n in (1, 2, 3)),
)
def _h_pad(tr, func, args, kwargs, out, outs):
    x = _arg(args, kwargs, 0, "input")
    pad = [int(p) for p in _arg(args, kwargs, 1, "pad")]
    nd = len(pad) // 2
    # pad lists (left, right) pairs starting from the LAST dim.
    windows = [(-pad[2 * (nd - 1 - i)], 1, 0, True) for i in range(nd)]
    if x.ndim < nd:
        raise _UnhandledError
    return _spatial_windows(tr, args, kwargs, out, nd, windows, mix_channels=False)


_TAPS = {"nearest": 1, "nearest-exact": 1, "linear": 2, "bilinear": 2, "trilinear": 2, "bicubic": 4}


@_register("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def _h_interpolate(tr, func, args, kwargs, out, outs):
    name = func.__name__
    x, _ = _input_rec(tr, args, kwargs)
    nd = x.ndim - 2
    scale = _arg(args, kwargs, 2, "scale_factor")
    if name == "upsample_nearest":
        mode, align, recompute, antialias = "nearest", None, None, False
    elif name == "upsample_bilinear":
        mode, align, recompute, antialias = "bilinear", True, None, False
    else:
        mode = _arg(args, kwargs, 3, "mode", "nearest")
        align = _arg(args, kwargs, 4, "align_corners")
        recompute = _arg(args, kwargs, 5, "recompute_scale_factor")
        antialias = bool(_arg(args, kwargs, 6, "antialias", False))
    scales = _ntuple(scale, nd) if scale is not None else (None,) * nd
    windows = []
    for i in range(nd):
        n, m = int(x.shape[2 + i]), int(out.shape[2 + i])
        if mode == "area":
            windows.append(_adaptive_window(n, m) if m else (0, 1, 0, False))
            continue
        taps = _TAPS.get(mode)
        if taps is None:
            raise _UnhandledError
        # PyTorch samples with 1/scale_factor when given (and not recomputed), else in/out.
        r = 1 / scales[i] if scales[i] is not None and not recompute else n / max(m, 1)
        integer_step = r >= 1 and float(r).is_integer()
        if mode.startswith("nearest"):
            # src = floor(a + o*r): affine in o, hence exact, when r is an integer. Otherwise
            # centre on the continuous position that floor() rounds ('nearest-exact' rounds
            # (o + 0.5) * r - 0.5 to the nearest pixel).
            exact_mode = mode == "nearest-exact"
            a = 0.5 * r if exact_mode else 0.0
            off = math.floor(a) if integer_step else (a - 0.5 if exact_mode else a)
            exact = integer_step
        else:
            # Continuous source coordinate src = a + o*r; the kernel's taps straddle it, so
            # centring the window on src keeps center() on the sampling position.
            if align:
                r, a = ((n - 1) / (m - 1) if m > 1 else 0.0), 0.0
            else:
                a = 0.5 * r - 0.5
            off = a - (taps - 1) / 2
            # Down-sampling by an even integer without align_corners samples exactly halfway
            # between pixels: every tap has a non-zero weight and the window is affine.
            exact = integer_step and not align and r % 2 == 0
        span = taps - 1
        if antialias and r > 1:  # the filter support is stretched by the scale
            off, span, exact = a - (taps * r - 1) / 2, taps * r - 1, False
        windows.append((off, r, span, exact))
    return _spatial_windows(tr, args, kwargs, out, nd, windows, mix_channels=False)


@_register("pixel_unshuffle", "pixel_shuffle")
def _h_pixel_shuffle(tr, func, args, kwargs, out, outs):
    r = int(
        _arg(args, kwargs, 1, "downscale_factor" if "un" in func.__name__ else "upscale_factor")
    )
    if func.__name__ == "pixel_unshuffle":  # an r x r / r space-to-depth: a k=s=r window
        windows = [(0, r, r - 1, True)] * 2
    else:  # depth-to-space: output o reads input floor(o / r)
        windows = [(0, 1 / r, 0, False)] * 2
    return _spatial_windows(tr, args, kwargs, out, 2, windows)


def _perm_rec(rec: _Rec, perm: Sequence[int]) -> _Rec:
    return _Rec(tuple(rec.dims[p] for p in perm), rec.extra)


@_register(
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "movedim",
    "moveaxis",
    "t",
    "adjoint",
    "attr:T",
    "attr:mT",
    "attr:H",
    "attr:mH",
)
def _h_permute(tr, func, args, kwargs, out, outs):
    x, rec = _input_rec(tr, args, kwargs)
    n = x.ndim
    name = func.__name__
    if name == "__get__":
        name = func.__self__.__name__
    if name == "permute":
        dims = list(args[1:]) or kwargs.get("dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        perm = [d % n for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims", "t", "adjoint", "mT", "mH", "T", "H"):
        if name in ("t", "T", "H"):
            perm = list(range(n))[::-1]
        elif name in ("adjoint", "mT", "mH"):
            perm = [*range(n - 2), n - 1, n - 2]
        else:
            d0 = _arg(args, kwargs, 1, "dim0", kwargs.get("axis0"))
            d1 = _arg(args, kwargs, 2, "dim1", kwargs.get("axis1"))
            d0, d1 = d0 % n, d1 % n
            perm = list(range(n))
            perm[d0], perm[d1] = d1, d0
    else:  # movedim(source, destination)
        src = _ntuple(_arg(args, kwargs, 1, "source"), 1)
        dst = _ntuple(_arg(args, kwargs, 2, "destination"), 1)
        src, dst = [s % n for s in src], [d % n for d in dst]
        perm_opt: list[int | None] = [None] * n
        for s, d in zip(src, dst, strict=True):
            perm_opt[d] = s
        rest = iter(i for i in range(n) if i not in src)
        perm = [p if p is not None else next(rest) for p in perm_opt]
    if len(perm) != n or out.ndim != n:
        raise _UnhandledError
    return _perm_rec(rec, perm)


def _reshape_rec(rec: _Rec, in_shape: Sequence[int], out_shape: Sequence[int]) -> _Rec:
    """Reshape: dims kept 1:1 keep their geometry; merged/split spatial dims become global."""
    if tuple(in_shape) == tuple(out_shape):
        return rec
    if math.prod(in_shape) != math.prod(out_shape) or 0 in in_shape or 0 in out_shape:
        raise _UnhandledError
    extra = dict(rec.extra)
    dims: list[_Dim | None] = [None] * len(out_shape)
    # Size-1 dims may appear/disappear freely; a vanishing one keeps its (pinned) field.
    for i, s in enumerate(in_shape):
        dm = rec.dims[i]
        if s == 1 and dm is not None:
            _merge_extra(extra, dm[0], _pin(dm[1], 0))
    a_dims = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    b_dims = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    p = q = 0
    while p < len(a_dims) and q < len(b_dims):
        gi, gj = [a_dims[p]], [b_dims[q]]
        pa, pb = a_dims[p][1], b_dims[q][1]
        p, q = p + 1, q + 1
        while pa != pb:  # grow the smaller side until both groups hold the same elements
            if pa < pb:
                gi.append(a_dims[p])
                pa *= a_dims[p][1]
                p += 1
            else:
                gj.append(b_dims[q])
                pb *= b_dims[q][1]
                q += 1
        if len(gi) == 1 and len(gj) == 1:
            dims[gj[0][0]] = rec.dims[gi[0][0]]
        else:
            for i, _ in gi:
                dm = rec.dims[i]
                if dm is not None:  # merged/split: the ViT-tokens fallback
                    _merge_extra(extra, dm[0], _GLOBAL_INEXACT)
    return _build(dims, extra, out_shape)


@_register(
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "ravel",
    "unsafe_view",
    "atleast_1d",
    "atleast_2d",
    "atleast_3d",
)
def _h_reshape(tr, func, args, kwargs, out, outs):
    x, rec = _input_rec(tr, args, kwargs)
    if len(outs) != 1:
        raise _UnhandledError
    return _reshape_rec(rec, x.shape, out.shape)


def _basic_index(i: Any) -> Any:
    """None, Ellipsis, slice or int (numpy ints accepted); anything else is advanced."""
    if i is None or i is Ellipsis or isinstance(i, slice):
        return i
    if isinstance(i, (bool, torch.Tensor, list, tuple)):
        raise _UnhandledError  # advanced (tensor / list / bool) indexing: conservative
    return operator.index(i)


@_register("__getitem__")
def _h_getitem(tr, func, args, kwargs, out, outs):
    x, idx = args[0], args[1]
    rec = tr._lookup(x)
    if rec is None:
        raise _UnhandledError
    idx = idx if isinstance(idx, tuple) else (idx,)
    idx = tuple(_basic_index(i) for i in idx)
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - used))
        else:
            expanded.append(i)
    if Ellipsis not in idx:
        expanded.extend([slice(None)] * (x.ndim - used))
    extra = dict(rec.extra)
    dims: list[_Dim | None] = []
    d = 0
    for i in expanded:
        if i is None:
            dims.append(None)
            continue
        dm = rec.dims[d]
        n = int(x.shape[d])
        if isinstance(i, slice):
            start, _, step = i.indices(n)
            dims.append(None if dm is None else (dm[0], _window(dm[1], start, step, 0)))
        elif dm is not None:  # integer index: the dim vanishes, its window stays
            _merge_extra(extra, dm[0], _pin(dm[1], i % n))
        d += 1
    if len(dims) != out.ndim:
        raise _UnhandledError
    return _build(dims, extra, out.shape)


def _offset_dim(rec: _Rec, dim: int, offset: int) -> _Rec:
    dm = rec.dims[dim]
    if dm is None or offset == 0:
        return rec
    dims = list(rec.dims)
    dims[dim] = (dm[0], _window(dm[1], offset, 1, 0))
    return _Rec(tuple(dims), rec.extra)


def _select_dim(rec: _Rec, dim: int, index: int) -> _Rec:
    dims = list(rec.dims)
    dm = dims.pop(dim)
    extra = dict(rec.extra)
    if dm is not None:
        _merge_extra(extra, dm[0], _pin(dm[1], index))
    return _Rec(tuple(dims), extra)


@_register("split", "split_with_sizes", "unsafe_split", "chunk", "unsafe_chunk", "tensor_split")
def _h_split(tr, func, args, kwargs, out, outs):
    x, rec = _input_rec(tr, args, kwargs)
    dim = int(_arg(args, kwargs, 2, "dim", 0)) % x.ndim
    res, offset = [], 0
    for t in outs:
        res.append(_offset_dim(rec, dim, offset))
        offset += int(t.shape[dim])
    return res


@_register("unbind")
def _h_unbind(tr, func, args, kwargs, out, outs):
    x, rec = _input_rec(tr, args, kwargs)
    dim = int(_arg(args, kwargs, 1, "dim", 0)) % x.ndim
    return [_select_dim(rec, dim, i) for i in range(len(outs))]


@_register("narrow", "select")
def _h_narrow(tr, func, args, kwargs, out, outs):
    x, rec = _input_rec(tr, args, kwargs)
    dim = int(_arg(args, kwargs, 1, "dim")) % x.ndim
    pos = int(_arg(args, kwargs, 2, "start" if func.__name__ == "narrow" else "index"))
    pos %= max(int(x.shape[dim]), 1)
    if func.__name__ == "narrow":
        return _offset_dim(rec, dim, pos)
    return _select_dim(rec, dim, pos)


@_register("unfold")
def _h_unfold(tr, func, args, kwargs, out, outs):
    if getattr(func, "__module__", None) == "torch.nn.functional":  # F.unfold = im2col
        return _HANDLERS["<mix>"](tr, func, args, kwargs, out, outs)
    x, rec = _input_rec(tr, args, kwargs)  # Tensor.unfold(dimension, size, step)
    dim = int(_arg(args, kwargs, 1, "dimension")) % max(x.ndim, 1)
    size, step = int(_arg(args, kwargs, 2, "size")), int(_arg(args, kwargs, 3, "step"))
    dims = list(rec.dims)
    dm = dims[dim] if dims else None
    if dm is not None:
        dims[dim] = (dm[0], _window(dm[1], 0, step, size - 1))
    return _Rec((*dims, None), rec.extra)


@_register("cat", "concat", "concatenate", "stack")
def _h_cat(tr, func, args, kwargs, out, outs):
    tensors = _arg(args, kwargs, 0, "tensors")
    dim = int(_arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))) % out.ndim
    stack = func.__name__ == "stack"
    extra: dict[int, AxisRF] = {}
    items = []
    for t in tensors:
        r = tr._lookup(t)
        if r is None:
            continue
        for a, e in r.extra.items():
            _merge_extra(extra, a, e)
        if stack:
            items.append(
                ((*r.dims[:dim], None, *r.dims[dim:]), (*t.shape[:dim], 1, *t.shape[dim:]))
            )
        elif t.ndim == out.ndim:
            # The concatenated dim takes the output's length so the union keeps the jump.
            items.append((r.dims, (*t.shape[:dim], out.shape[dim], *t.shape[dim + 1 :])))
    res = _combine(items, out.shape, extra)
    dm = res.dims[dim]
    if dm is not None and not stack:  # cat along a spatial dim: index -> pixel map is broken
        dims = list(res.dims)
        dims[dim] = (dm[0], replace(dm[1], exact=False))
        res = _Rec(tuple(dims), res.extra)
    return res


# name -> (position of the dim argument, default when absent; None = all dims)
_REDUCTIONS: dict[str, tuple[int, Any]] = {
    **{
        n: (1, None)
        for n in (
            "sum",
            "mean",
            "nansum",
            "nanmean",
            "amax",
            "amin",
            "aminmax",
            "max",
            "min",
            "std",
            "var",
            "std_mean",
            "var_mean",
            "prod",
            "all",
            "any",
            "argmax",
            "argmin",
            "median",
            "nanmedian",
            "logsumexp",
            "count_nonzero",
        )
    },
    "mode": (1, -1),
    "norm": (2, None),
    "linalg_vector_norm": (2, None),
    "linalg_norm": (2, None),
    "quantile": (2, None),
    "nanquantile": (2, None),
    "kthvalue": (2, -1),
}


@_register(*_REDUCTIONS)
def _h_reduce(tr, func, args, kwargs, out, outs):
    name = func.__name__
    x, rec = _input_rec(tr, args, kwargs)
    pos, default = _REDUCTIONS[name]
    dim = _arg(args, kwargs, pos, "dim", _MISSING)
    if dim is _MISSING:
        dim = kwargs.get("axis", default)
    if isinstance(dim, torch.Tensor):
        return None  # torch.max(a, b): elementwise
    if isinstance(dim, bool):  # legacy x.std(unbiased) positional
        dim = default
    red = _dims_arg(dim, x.ndim)
    red = set(range(x.ndim)) if red is None else set(red)
    o = outs[0]
    keep = o.ndim == x.ndim
    if not keep and o.ndim != x.ndim - len(red):
        raise _UnhandledError
    extra = dict(rec.extra)
    dims: list[_Dim | None] = []
    for k, dm in enumerate(rec.dims):
        if k not in red:
            dims.append(dm)
        elif keep:
            dims.append(None if dm is None else (dm[0], _reduced(dm[1], int(x.shape[k]))))
        elif dm is not None:
            _merge_extra(extra, dm[0], replace(_reduced(dm[1], int(x.shape[k])), jump=0.0))
    res = _build(dims, extra, o.shape)
    return [res if t.shape == o.shape else None for t in outs]


# name -> (position of dim, default dim, exact): the output keeps the dim, but each of its
# entries depends on the whole dim.
_ALONG_DIM: dict[str, tuple[int, Any, bool]] = {
    **{n: (1, None, True) for n in ("softmax", "log_softmax", "softmin")},
    **{n: (1, None, False) for n in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    "sort": (1, -1, True),
    "argsort": (1, -1, True),
    "msort": (99, 0, True),
    "topk": (2, -1, True),
    "normalize": (2, 1, True),
    # index-based ops: positions are data-dependent
    **{
        n: (1, None, False)
        for n in (
            "flip",
            "index_select",
            "gather",
            "scatter",
            "scatter_add",
            "scatter_reduce",
            "index_add",
            "index_copy",
            "index_fill",
            "index_reduce",
        )
    },
    "fliplr": (99, 1, False),
    "flipud": (99, 0, False),
    "roll": (2, None, False),
    "take_along_dim": (2, None, False),
    "repeat_interleave": (2, None, False),
}


@_register(*_ALONG_DIM)
def _h_along_dim(tr, func, args, kwargs, out, outs):
    name = func.__name__
    pos, default, exact = _ALONG_DIM[name]
    dim = _arg(args, kwargs, pos, "dims" if name in ("flip", "roll") else "dim", default)
    sel = _dims_arg(dim, outs[0].ndim)
    if sel is None:
        raise _UnhandledError  # flattened / implicit dim: everything global
    srcs = tr._sources(args, kwargs)
    res = []
    for t in outs:
        r = tr._generic(srcs, t)
        dims = list(r.dims)
        for d in sel:
            if dims[d] is not None:
                dims[d] = (dims[d][0], _centred_global(dims[d][1], dims[d][1].exact and exact))
        res.append(_Rec(tuple(dims), r.extra))
    return res


@_register(
    "<mix>",
    "fold",
    "grid_sample",
    "affine_grid",
    "rot90",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "take",
    "put",
    "index_put",
    "stft",
    "istft",
)
def _h_mix(tr, func, args, kwargs, out, outs):
    """Unknown spatial mixing: every traced axis becomes a global, non-exact dependency."""
    srcs = tr._sources(args, kwargs)
    res = []
    for t in outs:
        r = tr._generic(srcs, t)
        extra = {a: replace(e, exact=False) for a, e in r.extra.items()}
        # Same layout as an input (flip, fft2...): keep the grid so that centres stay
        # meaningful. Otherwise (F.unfold...) the dims no longer index positions.
        keep_grid = any(s.shape == t.shape for s, _ in srcs)
        dims = list(r.dims)
        for k, dm in enumerate(dims):
            if dm is not None:
                if keep_grid:
                    dims[k] = (dm[0], _centred_global(dm[1], False))
                else:
                    _merge_extra(extra, dm[0], _GLOBAL_INEXACT)
                    dims[k] = None
        res.append(_build(dims, extra, t.shape))
    return res


def _contracting(
    tr: ReceptiveFieldTracer,
    out: torch.Tensor,
    operands: Sequence[tuple[Any, Sequence[int | None]]],
    exact: bool = True,
) -> _Rec:
    """Generic rule for matmul-like ops.

    Args:
        tr: the tracer.
        out: output tensor.
        operands: per operand, a map from its dims to output dims (None = contracted, i.e.
            summed over: the axis becomes a global dependency).
        exact: exactness of the contracted (global) dependencies.
    """
    extra: dict[int, AxisRF] = {}
    items = []
    n = out.ndim
    for t, to_out in operands:
        r = tr._lookup(t)
        if r is None:
            continue
        for a, e in r.extra.items():
            _merge_extra(extra, a, e)
        dims: list[_Dim | None] = [None] * n
        shape = [1] * n
        for k, j in enumerate(to_out):
            dm = r.dims[k]
            if j is None:
                if dm is not None:
                    _merge_extra(
                        extra, dm[0], replace(_reduced(dm[1], int(t.shape[k]), exact), jump=0.0)
                    )
            else:
                dims[j], shape[j] = dm, int(t.shape[k])
        items.append((dims, shape))
    return _combine(items, out.shape, extra)


def _batch_map(t: torch.Tensor, n_out: int, core: Sequence[int | None]) -> list[int | None]:
    """Map ``t``'s leading (batch) dims right-aligned onto the output's batch dims."""
    nb = t.ndim - len(core)
    off = (n_out - len(core)) - nb
    return [off + k for k in range(nb)] + list(core)


@_register("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
def _h_matmul(tr, func, args, kwargs, out, outs):
    a = _arg(args, kwargs, 0, "input")
    b = _arg(args, kwargs, 1, "other", kwargs.get("mat2"))
    if func.__name__ == "__rmatmul__":
        a, b = b, a
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise _UnhandledError
    if a.ndim < 2 or b.ndim < 2:
        raise _UnhandledError
    n = out.ndim
    return _contracting(
        tr, out, [(a, _batch_map(a, n, [n - 2, None])), (b, _batch_map(b, n, [None, n - 1]))]
    )


@_register("linear")
def _h_linear(tr, func, args, kwargs, out, outs):
    x, _ = _input_rec(tr, args, kwargs)
    n = out.ndim
    ops: list[tuple[Any, Sequence[int | None]]] = [(x, [*range(n - 1), None])]
    res = _contracting(tr, out, ops)
    extra = dict(res.extra)
    for _, r in tr._sources(args[1:], {k: v for k, v in kwargs.items() if k != "input"}):
        _absorb(r, extra)  # weights/bias computed from the input (hypernetworks)
    return _build(res.dims, extra, out.shape)


@_register("einsum")
def _h_einsum(tr, func, args, kwargs, out, outs):
    eq = args[0].replace(" ", "")
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if "..." in eq:
        raise _UnhandledError
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "->" not in eq:  # implicit output: letters appearing once, sorted
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(operands) or len(rhs) != out.ndim:
        raise _UnhandledError
    ops = [
        (t, [rhs.index(c) if c in rhs else None for c in term])
        for t, term in zip(operands, terms, strict=True)
    ]
    return _contracting(tr, out, ops)


@_register("scaled_dot_product_attention")
def _h_sdpa(tr, func, args, kwargs, out, outs):
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    n = out.ndim
    ops = [
        (q, _batch_map(q, n, [n - 2, None])),  # query i attends over every key/value
        (k, _batch_map(k, n, [None, None])),
        (v, _batch_map(v, n, [None, n - 1])),
    ]
    ops += [
        (m, list(range(n - m.ndim, n)))
        for m in (_arg(args, kwargs, 3, "attn_mask"),)
        if isinstance(m, torch.Tensor) and m.ndim <= n
    ]
    return _contracting(tr, out, ops)


@_register("multi_head_attention_forward")
def _h_mha(tr, func, args, kwargs, out, outs):
    q, k, v = args[0], args[1], args[2]
    o = outs[0]
    if q.ndim != o.ndim:
        raise _UnhandledError
    n = o.ndim
    # (L, N, E) or unbatched (L, E): token dim 0 from the query, batch dim shared,
    # embedding mixed by the projections, keys/values seen globally.
    core = [0, 1, None] if n == 3 else [0, None]
    ops = [
        (q, core),
        (k, [None, 1, None] if n == 3 else [None, None]),
        (v, [None, 1, None] if n == 3 else [None, None]),
    ]
    res = _contracting(tr, o, ops)
    rest: list[_Rec | None] = []
    for t in outs[1:]:  # attention weights: conservative
        extra: dict[int, AxisRF] = {}
        for _, r in tr._sources(args, kwargs):
            _absorb(r, extra)
        rest.append(_Rec((None,) * t.ndim, extra))
    return [res, *rest]


@_register(
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_tensor",
    "new_empty_strided",
    "new",
    "attr:grad",
    "attr:shape",
)
def _h_skip(tr, func, args, kwargs, out, outs):
    return _SKIP

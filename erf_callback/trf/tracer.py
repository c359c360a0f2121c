"""The TRF tracer: follows a forward pass and applies the per-op rules to every torch call.

:class:`ReceptiveFieldTracer` is a :class:`~torch.overrides.TorchFunctionMode`: every torch
function called during the traced forward (``torch.*``, ``torch.nn.functional.*`` and
``Tensor`` methods) is seen once, at the top level, and the tracer propagates an affine
"which input pixels does this unit see" description from the input (``root``) to each tensor
derived from it (a :class:`~erf_callback.trf.geometry.TensorRF` record per tensor). It only
dispatches: what each op does to the geometry is looked up by name in a rule table
(:data:`erf_callback.trf.rules.RULES`), and an op without a rule is treated as elementwise.

Rules are exact (closed form) for conv, pooling, padding, permutations, shape-keeping reshapes,
basic indexing, reductions, matmul/einsum and attention; marked non-exact (``exact=False``)
for strided transposed conv, interpolation, uneven adaptive pooling, ``pixel_shuffle``, ``cat``
along a spatial dim and unknown ops that resample a dim; and fall back to a global, non-exact
dependency (``size=inf``) for reshapes that merge spatial dims (ViT tokens), advanced
indexing, index-based ops, FFTs and any op whose rule raised. Anything computed from such a
tensor inherits the global dependency, so when ViT tokens are reshaped back to a
``(N, C, h, w)`` grid, :meth:`ReceptiveFieldTracer.geometry` reports ``size=inf`` for every
axis (never ``None``), with centres on the natural ``h x w`` grid over the input.

Example:
    >>> import torch.nn.functional as F
    >>> x = torch.rand(1, 1, 16, 16)
    >>> with ReceptiveFieldTracer(x) as tracer:
    ...     y = F.max_pool2d(F.conv2d(x, torch.ones(1, 1, 3, 3)), 2)
    >>> tracer.geometry(y).axes[0]
    AxisRF(start=0.0, jump=2.0, size=4.0, exact=True)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch.overrides import TorchFunctionMode

from erf_callback.trf.geometry import (
    GLOBAL_INEXACT,
    INF,
    AxisRF,
    RFGeometry,
    TensorRF,
    absorb,
    combine,
    merge_extra,
)
from erf_callback.trf.rules import RULES
from erf_callback.trf.rules.base import (
    FALLBACK_RULE,
    OpCall,
    RuleHandler,
    RuleResult,
    Skip,
    TorchFunction,
    UnhandledError,
    arg,
)

__all__ = ["ReceptiveFieldTracer"]


class ReceptiveFieldTracer(TorchFunctionMode):
    """Propagates :class:`AxisRF` geometry through every torch function call of a forward.

    Use as a context manager around a forward pass that starts at ``root`` (N, C, *spatial).
    Never raises from inside the forward: an op it cannot handle only degrades geometry.

    Records are keyed by ``id(tensor)`` and hold a weak reference that is checked on lookup,
    so a recycled id never aliases a dead tensor and the tracer does not keep activations
    alive (which matters under ``no_grad``).

    Args:
        root: the traced input, laid out (N, C, *spatial).
        rules: per-op rules by torch function name; defaults to
            :data:`erf_callback.trf.rules.RULES`.

    Attributes:
        degraded_ops: names of ops whose bookkeeping raised and fell back to "global,
            non-exact" (for debugging; empty in normal operation).

    Example:
        >>> x = torch.rand(1, 3, 8, 8)
        >>> with ReceptiveFieldTracer(x) as tracer:
        ...     y = x.mean((2, 3), keepdim=True)
        >>> tracer.geometry(y).width
        (inf, inf)
    """

    def __init__(self, root: torch.Tensor, rules: Mapping[str, RuleHandler] = RULES) -> None:
        super().__init__()
        if root.ndim < 3:
            raise ValueError(f"root must be (N, C, *spatial), got shape {tuple(root.shape)}")
        self._root = root
        self._rules = rules
        self._nd = root.ndim - 2
        self._root_size = tuple(int(s) for s in root.shape[2:])
        self._recs: dict[int, tuple[weakref.ref[torch.Tensor], TensorRF]] = {}
        # Flattening reshapes (see flattened): output id -> (output, input shape, input record).
        self._flat: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, ...], TensorRF]] = {}
        self.degraded_ops: set[str] = set()
        unit = AxisRF(0.0, 1.0, 1.0, True)
        self._store(root, TensorRF((None, None, *((k, unit) for k in range(self._nd))), {}))

    # -- records (the TraceState the rules see) ----------------------------------------------

    def _store(self, t: torch.Tensor, rec: TensorRF) -> None:
        self._recs[id(t)] = (weakref.ref(t), rec)

    def lookup(self, t: object) -> TensorRF | None:
        """Record of ``t``, or None when ``t`` is not a tensor traced from the root."""
        if not isinstance(t, torch.Tensor):
            return None
        e = self._recs.get(id(t))
        if e is None or e[0]() is not t:
            return None
        return e[1]

    def flattened(self, t: torch.Tensor) -> tuple[tuple[int, ...], TensorRF] | None:
        """The shape and record of the tensor that ``t`` is a flattening reshape of, or None:
        a reshape back restores them (flat images that a model views as images again)."""
        e = self._flat.get(id(t))
        return None if e is None or e[0]() is not t else (e[1], e[2])

    def note_flattened(self, out: torch.Tensor, shape: tuple[int, ...], rec: TensorRF) -> None:
        self._flat[id(out)] = (weakref.ref(out), shape, rec)

    def sources(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, TensorRF]]:
        """Traced tensors among the arguments (and inside list/tuple arguments, e.g. cat)."""
        # Hot path (runs for every op): inline lookups, no helper calls.
        recs, tensor = self._recs, torch.Tensor
        found: list[tuple[torch.Tensor, TensorRF]] = []
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, tensor):
                e = recs.get(id(a))
                if e is not None and e[0]() is a:
                    found.append((a, e[1]))
            elif isinstance(a, (list, tuple)):
                for b in a:
                    e = recs.get(id(b))
                    if e is not None and e[0]() is b:  # so b is a tensor
                        found.append((cast(torch.Tensor, b), e[1]))
        return found

    def elementwise(
        self, srcs: Sequence[tuple[torch.Tensor, TensorRF]], out: torch.Tensor
    ) -> TensorRF:
        """Record of ``out`` under the generic rule: a broadcasting union of ``srcs``."""
        if len(srcs) == 1 and srcs[0][0].shape == out.shape:
            return srcs[0][1]  # the common elementwise case: share the record
        extra: dict[int, AxisRF] = {}
        for _, r in srcs:
            for a, e in r.extra.items():
                merge_extra(extra, a, e)
        return combine(((r.dims, t.shape) for t, r in srcs), out.shape, extra)

    # -- TorchFunctionMode -------------------------------------------------------------------

    def __torch_function__(
        self,
        func: TorchFunction,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
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

    def _propagate(
        self, func: TorchFunction, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        name = getattr(func, "__name__", None)
        if name == "__get__":  # property access: x.T, x.mT, x.data ...
            name = "attr:" + getattr(getattr(func, "__self__", None), "__name__", "")
        if out is None:
            if name == "__setitem__" and args:
                target, value = args[0], arg(args, kwargs, 2, "value")
                srcs = [(t, r) for t in (target, value) if (r := self.lookup(t)) is not None]
                srcs += [(t, r) for t, r in self.sources(args[1:2], {}) if t is not value]
                if srcs:
                    self._store(target, self.elementwise(srcs, target))
            return
        if isinstance(out, torch.Tensor):
            outs = [out]
        else:
            outs = [t for t in out if isinstance(t, torch.Tensor)]
            if not outs:
                return
        srcs = self.sources(args, kwargs)
        if not srcs:
            return
        rules = self._rules
        handler = rules.get(name) if name is not None else None
        if handler is None and name and name.startswith("_") and not name.startswith("__"):
            handler = rules.get(name.lstrip("_"))  # aten-style private twins (_convolution)
        if handler is None and name and name.startswith("fft_"):
            handler = rules[FALLBACK_RULE]
        res: RuleResult = None
        if handler is not None:
            op = OpCall(func, args, kwargs, outs[0], outs)
            try:
                res = handler(self, op)
            except UnhandledError:
                res = rules[FALLBACK_RULE](self, op)
        if isinstance(res, Skip):
            return
        recs: Sequence[TensorRF | None]
        if res is None:
            recs = [self.elementwise(srcs, t) for t in outs]
        elif isinstance(res, TensorRF):
            recs = [res] * len(outs)
        else:
            recs = res
        for t, r in zip(outs, recs, strict=True):
            self._store(t, r if r is not None else self.elementwise(srcs, t))

    def _degrade(
        self, func: TorchFunction, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """Conservative fallback after a bug: outputs depend globally on every traced axis."""
        try:
            self.degraded_ops.add(str(getattr(func, "__name__", func)))
            outs = (
                [out]
                if isinstance(out, torch.Tensor)
                else [t for t in (out or ()) if isinstance(t, torch.Tensor)]
            )
            extra: dict[int, AxisRF] = {}
            for _, r in self.sources(args, kwargs):
                absorb(r, extra)
            if extra:
                for t in outs:
                    self._store(t, TensorRF((None,) * t.ndim, extra))
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
        rec = self.lookup(tensor)
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
            e = rec.extra.get(k, GLOBAL_INEXACT)
            if math.isinf(e.size):
                m = int(tensor.shape[d]) if d < tensor.ndim else 1
                jump = self._root_size[k] / max(m, 1)
                axes.append(AxisRF((jump - 1) / 2, jump, INF, e.exact))
            else:
                axes.append(e)
        return RFGeometry(tuple(axes))

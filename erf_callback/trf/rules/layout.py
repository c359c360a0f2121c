"""Rules for ops that move values between dims without mixing them: permute, reshape, index, cat.

Exact for permutations (``permute``/``transpose``/``movedim``/``.mT``...), reshapes that keep
the spatial dims, basic slicing/indexing, ``split``/``chunk``/``narrow``/``select``/``unbind``
and ``stack``. Reshapes that merge or split a spatial dim (ViT patch tokens, flatten before a
``Linear``) and advanced indexing fall back to a global, non-exact dependency; ``cat`` along a
spatial dim keeps the hull but is marked non-exact (the index -> pixel map is broken).

Example:
    >>> from erf_callback.trf.geometry import AxisRF
    >>> rec = TensorRF((None, None, (0, AxisRF()), (1, AxisRF())), {})
    >>> tokens = reshape_rec(rec, (1, 3, 4, 4), (1, 3, 16))  # ViT tokens: both axes global
    >>> tokens.dims, sorted((a, e.size, e.exact) for a, e in tokens.extra.items())
    ((None, None, None), [(0, inf, False), (1, inf, False)])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from erf_callback.trf.geometry import (
    GLOBAL_INEXACT,
    AxisRF,
    DimRF,
    TensorRF,
    build,
    combine,
    merge_extra,
    pin,
    window,
)
from erf_callback.trf.rules.base import (
    OpCall,
    RuleHandler,
    RuleResult,
    TraceState,
    UnhandledError,
    input_rec,
    ntuple,
)

__all__ = [
    "RULES",
    "basic_index",
    "cat_rule",
    "getitem_rule",
    "narrow_rule",
    "offset_dim",
    "permute_rule",
    "reshape_rec",
    "reshape_rule",
    "select_dim",
    "split_rule",
    "unbind_rule",
]


def permute_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """Permutations: ``permute``, ``transpose``, ``movedim``, ``.T``, ``.mT``..."""
    x, rec = input_rec(tr, op)
    n = x.ndim
    name = op.func.__name__
    if name == "__get__":  # a property: the getter's owner names it
        name = getattr(getattr(op.func, "__self__", None), "__name__", "")
    perm: list[int]
    if name == "permute":
        dims: Sequence[Any] = list(op.args[1:]) or op.kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        perm = [d % n for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims", "t", "adjoint", "mT", "mH", "T", "H"):
        if name in ("t", "T", "H"):
            perm = list(range(n))[::-1]
        elif name in ("adjoint", "mT", "mH"):
            perm = [*range(n - 2), n - 1, n - 2]
        else:
            d0 = op.arg(1, "dim0", op.kwargs.get("axis0"))
            d1 = op.arg(2, "dim1", op.kwargs.get("axis1"))
            d0, d1 = d0 % n, d1 % n
            perm = list(range(n))
            perm[d0], perm[d1] = d1, d0
    else:  # movedim(source, destination)
        src = [s % n for s in ntuple(op.arg(1, "source"), 1)]
        dst = [d % n for d in ntuple(op.arg(2, "destination"), 1)]
        perm_opt: list[int | None] = [None] * n
        for s, d in zip(src, dst, strict=True):
            perm_opt[d] = s
        rest = iter(i for i in range(n) if i not in src)
        perm = [p if p is not None else next(rest) for p in perm_opt]
    if len(perm) != n or op.out.ndim != n:
        raise UnhandledError
    return TensorRF(tuple(rec.dims[p] for p in perm), rec.extra)


def reshape_rec(rec: TensorRF, in_shape: Sequence[int], out_shape: Sequence[int]) -> TensorRF:
    """Reshape: dims kept 1:1 keep their geometry; merged/split spatial dims become global."""
    if tuple(in_shape) == tuple(out_shape):
        return rec
    if math.prod(in_shape) != math.prod(out_shape) or 0 in in_shape or 0 in out_shape:
        raise UnhandledError
    extra = dict(rec.extra)
    dims: list[DimRF | None] = [None] * len(out_shape)
    # Size-1 dims may appear/disappear freely; a vanishing one keeps its (pinned) field.
    for i, s in enumerate(in_shape):
        dm = rec.dims[i]
        if s == 1 and dm is not None:
            merge_extra(extra, dm[0], pin(dm[1], 0))
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
                    merge_extra(extra, dm[0], GLOBAL_INEXACT)
    return build(dims, extra, out_shape)


def reshape_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``view``/``reshape``/``flatten``/``squeeze``...: see :func:`reshape_rec`.

    A reshape that merges spatial dims loses their geometry (:func:`reshape_rec`), except
    when the very next reshape undoes it: a flat ``(N, 784)`` batch that the model views as
    ``(N, 1, 28, 28)`` again gets the record it had as an image.
    """
    x, rec = input_rec(tr, op)
    if len(op.outs) != 1:
        raise UnhandledError
    shape = tuple(int(s) for s in op.out.shape)
    before = tr.flattened(x)
    if before is not None and before[0] == shape:
        return before[1]
    out = reshape_rec(rec, x.shape, shape)
    carried = {d[0] for d in out.dims if d is not None}
    if any(d is not None and d[0] not in carried for d in rec.dims):
        tr.note_flattened(op.out, tuple(int(s) for s in x.shape), rec)
    return out


def basic_index(i: Any) -> Any:
    """None, Ellipsis, slice or int (numpy ints accepted); anything else is advanced."""
    if i is None or i is Ellipsis or isinstance(i, slice):
        return i
    if isinstance(i, (bool, torch.Tensor, list, tuple)):
        raise UnhandledError  # advanced (tensor / list / bool) indexing: conservative
    return operator.index(i)


def getitem_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """Basic indexing ``x[...]``: slices are windows, an integer pins its dim's field."""
    x, idx = op.args[0], op.args[1]
    rec = tr.lookup(x)
    if rec is None:
        raise UnhandledError
    idx = idx if isinstance(idx, tuple) else (idx,)
    idx = tuple(basic_index(i) for i in idx)
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
    dims: list[DimRF | None] = []
    d = 0
    for i in expanded:
        if i is None:
            dims.append(None)
            continue
        dm = rec.dims[d]
        n = int(x.shape[d])
        if isinstance(i, slice):
            start, _, step = i.indices(n)
            dims.append(None if dm is None else (dm[0], window(dm[1], start, step, 0)))
        elif dm is not None:  # integer index: the dim vanishes, its window stays
            merge_extra(extra, dm[0], pin(dm[1], i % n))
        d += 1
    if len(dims) != op.out.ndim:
        raise UnhandledError
    return build(dims, extra, op.out.shape)


def offset_dim(rec: TensorRF, dim: int, offset: int) -> TensorRF:
    """``rec`` with dim ``dim`` starting ``offset`` units later (a slice of it)."""
    dm = rec.dims[dim]
    if dm is None or offset == 0:
        return rec
    dims = list(rec.dims)
    dims[dim] = (dm[0], window(dm[1], offset, 1, 0))
    return TensorRF(tuple(dims), rec.extra)


def select_dim(rec: TensorRF, dim: int, index: int) -> TensorRF:
    """``rec`` with dim ``dim`` removed by selecting ``index``: its field becomes extra."""
    dims = list(rec.dims)
    dm = dims.pop(dim)
    extra = dict(rec.extra)
    if dm is not None:
        merge_extra(extra, dm[0], pin(dm[1], index))
    return TensorRF(tuple(dims), extra)


def split_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``split``/``chunk``/``tensor_split``: each piece is offset along the split dim."""
    x, rec = input_rec(tr, op)
    dim = int(op.arg(2, "dim", 0)) % x.ndim
    res, offset = [], 0
    for t in op.outs:
        res.append(offset_dim(rec, dim, offset))
        offset += int(t.shape[dim])
    return res


def unbind_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``unbind``: output ``i`` selects index ``i`` of the dim."""
    x, rec = input_rec(tr, op)
    dim = int(op.arg(1, "dim", 0)) % x.ndim
    return [select_dim(rec, dim, i) for i in range(len(op.outs))]


def narrow_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``narrow`` (an offset) and ``select`` (an index that removes the dim)."""
    x, rec = input_rec(tr, op)
    dim = int(op.arg(1, "dim")) % x.ndim
    pos = int(op.arg(2, "start" if op.func.__name__ == "narrow" else "index"))
    pos %= max(int(x.shape[dim]), 1)
    if op.func.__name__ == "narrow":
        return offset_dim(rec, dim, pos)
    return select_dim(rec, dim, pos)


def cat_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``cat``/``stack``: a union of the inputs; non-exact along a concatenated spatial dim."""
    tensors = op.arg(0, "tensors")
    dim = int(op.arg(1, "dim", op.kwargs.get("axis", 0))) % op.out.ndim
    stack = op.func.__name__ == "stack"
    extra: dict[int, AxisRF] = {}
    items: list[tuple[Sequence[DimRF | None], Sequence[int]]] = []
    for t in tensors:
        r = tr.lookup(t)
        if r is None:
            continue
        for a, e in r.extra.items():
            merge_extra(extra, a, e)
        if stack:
            items.append(
                ((*r.dims[:dim], None, *r.dims[dim:]), (*t.shape[:dim], 1, *t.shape[dim:]))
            )
        elif t.ndim == op.out.ndim:
            # The concatenated dim takes the output's length so the union keeps the jump.
            items.append((r.dims, (*t.shape[:dim], op.out.shape[dim], *t.shape[dim + 1 :])))
    res = combine(items, op.out.shape, extra)
    dm = res.dims[dim]
    if dm is not None and not stack:  # cat along a spatial dim: index -> pixel map is broken
        dims = list(res.dims)
        dims[dim] = (dm[0], replace(dm[1], exact=False))
        res = TensorRF(tuple(dims), res.extra)
    return res


RULES: Mapping[str, RuleHandler] = {
    **dict.fromkeys(
        (
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
        ),
        permute_rule,
    ),
    **dict.fromkeys(
        (
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
        ),
        reshape_rule,
    ),
    "__getitem__": getitem_rule,
    **dict.fromkeys(
        ("split", "split_with_sizes", "unsafe_split", "chunk", "unsafe_chunk", "tensor_split"),
        split_rule,
    ),
    "unbind": unbind_rule,
    **dict.fromkeys(("narrow", "select"), narrow_rule),
    **dict.fromkeys(("cat", "concat", "concatenate", "stack"), cat_rule),
}
"""Layout rules by torch function name."""

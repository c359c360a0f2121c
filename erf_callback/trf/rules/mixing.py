"""Rules for ops that mix positions: reductions, ops along a dim, matmul/einsum, attention.

A dim that is summed over (a reduction, the contracted dim of a matmul, the keys of attention)
turns its input axis into a global dependency (``size=inf``) of every output value; ops that
keep a dim but let every entry see the whole dim (softmax, sort, cumsum) make that dim global
while keeping each index's centre. Index-based ops (``flip``, ``gather``, ``roll``...), FFTs,
``F.unfold``/``F.fold``/``grid_sample`` and anything a rule cannot interpret get the
conservative fallback, :func:`mix_rule`: global and non-exact. ``*_like`` constructors do not
depend on their input's values at all (:func:`skip_rule`).

Example:
    >>> batch_map(torch.ones(5, 2, 3), 4, [2, None])  # (5, 2, 3) @ (..., 3, k) -> (1, 5, 2, k)
    [1, 2, None]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from erf_callback.trf.geometry import (
    GLOBAL_INEXACT,
    AxisRF,
    DimRF,
    TensorRF,
    absorb,
    build,
    centred_global,
    combine,
    merge_extra,
    reduced,
)
from erf_callback.trf.rules.base import (
    FALLBACK_RULE,
    MISSING,
    SKIP,
    OpCall,
    RuleHandler,
    RuleResult,
    TraceState,
    UnhandledError,
    dims_arg,
    input_rec,
)

__all__ = [
    "RULES",
    "along_dim_rule",
    "batch_map",
    "contracting",
    "einsum_rule",
    "linear_rule",
    "matmul_rule",
    "mha_rule",
    "mix_rule",
    "reduce_rule",
    "sdpa_rule",
    "skip_rule",
]

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


def reduce_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """Reductions (``mean``, ``amax``, ``norm``...): reduced spatial dims become global."""
    name = op.func.__name__
    x, rec = input_rec(tr, op)
    pos, default = _REDUCTIONS[name]
    dim = op.arg(pos, "dim", MISSING)
    if dim is MISSING:
        dim = op.kwargs.get("axis", default)
    if isinstance(dim, torch.Tensor):
        return None  # torch.max(a, b): elementwise
    if isinstance(dim, bool):  # legacy x.std(unbiased) positional
        dim = default
    listed = dims_arg(dim, x.ndim)
    red = set(range(x.ndim)) if listed is None else set(listed)
    o = op.outs[0]
    keep = o.ndim == x.ndim
    if not keep and o.ndim != x.ndim - len(red):
        raise UnhandledError
    extra = dict(rec.extra)
    dims: list[DimRF | None] = []
    for k, dm in enumerate(rec.dims):
        if k not in red:
            dims.append(dm)
        elif keep:
            dims.append(None if dm is None else (dm[0], reduced(dm[1], int(x.shape[k]))))
        elif dm is not None:
            merge_extra(extra, dm[0], replace(reduced(dm[1], int(x.shape[k])), jump=0.0))
    res = build(dims, extra, o.shape)
    return [res if t.shape == o.shape else None for t in op.outs]


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


def along_dim_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``softmax``/``sort``/``cumsum``/``flip``... along a dim: that dim becomes global."""
    name = op.func.__name__
    pos, default, exact = _ALONG_DIM[name]
    dim = op.arg(pos, "dims" if name in ("flip", "roll") else "dim", default)
    sel = dims_arg(dim, op.outs[0].ndim)
    if sel is None:
        raise UnhandledError  # flattened / implicit dim: everything global
    srcs = tr.sources(op.args, op.kwargs)
    res = []
    for t in op.outs:
        r = tr.elementwise(srcs, t)
        dims = list(r.dims)
        for d in sel:
            dm = dims[d]
            if dm is not None:
                dims[d] = (dm[0], centred_global(dm[1], dm[1].exact and exact))
        res.append(TensorRF(tuple(dims), r.extra))
    return res


def mix_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """Unknown spatial mixing: every traced axis becomes a global, non-exact dependency."""
    srcs = tr.sources(op.args, op.kwargs)
    res = []
    for t in op.outs:
        r = tr.elementwise(srcs, t)
        extra = {a: replace(e, exact=False) for a, e in r.extra.items()}
        # Same layout as an input (flip, fft2...): keep the grid so that centres stay
        # meaningful. Otherwise (F.unfold...) the dims no longer index positions.
        keep_grid = any(s.shape == t.shape for s, _ in srcs)
        dims = list(r.dims)
        for k, dm in enumerate(dims):
            if dm is not None:
                if keep_grid:
                    dims[k] = (dm[0], centred_global(dm[1], False))
                else:
                    merge_extra(extra, dm[0], GLOBAL_INEXACT)
                    dims[k] = None
        res.append(build(dims, extra, t.shape))
    return res


def contracting(
    tr: TraceState,
    out: torch.Tensor,
    operands: Sequence[tuple[Any, Sequence[int | None]]],
    exact: bool = True,
) -> TensorRF:
    """Generic rule for matmul-like ops.

    Args:
        tr: the tracer's records.
        out: output tensor.
        operands: per operand, a map from its dims to output dims (None = contracted, i.e.
            summed over: the axis becomes a global dependency).
        exact: exactness of the contracted (global) dependencies.

    Returns:
        The output's record.
    """
    extra: dict[int, AxisRF] = {}
    items: list[tuple[Sequence[DimRF | None], Sequence[int]]] = []
    n = out.ndim
    for t, to_out in operands:
        r = tr.lookup(t)
        if r is None:
            continue
        for a, e in r.extra.items():
            merge_extra(extra, a, e)
        dims: list[DimRF | None] = [None] * n
        shape = [1] * n
        for k, j in enumerate(to_out):
            dm = r.dims[k]
            if j is None:
                if dm is not None:
                    merge_extra(
                        extra, dm[0], replace(reduced(dm[1], int(t.shape[k]), exact), jump=0.0)
                    )
            else:
                dims[j], shape[j] = dm, int(t.shape[k])
        items.append((dims, shape))
    return combine(items, out.shape, extra)


def batch_map(t: torch.Tensor, n_out: int, core: Sequence[int | None]) -> list[int | None]:
    """Map ``t``'s leading (batch) dims right-aligned onto the output's batch dims."""
    nb = t.ndim - len(core)
    off = (n_out - len(core)) - nb
    return [off + k for k in range(nb)] + list(core)


def matmul_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``matmul``/``mm``/``bmm``/``@``: the contracted dims become global dependencies."""
    a = op.arg(0, "input")
    b = op.arg(1, "other", op.kwargs.get("mat2"))
    if op.func.__name__ == "__rmatmul__":
        a, b = b, a
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise UnhandledError
    if a.ndim < 2 or b.ndim < 2:
        raise UnhandledError
    n = op.out.ndim
    return contracting(
        tr, op.out, [(a, batch_map(a, n, [n - 2, None])), (b, batch_map(b, n, [None, n - 1]))]
    )


def linear_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``F.linear``: the last dim is contracted; traced weights count as global."""
    x, _ = input_rec(tr, op)
    n = op.out.ndim
    ops: list[tuple[Any, Sequence[int | None]]] = [(x, [*range(n - 1), None])]
    res = contracting(tr, op.out, ops)
    extra = dict(res.extra)
    for _, r in tr.sources(op.args[1:], {k: v for k, v in op.kwargs.items() if k != "input"}):
        absorb(r, extra)  # weights/bias computed from the input (hypernetworks)
    return build(res.dims, extra, op.out.shape)


def einsum_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``einsum`` without ellipsis: letters missing from the output are contracted."""
    eq = op.args[0].replace(" ", "")
    operands: Sequence[Any] = op.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if "..." in eq:
        raise UnhandledError
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "->" not in eq:  # implicit output: letters appearing once, sorted
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(operands) or len(rhs) != op.out.ndim:
        raise UnhandledError
    ops = [
        (t, [rhs.index(c) if c in rhs else None for c in term])
        for t, term in zip(operands, terms, strict=True)
    ]
    return contracting(tr, op.out, ops)


def sdpa_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``scaled_dot_product_attention``: each query sees every key and value globally."""
    q, k, v = (op.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    n = op.out.ndim
    ops = [
        (q, batch_map(q, n, [n - 2, None])),  # query i attends over every key/value
        (k, batch_map(k, n, [None, None])),
        (v, batch_map(v, n, [None, n - 1])),
    ]
    ops += [
        (m, list(range(n - m.ndim, n)))
        for m in (op.arg(3, "attn_mask"),)
        if isinstance(m, torch.Tensor) and m.ndim <= n
    ]
    return contracting(tr, op.out, ops)


def mha_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``multi_head_attention_forward`` (``nn.MultiheadAttention``), sequence-first layout."""
    q, k, v = op.args[0], op.args[1], op.args[2]
    o = op.outs[0]
    if q.ndim != o.ndim:
        raise UnhandledError
    n = o.ndim
    # (L, N, E) or unbatched (L, E): token dim 0 from the query, batch dim shared,
    # embedding mixed by the projections, keys/values seen globally.
    core: list[int | None] = [0, 1, None] if n == 3 else [0, None]
    ops: list[tuple[Any, Sequence[int | None]]] = [
        (q, core),
        (k, [None, 1, None] if n == 3 else [None, None]),
        (v, [None, 1, None] if n == 3 else [None, None]),
    ]
    res = contracting(tr, o, ops)
    rest: list[TensorRF | None] = []
    for t in op.outs[1:]:  # attention weights: conservative
        extra: dict[int, AxisRF] = {}
        for _, r in tr.sources(op.args, op.kwargs):
            absorb(r, extra)
        rest.append(TensorRF((None,) * t.ndim, extra))
    return [res, *rest]


def skip_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``*_like``/``new_*`` constructors, ``.grad``, ``.shape``: no dependency on values."""
    return SKIP


RULES: Mapping[str, RuleHandler] = {
    **dict.fromkeys(_REDUCTIONS, reduce_rule),
    **dict.fromkeys(_ALONG_DIM, along_dim_rule),
    **dict.fromkeys(
        (
            FALLBACK_RULE,
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
        ),
        mix_rule,
    ),
    **dict.fromkeys(("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"), matmul_rule),
    "linear": linear_rule,
    "einsum": einsum_rule,
    "scaled_dot_product_attention": sdpa_rule,
    "multi_head_attention_forward": mha_rule,
    **dict.fromkeys(
        (
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
        ),
        skip_rule,
    ),
}
"""Mixing rules (and the fallback, :data:`~erf_callback.trf.rules.base.FALLBACK_RULE`) by
torch function name."""

"""The contract between the tracer and its per-op rules, and the argument helpers rules share.

A rule is a :class:`RuleHandler`: it receives the tracer's view of the traced tensors
(:class:`TraceState`) and the call (:class:`OpCall`: the torch function, its arguments and its
tensor outputs), and returns the outputs' :class:`~erf_callback.trf.geometry.TensorRF` records
(:data:`RuleResult`). A rule that cannot interpret its arguments raises
:class:`UnhandledError`, and the tracer then applies the conservative :data:`FALLBACK_RULE`.

Example:
    >>> arg((1, 2), {"dim": 3}, 2, "dim")
    3
    >>> ntuple(3, 2), ntuple([2], 3)
    ((3, 3), (2, 2, 2))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, Protocol, TypeAlias

import torch

from erf_callback.trf.geometry import AxisRF, TensorRF, absorb, merge_extra

__all__ = [
    "FALLBACK_RULE",
    "MISSING",
    "SKIP",
    "OpCall",
    "RuleHandler",
    "RuleResult",
    "Skip",
    "TorchFunction",
    "TraceState",
    "UnhandledError",
    "arg",
    "dims_arg",
    "input_rec",
    "ntuple",
    "other_extras",
]

FALLBACK_RULE: Final = "<mix>"
"""Key of the rule applied when a rule raises :class:`UnhandledError` (unknown mixing)."""

TorchFunction: TypeAlias = Callable[..., Any]
"""A function seen by ``__torch_function__`` (``F.conv2d``, ``Tensor.view``, a property)."""


class UnhandledError(Exception):
    """Raised by a rule that cannot interpret its arguments: use the conservative fallback."""


class Skip:
    """Rule result: the outputs do not depend on the inputs' values (``zeros_like``)."""


SKIP: Final = Skip()

RuleResult: TypeAlias = TensorRF | Sequence[TensorRF | None] | Skip | None
"""A record shared by every output, or one per output, or :data:`SKIP`; None (for the call or
for one output) means the generic elementwise, broadcasting rule."""


class TraceState(Protocol):
    """What a rule may ask the tracer: the records of the tensors traced so far."""

    def lookup(self, t: object) -> TensorRF | None:
        """Record of ``t``, or None when ``t`` is not a traced tensor."""
        ...

    def sources(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, TensorRF]]:
        """Traced tensors among ``args``/``kwargs`` (and inside list/tuple arguments)."""
        ...

    def elementwise(
        self, srcs: Sequence[tuple[torch.Tensor, TensorRF]], out: torch.Tensor
    ) -> TensorRF:
        """Record of ``out`` under the generic rule: a broadcasting union of ``srcs``."""
        ...

    def flattened(self, t: torch.Tensor) -> tuple[tuple[int, ...], TensorRF] | None:
        """The shape and record of the tensor that ``t`` is a flattening reshape of (see
        :meth:`note_flattened`), or None."""
        ...

    def note_flattened(self, out: torch.Tensor, shape: tuple[int, ...], rec: TensorRF) -> None:
        """Remember that ``out`` reshapes a tensor of ``shape`` and record ``rec`` into fewer
        spatial dims: a reshape of ``out`` back to ``shape`` gets ``rec`` again."""
        ...


class OpCall(NamedTuple):
    """One call of a torch function during the traced forward, as a rule sees it.

    Attributes:
        func: the torch function that ran (its ``__name__`` selects a variant).
        args: its positional arguments.
        kwargs: its keyword arguments.
        out: its first tensor output (the only one for most ops).
        outs: all its tensor outputs, in order.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> op = OpCall(torch.sum, (x,), {"dim": (2, 3)}, x.sum((2, 3)), [x.sum((2, 3))])
        >>> op.arg(1, "dim"), op.arg(2, "keepdim", False)
        ((2, 3), False)
    """

    func: TorchFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: torch.Tensor
    outs: Sequence[torch.Tensor]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``name`` given at position ``i`` or by keyword, else ``default``."""
        return arg(self.args, self.kwargs, i, name, default)


class RuleHandler(Protocol):
    """A per-op rule: the geometry of an op's outputs from the geometry of its inputs."""

    def __call__(self, tr: TraceState, op: OpCall) -> RuleResult:
        """Return the records of ``op.outs``, given the tracer's records of the inputs."""
        ...


# ---------------------------------------------------------------------------------------------
# Argument helpers.
# ---------------------------------------------------------------------------------------------

MISSING: Final = object()
"""Default of :func:`arg` that tells "absent" apart from an explicit None."""


def arg(
    args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None
) -> Any:
    """Argument ``name`` given at position ``i`` or by keyword, else ``default``."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def ntuple(v: Any, n: int) -> tuple[Any, ...]:
    """``v`` repeated ``n`` times, unless it is already a (non-singleton) sequence."""
    if isinstance(v, (list, tuple, torch.Size)):
        v = tuple(v)
        return v * n if len(v) == 1 else v
    return (v,) * n


def dims_arg(dim: Any, ndim: int) -> list[int] | None:
    """Normalise a ``dim`` argument (int or sequence) to non-negative ints; None = all.

    Example:
        >>> dims_arg(-1, 4), dims_arg((1, -2), 4), dims_arg(None, 4)
        ([3], [1, 2], None)
    """
    if dim is None or dim is MISSING:
        return None
    if isinstance(dim, int) and not isinstance(dim, bool):
        return [dim % ndim] if ndim else []
    if isinstance(dim, (list, tuple, torch.Size)):
        if len(dim) == 0:
            return None
        if all(isinstance(d, int) and not isinstance(d, bool) for d in dim):
            return [d % ndim for d in dim]
    raise UnhandledError


def input_rec(tr: TraceState, op: OpCall) -> tuple[torch.Tensor, TensorRF]:
    """The op's main input and its record (:class:`UnhandledError` if it is not traced)."""
    x = op.arg(0, "input")
    if not isinstance(x, torch.Tensor):
        x = op.arg(0, "self")
    rec = tr.lookup(x)
    if rec is None:
        raise UnhandledError  # only a secondary operand is traced (e.g. a computed conv weight)
    return x, rec


def other_extras(tr: TraceState, op: OpCall, x: torch.Tensor) -> dict[int, AxisRF]:
    """Secondary traced operands (weights computed from the input...) count as global."""
    extra: dict[int, AxisRF] = {}
    for t, r in tr.sources(op.args, op.kwargs):
        if t is not x:
            absorb(r, extra)
    rec = tr.lookup(x)
    if rec is None:
        raise UnhandledError
    for a, e in rec.extra.items():
        merge_extra(extra, a, e)
    return extra

"""The per-op rule table of the TRF tracer: data, kept apart from the tracer that applies it.

:data:`RULES` maps a torch function's name (``F.conv2d.__name__ == "conv2d"``, ``"attr:mT"`` for
the ``Tensor.mT`` property) to its :class:`~erf_callback.trf.rules.base.RuleHandler`. The rules
are grouped by what the op does to positions:

* :mod:`~erf_callback.trf.rules.windows`: sliding windows (conv, pooling, pad, interpolate,
  pixel shuffle, ``Tensor.unfold``);
* :mod:`~erf_callback.trf.rules.layout`: moving values between dims (permute, reshape,
  indexing, split, cat);
* :mod:`~erf_callback.trf.rules.mixing`: mixing positions (reductions, softmax/sort along a dim,
  matmul/einsum, attention) and the conservative fallback for unknown mixing.

An op with no entry is treated as elementwise (broadcasting union of its inputs), which is
right for activations, arithmetic and normalisation layers (their statistics are not counted
as receptive field, the usual TRF convention).

Example:
    >>> RULES["conv2d"].__name__, RULES["attr:mT"].__name__, RULES["softmax"].__name__
    ('conv_rule', 'permute_rule', 'along_dim_rule')
    >>> "relu" in RULES  # elementwise: the generic rule
    False
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from erf_callback.trf.rules import layout, mixing, windows
from erf_callback.trf.rules.base import FALLBACK_RULE, RuleHandler, RuleResult, TraceState

__all__ = ["FALLBACK_RULE", "RULES", "RuleHandler", "RuleResult", "TraceState"]


def _merge(*groups: Mapping[str, RuleHandler]) -> Mapping[str, RuleHandler]:
    table: dict[str, RuleHandler] = {}
    for group in groups:
        clash = table.keys() & group.keys()
        if clash:  # two groups claiming one op: which rule wins must not depend on import order
            raise RuntimeError(f"TRF rules defined twice: {sorted(clash)}")
        table.update(group)
    return MappingProxyType(table)


RULES: Mapping[str, RuleHandler] = _merge(windows.RULES, layout.RULES, mixing.RULES)
"""Every rule by torch function name (read-only)."""

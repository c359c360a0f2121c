"""The rule table is data: disjoint groups, injectable into the tracer, with a fallback path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from erf_callback.trf import AxisRF, ReceptiveFieldTracer
from erf_callback.trf.rules import FALLBACK_RULE, RULES, _merge, layout, mixing, windows
from erf_callback.trf.rules.base import SKIP, OpCall, RuleResult, TraceState, UnhandledError


def conv_then_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.conv2d(x, torch.ones(1, 1, 3, 3)), 2)


def test_groups_are_disjoint_and_make_up_the_table() -> None:
    groups = [windows.RULES, layout.RULES, mixing.RULES]
    assert sum(len(g) for g in groups) == len(RULES)
    for g in groups:
        assert all(RULES[name] is rule for name, rule in g.items())
    assert FALLBACK_RULE in mixing.RULES
    with pytest.raises(TypeError):
        RULES["relu"] = RULES["conv2d"]


def test_a_name_in_two_groups_is_refused() -> None:
    with pytest.raises(RuntimeError, match="conv2d"):
        _merge(windows.RULES, {"conv2d": mixing.RULES["sum"]})


def test_the_tracer_applies_the_table_it_is_given() -> None:
    calls: list[str] = []

    def untraced(tr: TraceState, op: OpCall) -> RuleResult:
        calls.append(op.func.__name__)
        return SKIP

    x = torch.rand(1, 1, 16, 16)
    # Closed form with the default table: k=3 conv then a 2x2 pool: start 0, jump 2, size 4.
    with ReceptiveFieldTracer(x) as tracer:
        y = conv_then_pool(x)
    assert tracer.geometry(y).axes == (AxisRF(0.0, 2.0, 4.0, True),) * 2

    # The pooling rule replaced: the custom rule runs once, and its answer is what counts.
    with ReceptiveFieldTracer(x, rules={**RULES, "max_pool2d": untraced}) as tracer:
        y = conv_then_pool(x)
    assert len(calls) == 1 and calls[0].lstrip("_").startswith("max_pool2d")
    assert tracer.geometry(y) is None


def test_an_unhandled_call_falls_back_to_global_without_degrading() -> None:
    def refuse(tr: TraceState, op: OpCall) -> RuleResult:
        raise UnhandledError

    def crash(tr: TraceState, op: OpCall) -> RuleResult:
        raise RuntimeError("bug")

    x = torch.rand(1, 1, 16, 16)
    for rule, degraded in ((refuse, set()), (crash, {"conv2d"})):
        with ReceptiveFieldTracer(x, rules={**RULES, "conv2d": rule}) as tracer:
            y = conv_then_pool(x)
        geo = tracer.geometry(y)
        assert geo.width == (math.inf, math.inf)
        assert not geo.exact
        # UnhandledError is the expected "cannot read these arguments": the fallback rule,
        # not the bug path that records the op.
        assert tracer.degraded_ops == degraded

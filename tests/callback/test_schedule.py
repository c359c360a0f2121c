"""ProbeSchedule: each rule on its own, their union, the automatic interval."""

from __future__ import annotations

import pytest

from erf_callback.callback.schedule import DEFAULT_MAX_OVERHEAD, ProbeSchedule


def due_steps(schedule: ProbeSchedule, last: int) -> list[int]:
    return [step for step in range(last + 1) if schedule.due_at_step(step)]


def test_every_n_steps_is_due_at_the_multiples_only() -> None:
    assert due_steps(ProbeSchedule(every_n_steps=7), 30) == [0, 7, 14, 21, 28]
    assert due_steps(ProbeSchedule(every_n_steps=1), 4) == [0, 1, 2, 3, 4]


def test_every_n_epochs_is_due_at_epoch_ends_only() -> None:
    s = ProbeSchedule(every_n_epochs=3)
    assert [e for e in range(10) if s.due_at_epoch_end(e)] == [2, 5, 8]  # zero-based epochs
    assert due_steps(s, 50) == []
    assert not ProbeSchedule(every_n_steps=2).due_at_epoch_end(1)


def test_at_steps_are_exactly_the_given_steps() -> None:
    s = ProbeSchedule(at_steps=[17, 3, 3, 0])
    assert due_steps(s, 40) == [0, 3, 17]
    assert not s.is_auto


@pytest.mark.parametrize("per_decade", [1, 2, 3, 5])
def test_log_spaced_steps_are_rounded_powers_of_ten(per_decade) -> None:
    expected = sorted({round(10 ** (i / per_decade)) for i in range(3 * per_decade + 1)})
    assert due_steps(ProbeSchedule(log_spaced=per_decade), 1000) == expected


def test_rules_combine_as_a_union() -> None:
    s = ProbeSchedule(every_n_steps=10, at_steps=[5, 13], log_spaced=1, every_n_epochs=2)
    assert due_steps(s, 30) == [0, 1, 5, 10, 13, 20, 30]
    assert s.due_at_epoch_end(1) and not s.due_at_epoch_end(0)


@pytest.mark.parametrize("jump", [2, 3, 7])
def test_a_step_count_that_jumps_probes_once_per_scheduled_step_it_passes(jump) -> None:
    # Several optimisers stepped per batch move global_step by that many: every scheduled
    # step jumped over is due at the first step past it, once.
    rules = dict(every_n_steps=5, at_steps=[3, 11, 12], log_spaced=2)
    s = ProbeSchedule(**rules)
    scheduled = set(due_steps(ProbeSchedule(**rules), 200))
    seen = list(range(0, 201, jump))
    windows = list(zip([-1, *seen[:-1]], seen, strict=True))  # (previous step, step)
    due = [step for prev, step in windows if s.due_after(prev, step)]
    # Due exactly at the steps whose window (prev, step] holds a scheduled step.
    want = [step for prev, step in windows if any(prev < t <= step for t in scheduled)]
    assert due == want
    if jump == 2:
        # 0; then 1, 3, 5, 10, 11-12, 15 and 20, each at the first even step at or past it.
        assert due[:8] == [0, 2, 4, 6, 10, 12, 16, 20]


def test_unit_steps_are_due_exactly_at_the_scheduled_steps() -> None:
    s = ProbeSchedule(every_n_steps=7, at_steps=[3, 50], log_spaced=3)
    assert [t for t in range(400) if s.due_after(t - 1, t)] == due_steps(s, 399)
    assert due_steps(s, 30) == [0, 1, 2, 3, 5, 7, 10, 14, 21, 22, 28]


def test_automatic_interval_meets_the_overhead_budget() -> None:
    s = ProbeSchedule()
    assert s.is_auto and s.max_overhead == DEFAULT_MAX_OVERHEAD
    assert due_steps(s, 500) == []  # nothing is due before the interval is chosen
    # 3 s per probe, 1 s per step, 2% budget: a probe every 3 / (0.02 * 1) = 150 steps.
    assert s.choose_auto_interval(probe_seconds=3.0, step_seconds=1.0) == 150
    assert s.next_auto_step == 150 and s.due_at_step(150) and not s.due_at_step(149)
    # 3 s already spent after 10 s of training: the next probe waits until the run so far
    # (spent + next probe) fits the budget: (3 + 3) / 0.02 = 300 s of training, step 300.
    k = s.choose_auto_interval(3.0, 1.0, spent_seconds=3.0, trained_seconds=10.0, step=10)
    assert k == 290 and s.next_auto_step == 300
    assert 0.02 * (10.0 + k * 1.0) + 1e-12 >= 3.0 + 3.0
    assert 0.02 * (10.0 + (k - 1) * 1.0) < 3.0 + 3.0  # the fewest such steps
    tight = ProbeSchedule(max_overhead=0.5)
    assert tight.choose_auto_interval(probe_seconds=0.1, step_seconds=1.0) == 1
    assert tight.choose_auto_interval(probe_seconds=1.0, step_seconds=0.0) > 10**8  # no div 0


def test_explicit_rules_ignore_an_automatic_interval() -> None:
    s = ProbeSchedule(every_n_epochs=1, auto_interval=5)
    assert not s.is_auto
    assert due_steps(s, 20) == []
    assert due_steps(ProbeSchedule(auto_interval=5), 12) == [0, 5, 10]  # restored from state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive int"),
        ({"every_n_steps": 2.5}, "every_n_steps must be a positive int"),
        ({"every_n_steps": True}, "every_n_steps must be a positive int"),
        ({"every_n_epochs": -1}, "every_n_epochs must be a positive int"),
        ({"log_spaced": 0}, "log_spaced must be a positive int"),
        ({"max_overhead": 0.0}, r"max_overhead must be in \(0, 1\)"),
        ({"max_overhead": 1.0}, r"max_overhead must be in \(0, 1\)"),
        ({"at_steps": [3, -1]}, "at_steps must be non-negative ints"),
        ({"at_steps": [2.5]}, "at_steps must be non-negative ints"),
        ({"at_steps": [False]}, "at_steps must be non-negative ints"),
        # Values int() cannot take, or takes wrongly: the rule's own message, not int()'s.
        ({"every_n_steps": "abc"}, "every_n_steps must be a positive int"),
        ({"every_n_steps": "100"}, "every_n_steps must be a positive int"),
        ({"every_n_steps": float("nan")}, "every_n_steps must be a positive int"),
        ({"every_n_epochs": float("inf")}, "every_n_epochs must be a positive int"),
        ({"log_spaced": [4]}, "log_spaced must be a positive int"),
        ({"at_steps": [0, None]}, "at_steps must be non-negative ints"),
        ({"at_steps": ["10"]}, "at_steps must be non-negative ints"),
        ({"at_steps": [float("nan")]}, "at_steps must be non-negative ints"),
    ],
)
def test_bad_rules_are_rejected_with_the_rule_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ProbeSchedule(**kwargs)


def test_integral_numbers_of_any_type_are_rules() -> None:
    import numpy as np

    assert due_steps(ProbeSchedule(every_n_steps=np.int64(5)), 12) == [0, 5, 10]
    assert due_steps(ProbeSchedule(every_n_steps=5.0), 12) == [0, 5, 10]  # e.g. 1e3
    assert due_steps(ProbeSchedule(at_steps=[np.int32(3), 7.0]), 10) == [3, 7]


def test_at_steps_as_an_array_or_a_tensor_are_their_numbers():
    # np.array([5, 10]) failed with numpy's "truth value of an array is ambiguous".
    import numpy as np
    import torch

    for steps in (np.array([10, 5]), torch.tensor([10, 5]), range(5, 11, 5)):
        schedule = ProbeSchedule(at_steps=steps)
        assert [s for s in range(12) if schedule.due_at_step(s)] == [5, 10]
    with pytest.raises(ValueError, match="at_steps must be non-negative ints"):
        ProbeSchedule(at_steps=np.array([5, -1]))

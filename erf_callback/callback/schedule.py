"""When to probe: every N optimiser steps, every N epochs, at given steps, log-spaced, or auto."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from erf_callback.engine.config import as_python

__all__ = ["AUTO_WARMUP_STEPS", "DEFAULT_MAX_OVERHEAD", "ProbeSchedule"]

#: Probing may cost at most this fraction of training time under the automatic schedule.
DEFAULT_MAX_OVERHEAD = 0.02
#: Optimiser steps timed before the automatic interval is fixed.
AUTO_WARMUP_STEPS = 10


def _whole(value: object) -> bool:
    """A whole number that is not a bool: an int, a NumPy integer or an integral float such
    as ``1e3``; a string, NaN, infinity or a list is not (and gets the rule's own error
    rather than ``int()``'s)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return math.isfinite(value) and float(value).is_integer()


@dataclass
class ProbeSchedule:
    """Decides at which ``global_step`` (optimiser steps) and epoch ends a probe runs.

    Several rules may be combined; a step is due when any rule says so. When no rule is given
    the schedule is automatic: after :data:`AUTO_WARMUP_STEPS` steps, and again after every
    probe, the next probe is placed so that all probe time so far, the next probe included,
    stays within ``max_overhead`` of the training time so far (see
    :meth:`choose_auto_interval`).

    Args:
        every_n_steps: probe when ``global_step % every_n_steps == 0``. Like every rule
            over steps, a scheduled step that ``global_step`` jumps over (several optimisers
            stepped per batch) is due at the first step past it (:meth:`due_after`).
        every_n_epochs: probe at the end of every N-th training epoch.
        at_steps: explicit steps.
        log_spaced: probes per decade of steps (``round(10 ** (i / log_spaced))``): dense
            early, where the ERF moves most.
        max_overhead: budget of the automatic schedule.

    Example:
        >>> s = ProbeSchedule(every_n_steps=100, log_spaced=2)
        >>> [step for step in range(1, 400) if s.due_at_step(step)]
        [1, 3, 10, 32, 100, 200, 300, 316]
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_steps: Iterable[int] | None = None
    log_spaced: int | None = None
    max_overhead: float = DEFAULT_MAX_OVERHEAD
    auto_interval: int | None = None
    next_auto_step: int | None = None
    _at: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs", "log_spaced"):
            value = getattr(self, name)
            if value is not None and not (_whole(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int or None; got {value!r}")
        overhead: object = self.max_overhead  # checked whatever the annotation says
        if isinstance(overhead, bool) or not isinstance(overhead, numbers.Real):
            raise ValueError(f"max_overhead must be a number in (0, 1); got {overhead!r}")
        if not 0 < float(overhead) < 1:
            raise ValueError(f"max_overhead must be in (0, 1); got {overhead}")
        self.at_steps = as_python(self.at_steps)
        if self.at_steps is not None and (
            isinstance(self.at_steps, (str, bytes)) or not isinstance(self.at_steps, Iterable)
        ):
            raise ValueError(
                f"at_steps must be a sequence of non-negative ints, e.g. [0, 100, 1000]; got "
                f"{self.at_steps!r}"
            )
        steps = list(self.at_steps or [])
        if not all(_whole(s) and s >= 0 for s in steps):
            raise ValueError(f"at_steps must be non-negative ints; got {steps}")
        self._at = frozenset(int(s) for s in steps)

    @property
    def is_auto(self) -> bool:
        """True when no explicit rule was given."""
        return not (self.every_n_steps or self.every_n_epochs or self._at or self.log_spaced)

    def due_at_step(self, step: int) -> bool:
        """Whether a probe is due right after the optimiser step that made ``global_step``
        (the step before it being ``step - 1``; see :meth:`due_after`)."""
        return self.due_after(step - 1, step)

    def due_after(self, previous: int, step: int) -> bool:
        """Whether a probe is due at ``step``, the last one seen being ``previous``: whether a
        scheduled step lies in ``(previous, step]``.

        ``global_step`` counts optimiser steps, so it moves by more than one per batch when a
        batch steps several optimisers (a GAN's generator and discriminator, manual
        optimisation): a schedule of exact steps would then miss every step it jumps over
        (``every_n_steps=5`` probing only at multiples of 10, odd ``at_steps`` never).

        Example:
            >>> s = ProbeSchedule(every_n_steps=5, at_steps=[3])
            >>> [step for step in range(0, 21, 2) if s.due_after(step - 2, step)]
            [0, 4, 6, 10, 16, 20]
        """
        if any(previous < at <= step for at in self._at):
            return True
        if self.is_auto and self.next_auto_step is not None:
            return step >= self.next_auto_step
        interval = self.every_n_steps or (self.auto_interval if self.is_auto else None)
        if interval and step // interval > previous // interval:
            return True
        return bool(self.log_spaced) and previous < self._next_log_step(previous) <= step

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether a probe is due at the end of (zero-based) ``epoch``."""
        n = self.every_n_epochs
        return bool(n and (epoch + 1) % n == 0)

    def choose_auto_interval(
        self,
        probe_seconds: float,
        step_seconds: float,
        spent_seconds: float = 0.0,
        trained_seconds: float = 0.0,
        step: int = 0,
    ) -> int:
        """Place the next automatic probe; returns the interval in steps.

        The next probe (expected to take ``probe_seconds``) comes after the fewest steps of
        ``step_seconds`` for which ``spent + probe <= max_overhead * (trained + interval *
        step_seconds)``: the budget holds over the run so far, and time overspent earlier
        (a slow first probe, a probe slower than expected) is paid back by a longer gap.

        Example:
            >>> s = ProbeSchedule(max_overhead=0.02)
            >>> s.choose_auto_interval(3.0, 1.0)  # steady state: 3 s / (2% of 1 s)
            150
            >>> s.choose_auto_interval(3.0, 1.0, spent_seconds=3.0, trained_seconds=10.0, step=10)
            290
            >>> s.next_auto_step
            300
        """
        step_s = max(step_seconds, 1e-9)
        steady = probe_seconds / (self.max_overhead * step_s)
        catch_up = ((spent_seconds + probe_seconds) / self.max_overhead - trained_seconds) / step_s
        # 1e-9: float noise must not add a step to an exact fit
        interval = max(1, math.ceil(max(steady, catch_up) - 1e-9))
        self.auto_interval = interval
        self.next_auto_step = step + interval
        return interval

    def _next_log_step(self, step: int) -> int:
        """The first log-spaced step (``round(10 ** (j / log_spaced))``, ``j >= 0``) after
        ``step``."""
        assert self.log_spaced
        j = max(0, math.floor(self.log_spaced * math.log10(step))) if step >= 1 else 0
        while round(10 ** (j / self.log_spaced)) <= step:
            j += 1
        return round(10 ** (j / self.log_spaced))

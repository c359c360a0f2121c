"""Side work of the monitor (files, loggers, memory) that must never end a training run.

Probing is guarded in :mod:`erf_callback.callback.core`; this module guards everything around
it: writing the history, calling loggers, rendering images. A failure is reported once per
cause as an :class:`~erf_callback.ERFWarning` and the work is skipped; the monitor keeps its
state, so the next successful call catches up (the history files are always rewritten whole).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["Guard", "free_probe_memory", "has_nonfinite_state", "is_out_of_memory"]

Warn = Callable[[str, str], None]


class Guard:
    """Runs a call; on any ``Exception`` warns once per ``key`` and returns ``None``.

    Args:
        warn: ``warn(key, message)``, issuing ``message`` once per ``key``.

    Example:
        >>> said = []
        >>> guard = Guard(lambda key, message: said.append(message))
        >>> guard.call("disk", "writing the history to '/x'", lambda: 1 / 0) is None
        True
        >>> said
        ["ERFMonitor: writing the history to '/x' failed (ZeroDivisionError: division by zero); training goes on."]
    """  # noqa: E501

    def __init__(self, warn: Warn) -> None:
        self._warn = warn

    def call(
        self, key: str, what: str, fn: Callable[..., Any], *args: Any, then: str = "", **kw: Any
    ) -> Any:
        """``fn(*args, **kw)``, or ``None`` after a warning naming ``what`` and the error."""
        try:
            return fn(*args, **kw)
        except Exception as err:
            tail = f" {then}" if then else ""
            self._warn(
                key,
                f"ERFMonitor: {what} failed ({type(err).__name__}: {err});{tail} training goes on.",
            )
            return None

    def each_logger(
        self, loggers: Iterable[Any], what: str, fn: Callable[[list[Any]], Any], step: int
    ) -> None:
        """``fn([logger])`` for every logger on its own, so one failing logger spares the rest."""
        for logger in loggers:
            name = type(logger).__name__
            self.call(
                f"logger:{name}:{what}",
                f"logging ERF {what} to {name} at step {step}",
                fn,
                [logger],
                then=f"{name} misses these ERF {what} (this warning is shown once);",
            )


def has_nonfinite_state(module: torch.nn.Module) -> bool:
    """True when a parameter or floating-point buffer holds NaN/Inf (a diverged model).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> has_nonfinite_state(net)
        False
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(float("nan"))
        >>> has_nonfinite_state(net)
        True
    """
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return True
    return False


def is_out_of_memory(err: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and the ``RuntimeError``s older code raises for OOM.

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
        True
        >>> is_out_of_memory(ValueError("channels out of range"))
        False
    """
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_probe_memory() -> None:
    """Release what a failed probe left: reference cycles held by its traceback, then the
    CUDA caching allocator's free blocks, so the next training step has the memory it had."""
    gc.collect()
    if _cuda_in_use():
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    torch.cuda.empty_cache()


def _cuda_in_use() -> bool:
    # Never initialise CUDA just to empty its cache.
    return torch.cuda.is_available() and torch.cuda.is_initialized()

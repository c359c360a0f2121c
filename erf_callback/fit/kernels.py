"""Which implementation the 2-D Gaussian fit runs: compiled kernels when numba can load
them, numpy otherwise.

On a 64 x 64 map the numpy fit of a floored or noisy ERF is ~150 calls of a few
microseconds each: call overhead, not arithmetic, sets its time. The kernels of
:mod:`erf_callback.fit._compiled` do the same passes in a handful of compiled calls. They are
compiled on first use and cached on disk by numba (a few seconds, once per environment;
loading the cache then takes under a second per process). Where numba is missing or cannot
compile, the fit runs its numpy path, with the same results to rounding. Setting the
environment variable ``ERF_CALLBACK_JIT=0`` chooses the numpy path.

Example:
    >>> from erf_callback.fit import kernels
    >>> kernels.compiled() is None or hasattr(kernels.compiled(), "levenberg_marquardt")
    True
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

import numpy as np

__all__ = ["JIT_ENV", "compiled", "contiguous"]

#: Environment variable that turns the compiled kernels off (``0``, ``false``, ``no``, ``off``).
JIT_ENV = "ERF_CALLBACK_JIT"
_OFF = ("0", "false", "no", "off")

_log = logging.getLogger(__name__)
_UNTRIED = object()
_loaded: object = _UNTRIED
_lock = threading.Lock()  # one import and compile, whichever thread fits first


def compiled() -> ModuleType | None:
    """The compiled kernels, or None where the numpy path runs (numba missing or failing,
    or turned off by ``ERF_CALLBACK_JIT``). The first call imports and compiles them."""
    global _loaded
    if os.environ.get(JIT_ENV, "").strip().lower() in _OFF:
        return None
    if _loaded is _UNTRIED:
        with _lock:
            if _loaded is _UNTRIED:
                _loaded = _load()
    return _loaded if isinstance(_loaded, ModuleType) else None


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous, writable float64 array (a copy only where it is not): the one
    array type the kernels are compiled for, so no call compiles another version."""
    if a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


def _load() -> ModuleType | None:
    try:
        from erf_callback.fit import _compiled
    except ImportError:
        _log.debug("numba is not installed: the Gaussian fit runs on numpy")
        return None
    except Exception as err:  # numba present but unable to set up (e.g. no cache location)
        _log.warning("erf-callback: compiled fit kernels unavailable (%s); using numpy", err)
        return None
    try:
        _warm_up(_compiled)
    except Exception as err:  # a compile failure costs speed, never the fit
        _log.warning("erf-callback: compiled fit kernels failed (%s); using numpy", err)
        return None
    return _compiled


def _warm_up(module: ModuleType) -> None:
    """Compiles every kernel now, with the argument types the fit passes (read-only grid
    coordinates, contiguous float64 maps), so no later call compiles or fails."""
    u = np.linspace(-1.0, 1.0, 4)
    u.flags.writeable = False
    target = np.exp(-2.0 * (u[:, None] ** 2 + u[None, :] ** 2))
    coef = np.array([0.0, 0.0, 0.0, -2.0, 0.0, -2.0])
    buffers = [np.empty((4, 4)) for _ in range(4)]
    module.levenberg_marquardt(u, u, target, 0.0, coef, True, 1e-12, 2, 1e-13, 1e-2, *buffers)
    module.log_linear(u, u, target, 0.0, 0.1, 1e-12, np.empty(6))
    module.region_sums(target, 0.5, np.empty((3, 3)))
    idx = np.arange(4.0)
    module.clipped_stats(np.array([1.0, 2.0, 2.0, 5.0]))
    module.far_values(
        idx, idx, target, 1.5, 1.5, 1.0, 0.0, 1.0, np.array([5.0, 4.0, 3.0]), 8, 1.0, np.empty(16)
    )

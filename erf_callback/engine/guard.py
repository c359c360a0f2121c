"""Leave a model exactly as it was found after probing it.

Probing switches to eval mode, turns off weight gradients and autocast, and runs a forward
whose hooks may stop it early. :func:`probe_context` undoes all of it: each submodule's own
``training`` flag (never a blanket ``.train()``, which would unfreeze frozen parts), each
parameter's ``requires_grad``, every buffer whose version counter moved, and the RNG streams of
torch (CPU and the CUDA devices in use), NumPy and Python.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["preserved_rng", "probe_context"]


@contextmanager
def preserved_rng(devices: Sequence[torch.device | str] | None = None) -> Iterator[None]:
    """Give back the RNG streams of torch, NumPy and Python exactly as they were.

    Args:
        devices: devices whose CUDA generators are saved too. ``None``: every initialised
            CUDA device.

    Example:
        >>> state = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """
    if devices is None:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    else:
        cuda = sorted({d.index or 0 for d in map(torch.device, devices) if d.type == "cuda"})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def probe_context(model: nn.Module, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Eval mode, no weight gradients, no autocast, restored state and RNG afterwards.

    Args:
        model: the module to probe (already unwrapped from DDP / ``torch.compile``).
        devices: devices the probe runs on; CUDA ones get their RNG state saved too.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Dropout())
        >>> with probe_context(net):
        ...     net.training, net[0].weight.requires_grad
        (False, False)
        >>> net.training, net[0].weight.requires_grad
        (True, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    device_type = torch.device(next(iter(devices), torch.device("cpu"))).type
    try:
        with preserved_rng(devices), torch.autocast(device_type, enabled=False):
            model.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, version, saved in buffers:
                if b._version != version:
                    b.copy_(saved)

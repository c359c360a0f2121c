"""Leave a model exactly as it was found after probing it.

Probing switches to eval mode, turns off weight gradients and autocast, and runs a forward
whose hooks may stop it early. :func:`probe_context` undoes all of it: each submodule's own
``training`` flag (never a blanket ``.train()``, which would unfreeze frozen parts), each
parameter's ``requires_grad``, every buffer whose value changed (bitwise), and the RNG streams
of torch (CPU and the CUDA devices in use), NumPy and Python.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["plain_attributes", "preserved_rng", "probe_context"]


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
def probe_context(
    model: nn.Module,
    devices: Sequence[torch.device] = (),
    modules: Sequence[nn.Module] | None = None,
) -> Iterator[None]:
    """Eval mode, no weight gradients, no autocast, gradients on (also inside ``no_grad`` or
    ``inference_mode``), restored state and RNG afterwards.

    Args:
        model: the module to probe (already unwrapped from DDP / ``torch.compile``).
        devices: devices the probe runs on; CUDA ones get their RNG state saved too.
        modules: ``list(model.modules())``, where the caller has it already.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Dropout())
        >>> with probe_context(net):
        ...     net.training, net[0].weight.requires_grad
        (False, False)
        >>> net.training, net[0].weight.requires_grad
        (True, True)
    """
    modules = list(model.modules()) if modules is None else list(modules)
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for p in _unique(m._parameters for m in modules)]
    buffers = _BufferSnapshot(modules)
    device_type = torch.device(next(iter(devices), torch.device("cpu"))).type
    try:
        with preserved_rng(devices), torch.autocast(device_type, enabled=False):
            _set_eval(model, modules)
            for p, _ in grads:
                p.requires_grad_(False)
            # A caller inside torch.inference_mode (a notebook cell, a validation hook) would
            # get tensors autograd cannot use; the probe leaves that mode, as it leaves no_grad.
            with torch.inference_mode(False), torch.enable_grad():
                yield
    finally:
        _restore_modes(modes)
        for p, flag in grads:
            if p.requires_grad is not flag:
                p.requires_grad_(flag)
        buffers.restore()


_TRAIN = nn.Module.train


def plain_attributes(module: nn.Module) -> bool:
    """Whether ``module``'s class keeps ``nn.Module``'s own ``__setattr__`` and
    ``__delattr__``: then setting or deleting a plain attribute (``training``, an instance
    ``forward``) is all a write to or removal from its ``__dict__`` does, ~3 us less each.
    Shared by the guard's flags and the fast path's shadow forwards."""
    cls = type(module)
    return (
        getattr(cls, "__setattr__", None) is nn.Module.__setattr__
        and getattr(cls, "__delattr__", None) is nn.Module.__delattr__
    )


def _set_flag(module: nn.Module, mode: bool) -> None:
    if plain_attributes(module):
        module.__dict__["training"] = mode
    else:  # e.g. torchmetrics' Metric: its own __setattr__ sees the write
        module.training = mode


def _set_eval(model: nn.Module, modules: list[nn.Module]) -> None:
    """``model.eval()``, by setting each module's flag directly when no class overrides
    ``train`` (``Module.__setattr__`` and the recursion cost ~0.4 ms per probe of a ResNet); a
    model where one does gets its own ``.eval()``, so the override runs."""
    if any(cls.train is not _TRAIN for cls in {type(m) for m in modules}):
        model.eval()
        return
    for m in modules:
        if m.training:
            _set_flag(m, False)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Each module's own ``training`` flag back (never a blanket ``.train()``, which would
    unfreeze frozen parts); only changed flags are written."""
    for m, mode in modes:
        if m.training is not mode:
            _set_flag(m, mode)


def _unique(tables: Iterable[Mapping[str, torch.Tensor | None]]) -> list[torch.Tensor]:
    """The tensors of the modules' parameter or buffer tables, each once, in module order:
    ``parameters()`` / ``buffers()`` without building every tensor's qualified name."""
    seen: set[int] = set()
    out = []
    for table in tables:
        for t in table.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class _BufferSnapshot:
    """The buffers of modules as they are: which tensor each module holds under each name, and
    every tensor's value; :meth:`restore` puts back what a probe changed.

    A forward may replace a buffer (a cache rebuilt for another input size) or register one:
    each module gets its own table back. A change of value is found by the bytes, not by the
    version counter: kernels that update statistics in place (``F.batch_norm`` with
    ``training=True``) write buffers without moving it. The copies of the dense buffers of
    one device and dtype are one flat tensor, compared with their values afterwards in one go
    (a ResNet has ~60 buffers, and on a GPU each separate copy or comparison is a launch the
    probe waits for). A buffer is written only if its bytes differ, so an untouched one keeps
    its version counter (a graph the user still holds that saved it stays valid).

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> snap = _BufferSnapshot([bn])
        >>> _ = bn.train()(torch.randn(4, 2))  # updates the running statistics
        >>> snap.restore()
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        # Most modules hold no buffers: theirs is checked for emptiness only.
        self._empty = [m for m in modules if not m._buffers and not m._non_persistent_buffers_set]
        self._tables = [
            (m, dict(m._buffers), set(m._non_persistent_buffers_set))
            for m in modules
            if m._buffers or m._non_persistent_buffers_set
        ]
        self._groups: list[tuple[list[torch.Tensor], list[torch.Size], torch.Tensor]] = []
        self._others: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for b in _unique(m._buffers for m in modules):
            plain = type(b) is torch.Tensor and b.layout == torch.strided
            if plain and not (b.is_meta or b.is_quantized):
                groups.setdefault((b.device, b.dtype), []).append(b)
            else:  # sparse, quantized, tensor subclasses: copied one by one, checked by version
                self._others.append((b, b._version, b.detach().clone()))
        for members in groups.values():
            shapes = [b.shape for b in members]
            self._groups.append((members, shapes, _flat(members)))

    def restore(self) -> None:
        """Each module's buffer table, then the saved values of every buffer whose bytes
        changed."""
        for m in self._empty:
            if m._buffers or m._non_persistent_buffers_set:
                m._buffers.clear()
                m._non_persistent_buffers_set.clear()
        for m, table, non_persistent in self._tables:
            now = m._buffers
            if (
                now.keys() != table.keys()
                or any(now[k] is not t for k, t in table.items())
                or m._non_persistent_buffers_set != non_persistent
            ):
                now.clear()
                now.update(table)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
        with torch.no_grad():
            for members, shapes, saved in self._groups:
                if [b.shape for b in members] == shapes and _same_bytes(_flat(members), saved):
                    continue
                offset = 0
                for b, shape in zip(members, shapes, strict=True):
                    n = shape.numel()
                    old = saved[offset : offset + n].view(shape)
                    offset += n
                    if b.shape != shape:  # resized in place: its old shape and values back
                        b.resize_(shape)
                        b.copy_(old)
                    elif not _same_bytes(b.reshape(-1), old.reshape(-1)):
                        b.copy_(old)
            for b, version, old in self._others:
                if b._version != version:
                    b.copy_(old)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, concatenated: one op, no view per tensor where they are all 1-D
    (running statistics) or all 0-D (BatchNorm's ``num_batches_tracked``, stacked)."""
    with torch.no_grad():
        if all(t.dim() == 0 for t in tensors):
            return torch.stack(tensors)
        return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two flat tensors of one dtype (NaN equals itself, -0.0 != 0.0)."""
    if a.dtype.is_complex:
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))

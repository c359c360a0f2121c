"""What the traced first sample of a probe showed, remembered per model for the next probe.

The first chunk of every probe runs the model as written under the receptive-field tracer, a
memory meter and a recorder of which convolution feeds which BatchNorm (see
:mod:`.compute`). On a small input or a fast GPU that one sample is a large part of the probe:
~15% of a ResNet-18 probe at 64x64 on CPU, more than the whole batched pass on an H100.
What it shows depends only on the model's structure and the input's shape, so repeated probes
of one model (the callback's every probe, a sweep of positions or channels) reuse it.

A remembered trace is used only when the model's **fingerprint** is unchanged: for every
submodule its identity, its children by name and identity, its class and the class's
``forward``, each attribute of its ``__dict__`` but plain ``int`` and ``float`` ones (tuples
such as ``stride``, ``dilation`` and ``padding``, strings, flags, an instance ``forward``,
every hook dictionary), and the type, shape, dtype and device of its parameters and buffers.
Values are left out on purpose: weights change every step (the shadow weights of
:mod:`.fastpath` are rebuilt from them at every probe), and training code keeps step counters
and loss scales as ``int`` / ``float`` attributes of its modules. So are the ``training`` flag
(the probe sets eval mode) and Lightning's ``_current_fx_name`` (the hook it is running).
Replacing a module, changing a conv's stride or dilation, registering a hook or patching
``forward`` all change the fingerprint, and the next probe traces again; a probed layer whose
output shape differs from the remembered one makes the probe start again, traced. What neither
can see is a change that keeps every probed output shape and lives outside the fingerprint:
state outside the modules (a global flag, a class attribute), an ``int`` hyper-parameter
changed in place (a pooling's ``dilation`` given as an int, with its ``padding`` changed to
keep the shape).
:func:`clear_trace_cache` is the way out there; ``optimize=False`` never uses the cache.

When the check runs: on a CPU before the probe's chunks. On a GPU the fingerprint (~0.3 ms
of Python for a ResNet-18, more when it runs cold) would delay the probe's first kernel, so a
record may be used *speculatively* (see :class:`TraceCache`): the chunks' kernels are queued
first and the fingerprint is compared while the device works; a changed model's result is
thrown away and the probe starts again, traced. Only a model whose modules and hooks are
those of the record's probe (:func:`hooks_key`) is probed that way, so no hook registered
since sees a forward whose result is thrown away.

Memory: a handful of small records per model, held weakly (a model that is garbage collected
takes its records with it), at most :data:`MAX_ENTRIES` per model.
"""

from __future__ import annotations

import enum
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from erf_callback.engine.fastpath import Recipe
from erf_callback.trf import RFGeometry

__all__ = [
    "MAX_ENTRIES",
    "TRACES",
    "CacheEntry",
    "TraceCache",
    "TracedProbe",
    "clear_trace_cache",
    "hooks_key",
    "model_fingerprint",
    "probe_key",
]

#: Records kept per model; the least recently used is dropped first (every probe that finds a
#: record makes it the most recent, so configurations probed in turn stay cached).
MAX_ENTRIES = 8

# Module attributes the fingerprint leaves out: the probe forces eval mode itself, the
# parameter/buffer/child dictionaries are summarised separately (shapes, not values), and
# Lightning keeps the name of the hook it is running on a LightningModule (the callback's
# first probe runs in another hook than its training-step probes).
_SUMMARISED = frozenset({"training", "_parameters", "_buffers", "_modules", "_current_fx_name"})
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_SCALAR_TYPES = frozenset(_SCALARS)
_PLAIN = _SCALAR_TYPES - {int, float}
_SKIPPED = frozenset({int, float})
_CONTAINERS = frozenset({OrderedDict, dict, set, list})
_MAX_ITEMS = 256
_MAX_DEPTH = 4


@dataclass
class TracedProbe:
    """What one traced first chunk showed, for one model, layer list and input shape.

    Attributes:
        output_shapes: per probed layer, its output shape without the batch dim.
        geometries: per probed layer, its traced TRF geometry (None where untraceable).
        per_sample_bytes: the saved activations of one sample, for ``chunk_size="auto"``.
        recipe: the fast path's plan (reached convolutions, folded pairs, channels_last), or
            None where the model runs as written.
    """

    output_shapes: dict[str, tuple[int, ...]]
    geometries: dict[str, RFGeometry | None]
    per_sample_bytes: float
    recipe: Recipe | None


class CacheEntry(NamedTuple):
    """One remembered trace: the fingerprint of the model it was made on, the record, whether
    the next probe may use it before checking the fingerprint, and the :func:`hooks_key` it
    must then still match (see :class:`TraceCache`)."""

    fingerprint: Hashable
    record: TracedProbe
    speculative: bool
    hooks: Hashable = None


class _Identity:
    """Compares by identity. Weakly held where possible: a fingerprint must not keep the
    model alive through, say, a hook closure; an object that died compares unequal to
    everything, so its ``id`` being reused cannot make a stale record match."""

    __slots__ = ("_hash", "_ref", "_strong")

    def __init__(self, obj: object) -> None:
        self._hash = id(obj)
        try:
            self._ref: weakref.ref[Any] | None = weakref.ref(obj)
            self._strong: object = None
        except TypeError:  # not weak-referenceable: hold it (its id stays unique meanwhile)
            self._ref, self._strong = None, obj

    def _get(self) -> object:
        return self._strong if self._ref is None else self._ref()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity) or other._hash != self._hash:
            return False
        obj = self._get()
        return (obj is not None or self._ref is None) and obj is other._get()

    def __hash__(self) -> int:
        return self._hash


def _tensor_summary(t: torch.Tensor | None) -> Hashable:
    if t is None:
        return None
    return (type(t), tuple(t.shape), t.dtype, t.device)


def _freeze(v: Any, depth: int = 0) -> Hashable:
    """A hashable, comparable stand-in for an attribute value (tensors by shape, not value)."""
    if isinstance(v, (_SCALARS, enum.Enum)):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", *_tensor_summary(v))  # type: ignore[misc]
    if isinstance(v, nn.Module):
        return ("module", id(v))  # its own entry of the fingerprint describes it
    if isinstance(v, np.ndarray):
        return ("ndarray", v.shape, v.dtype.str)
    if depth < _MAX_DEPTH:
        if isinstance(v, (tuple, list)) and len(v) <= _MAX_ITEMS:
            return (type(v), tuple(_freeze(x, depth + 1) for x in v))
        if isinstance(v, Mapping) and len(v) <= _MAX_ITEMS:
            return (
                type(v),
                tuple((_freeze(k, depth + 1), _freeze(x, depth + 1)) for k, x in v.items()),
            )
        if isinstance(v, (set, frozenset)) and len(v) <= _MAX_ITEMS:
            return (type(v), frozenset(_freeze(x, depth + 1) for x in v))
    return _Identity(v)


def model_fingerprint(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Hashable:
    """Everything about ``model`` that can change its traced geometry or its fast path.

    ``modules``: ``list(model.modules())`` where the caller has it already.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3))
        >>> before = model_fingerprint(net)
        >>> before == model_fingerprint(net)
        True
        >>> net[0].dilation = (2, 2)
        >>> before == model_fingerprint(net)
        False
    """
    # Hot path (every probe walks every module): plain values are kept as they are, empty
    # hook dictionaries as (), only the rest goes through _freeze.
    mm = nn.modules.module
    parts: list[Hashable] = [(tuple(mm._global_forward_hooks), tuple(mm._global_forward_pre_hooks))]
    plain, summarised, skipped, containers = _PLAIN, _SUMMARISED, _SKIPPED, _CONTAINERS
    scalar_types = _SCALAR_TYPES
    # No names: each module's children by name and identity give the whole tree (and building
    # every qualified name was a fifth of the cost).
    for m in model.modules() if modules is None else modules:
        attrs: list[Hashable] = []
        for k, v in m.__dict__.items():
            t = type(v)
            if t in plain:
                if k not in summarised:  # "training", Lightning's "_current_fx_name"
                    attrs.append((k, v))
            elif t in skipped or k in summarised:
                continue  # int / float: step counters and the like; see the module docstring
            elif t in containers and not v:
                attrs.append((k, t))  # the many empty hook dictionaries
            elif t is tuple and scalar_types.issuperset(map(type, v)):
                attrs.append((k, v))  # kernel_size, stride, ...: tuples of ints
            else:
                attrs.append((k, _freeze(v)))
        p, b, c = m._parameters, m._buffers, m._modules
        params = tuple([(k, _tensor_summary(x)) for k, x in p.items()]) if p else ()
        buffers = tuple([(k, _tensor_summary(x)) for k, x in b.items()]) if b else ()
        children = tuple([(k, id(x)) for k, x in c.items()]) if c else ()
        cls = type(m)
        parts.append((id(m), cls, cls.forward, tuple(attrs), params, buffers, children))
    return tuple(parts)


def hooks_key(modules: Sequence[nn.Module]) -> Hashable:
    """The modules (by identity, in order) and every hook and instance ``forward`` on them,
    global hooks included: what decides which code beside the modules' own a forward runs.

    Hook dictionaries are keyed by their handle's id, which is never reused, so a hook removed
    and registered again changes the key.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3))
        >>> before = hooks_key(list(net.modules()))
        >>> _ = net[0].register_forward_hook(lambda *args: None)
        >>> before == hooks_key(list(net.modules()))
        False
    """
    mm = nn.modules.module
    hooked = []
    for m in modules:
        if (
            m._forward_hooks
            or m._forward_pre_hooks
            or m._backward_hooks
            or m._backward_pre_hooks
            or "forward" in m.__dict__
        ):
            hooked.append(
                (
                    id(m),
                    tuple(m._forward_hooks),
                    tuple(m._forward_pre_hooks),
                    tuple(m._backward_hooks),
                    tuple(m._backward_pre_hooks),
                    id(m.__dict__.get("forward")),
                )
            )
    return (
        tuple(map(id, modules)),
        tuple(hooked),
        tuple(mm._global_forward_hooks),
        tuple(mm._global_forward_pre_hooks),
        tuple(mm._global_backward_hooks),
        tuple(mm._global_backward_pre_hooks),
    )


class TraceCache:
    """Per model (held weakly): probe key -> (fingerprint, :class:`TracedProbe`, speculative).

    A record is *speculative* when the next probe on a GPU may use it before the model's
    fingerprint is checked: the check then runs while the device works on the probe's
    kernels, and a mismatch throws the probe's result away and probes again, traced. Only a
    model with the same modules and hooks as then (:func:`hooks_key`, ~20 us) is probed
    unchecked, so a hook registered since never sees a forward whose result is thrown away. A
    record made after a mismatch is not speculative (the model changes: the next probe checks
    first), nor one whose model's forward changed the fingerprint (a module that keeps a list
    of its inputs).

    Example:
        >>> cache = TraceCache()
        >>> net = nn.Conv2d(1, 1, 3)
        >>> rec = TracedProbe({"output": (1, 6, 6)}, {"output": None}, 400.0, None)
        >>> cache.put(net, ("k",), model_fingerprint(net), rec)
        >>> entry = cache.entry(net, ("k",))
        >>> entry.record is rec, entry.fingerprint == model_fingerprint(net)
        (True, True)
        >>> net.stride = (2, 2)
        >>> entry.fingerprint == model_fingerprint(net)
        False
    """

    def __init__(self) -> None:
        self._models: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, CacheEntry]]
        self._models = weakref.WeakKeyDictionary()

    def entry(self, model: nn.Module, key: Hashable) -> CacheEntry | None:
        """The record of ``key`` whatever its fingerprint, made the most recently used."""
        entries = self._models.get(model)
        found = None if entries is None else entries.pop(key, None)
        if found is not None:
            entries[key] = found  # type: ignore[index]
        return found

    def put(
        self,
        model: nn.Module,
        key: Hashable,
        fingerprint: Hashable,
        rec: TracedProbe,
        speculative: bool = False,
        hooks: Hashable = None,
    ) -> None:
        entries = self._models.setdefault(model, {})
        entries.pop(key, None)
        while len(entries) >= MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        entries[key] = CacheEntry(fingerprint, rec, speculative, hooks)

    def clear(self, model: nn.Module | None = None) -> None:
        if model is None:
            self._models.clear()
        else:
            self._models.pop(model, None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())


#: The process-wide cache :func:`~erf_callback.compute_erf` uses.
TRACES = TraceCache()


def clear_trace_cache(model: nn.Module | None = None) -> None:
    """Forget the remembered first-sample traces of ``model`` (``None``: of every model).

    Only needed for a model whose forward changes with state the fingerprint cannot see (a
    global flag, a branch on the input's values): the next probe then traces again.

    Example:
        >>> from erf_callback.engine import clear_trace_cache
        >>> clear_trace_cache()
    """
    TRACES.clear(model)


def probe_key(
    x: torch.Tensor,
    names: Sequence[str],
    transforms: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> Hashable:
    """What besides the model decides a trace: input shape, dtype, device, layers, transforms."""
    return (
        tuple(x.shape[1:]),
        dtype,
        device,
        tuple(names),
        tuple((n, _Identity(transforms.get(n))) for n in names),
    )

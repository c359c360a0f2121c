"""``compute_erf``: the effective receptive field of chosen layers, batched and truncated.

The ERF of a unit is the gradient of that unit with respect to the input pixels (Luo et al.,
NeurIPS 2016). Samples are independent in eval mode, so the gradient of the *sum* of the unit
over a batch gives every sample's gradient in one backward pass. The forward stops at the
deepest probed layer, all layers come from one forward, weight gradients are never computed,
and samples are processed in chunks so peak memory stays bounded.
"""

from __future__ import annotations

import numbers
import traceback
import warnings
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from erf_callback.engine.chunking import (
    ChunkPlan,
    SavedBytesMeter,
    default_budget,
    out_of_memory_error,
)
from erf_callback.engine.config import (
    AUTO,
    DEFAULT,
    OUTPUT,
    Channels,
    ChunkSize,
    Default,
    Position,
    ProbeConfig,
    Reduction,
    Transforms,
)
from erf_callback.engine.erf_map import ERFMap, ERFMaps, Status
from erf_callback.engine.fastpath import FastPath, ForwardRecorder
from erf_callback.engine.guard import probe_context
from erf_callback.engine.layers import (
    model_device_dtype,
    original_forwards,
    resolve_layers,
    unwrap_model,
)
from erf_callback.engine.layout import (
    LAYOUTS,
    Layout,
    Reshaped,
    carries_every_spatial_axis,
    to_model,
    to_probe,
)
from erf_callback.engine.misread import BATCH_AXIS_DROPPED, misread_inputs_error
from erf_callback.engine.trace_cache import (
    TRACES,
    TracedProbe,
    hooks_key,
    model_fingerprint,
    probe_key,
)
from erf_callback.engine.transforms import OutputTransform, apply_transform
from erf_callback.engine.validate import (
    NO_AXES_HINT,
    UNBATCHED_HINT,
    UnbatchedInputError,
    check_finite,
    check_inputs,
    check_model,
    check_output,
    model_forward_context,
    nonfinite_samples,
    normalize_layers,
    per_layer,
    unbatched_guard,
)
from erf_callback.fit.metrics import MetricConfig
from erf_callback.trf import ReceptiveFieldTracer, RFGeometry
from erf_callback.warnings import ERFWarning

__all__ = ["compute_erf", "map_status"]


class _LayerMeta(NamedTuple):
    output_shape: tuple[int, ...]
    position: tuple[int, ...]
    geometry: RFGeometry | None


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from a forward hook once every probed layer has produced its output."""


class _OtherLayout(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The first, traced sample shows that the model takes the inputs in another layout than
    ``(N, C, *spatial)`` (see :mod:`.layout`): the probe starts again in that one."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.layout: Layout = layout


class _WrittenInPlace(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised after a forward that wrote into a probed output after it was captured (an
    in-place ReLU or ``out += identity`` behind the layer): its values and autograd graph are
    then no longer the layer's, and the chunk is run again with copies handed downstream."""


#: Per model (held weakly), the sets of probed layers whose outputs its forward writes into.
_WRITTEN: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, ...]]] = weakref.WeakKeyDictionary()


class _StaleTrace(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A layer's output shape differs from the remembered trace's: the model changed in a way
    its fingerprint did not show; the probe starts again, traced."""


def compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    *,
    probe: ProbeConfig | None = None,
    position: Position | Default | None = DEFAULT,
    channels: Channels | Default | None = DEFAULT,
    reduction: Reduction | Default = DEFAULT,
    output_transform: Transforms | Default | None = DEFAULT,
    chunk_size: ChunkSize | Default | None = DEFAULT,
    memory_budget: int | Default | None = DEFAULT,
    optimize: bool | Default = DEFAULT,
    config: MetricConfig | Default | None = DEFAULT,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ERFMaps:
    """Measure the effective receptive field of layers of ``model`` on ``inputs``.

    Args:
        model: any ``nn.Module``; ``torch.compile`` and DDP wrappers are unwrapped (the original
            module is probed, so nothing is recompiled). Its state is left exactly as found.
        inputs: ``(N, C, *spatial)`` with 1, 2 or 3 spatial dims. Cast to the model's dtype and
            moved to its device. Inputs that the model rearranges itself are taken as they
            are: ``(N, *spatial)`` without channels (grayscale ``(N, H, W)``, raw audio ``(N,
            L)``) or ``(N, *spatial, C)`` channels last, found on the first sample (see
            :mod:`erf_callback.engine.layout`).
        layers: names as in ``model.named_modules()``; ``None`` probes the model output (key
            ``"output"``).
        probe: every probe option in one :class:`ProbeConfig`; the keyword arguments below
            override its fields.
        position: the probed unit's index in the layer's output grid (default: the centre,
            ``size // 2`` per axis). A mapping gives one position per layer.
        channels: output channels summed into the probed unit (default: all): an int (a 0-d
            integer tensor counts), or a sequence of distinct ints.
        reduction: how the input gradient is reduced over input channels: ``"abs"`` (sum of
            absolute values) or ``"replknet"`` (unit = sum of ReLU of channels; map = sum of
            ReLU of the gradient, as in RepLKNet's erf/visualize_erf.py).
        output_transform: turns a layer's raw output (tuple, dict, ViT tokens) into a tensor
            ``(N, C, *spatial)``; one callable for all layers or a mapping per layer. Default:
            the tensor itself, or the first tensor of a tuple/list. See :func:`tokens_to_grid`.
        chunk_size: samples per forward/backward; bounds peak memory. ``"auto"`` (default):
            sized from the measured activations of one sample and ``memory_budget`` (halved on
            an out-of-memory error); an int: that many; ``None``: all at once.
        memory_budget: bytes of saved activations per chunk for ``chunk_size="auto"``
            (default: 64 MiB on CPU, half the free memory on CUDA).
        optimize: run later chunks with BatchNorm folded into copies of the preceding convs
            and, on CPU and recent GPUs, channels_last; never changes the model; and reuse the
            trace of an earlier probe of the unchanged model on inputs of the same shape (see
            :mod:`erf_callback.engine.trace_cache`). ``False``: as written, always traced.
        config: metric choices (radius factor, energy fraction, fit method, ...); the same as
            ``ProbeConfig.metrics``.
        reduce: combines the gradient sums of several processes before the mean is taken:
            it gets one float64 tensor (every layer's summed map, flattened in ``layers``
            order, then the sample count) and returns the tensor summed over the processes,
            e.g. an all-reduce. See :mod:`erf_callback.engine.shard`, which uses it to let
            each rank probe a shard of the samples.

    Returns:
        ``{layer_name: ERFMap}`` in the order of ``layers`` (an :class:`ERFMaps`, a ``dict``
        that a notebook draws as the maps' heatmaps side by side).

    Raises:
        KeyError: an unknown layer name (the message lists the closest real names).
        TypeError: inputs that are not a tensor; a model that is not an ``nn.Module``, is or
            holds a TorchScript module, or whose forward needs more than the inputs.
        ValueError: bad input rank or dtype, NaN/Inf inputs, an unbatched image, a model on the
            meta device or built under ``torch.inference_mode``, non-integer positions or
            channels, a layer without spatial output, a position outside the output, a layer
            the forward never reaches.
        torch.OutOfMemoryError: even the smallest chunk did not fit (the message says what
            to change); no memory of the probe is left allocated.

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
        >>> maps = compute_erf(net, torch.randn(8, 1, 32, 32), layers=["2"])
        >>> maps["2"].grad.shape, maps["2"].metrics()["trf_x"]
        (torch.Size([32, 32]), 7.0)
    """
    cfg = (probe or ProbeConfig()).replace(
        position=position,
        channels=channels,
        reduction=reduction,
        output_transform=output_transform,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        optimize=optimize,
        metrics=config,
    )
    net = unwrap_model(model)
    # Walked once, shared by the checks and the guard (each walk of a ResNet costs ~0.05 ms).
    everything = list(net.modules()) if isinstance(net, nn.Module) else []
    check_model(net, everything)
    names = normalize_layers(layers, model=net)
    modules = resolve_layers(net, names)
    # On a GPU, reading the NaN/Inf check back waits for the device: its kernel is queued now
    # and read once the probe has waited anyway. Inputs with NaN or Inf still raise, and an
    # error they cause inside the model becomes that ValueError.
    deferred = _defers_finite_check(inputs)
    x_all = check_inputs(inputs, finite=not deferred)
    bad = nonfinite_samples(x_all) if deferred else None
    # Inputs in another layout than (N, C, *spatial) are probed in it (see .layout): (N, L)
    # always has no channel axis; else the first traced sample shows it, once per model.
    layout: Layout = "no_channel" if x_all.dim() == 2 else "standard"
    layout = LAYOUTS.recall(net, x_all, names) or layout
    try:
        # A "standard" probe may find any other layout; a "no_channel" one only Reshaped, and
        # only for (N, L) inputs, which start there; the others are final: two attempts at most.
        while True:
            try:
                sums, meta, cancelled = _accumulate(
                    net, everything, to_probe(x_all, layout), names, modules, cfg, layout
                )
                break
            except _OtherLayout as other:
                layout = other.layout
                LAYOUTS.remember(net, x_all, names, layout)
    except Exception as err:
        if bad is not None:
            try:
                check_finite(x_all, bad)
            except ValueError as nonfinite:
                raise nonfinite from err
        if layout in ("standard", "no_channel"):
            # One unbatched image, or grey images without their channel axis: the model
            # failed on the reading, and the error names the one it takes (see .misread).
            transforms = per_layer(cfg.output_transform, names, "output_transform")
            misread = misread_inputs_error(
                net,
                x_all,
                layout == "no_channel",
                err,
                lambda t: _forward_capture(net, t, names, modules, transforms, protect=True),
            )
            if misread is not None:
                raise misread from err
        raise
    if bad is not None:
        check_finite(x_all, bad)
    count = float(x_all.shape[0])
    if reduce is not None:  # distributed: every rank's sums and counts are added up
        from erf_callback.engine.shard import pack_sums, unpack_sums

        sums, count = unpack_sums(reduce(pack_sums(sums, count)), sums)
    return _assemble(sums, meta, names, to_probe(x_all, layout), cfg, round(count), cancelled)


def _accumulate(
    net: nn.Module,
    everything: list[nn.Module],
    x_all: torch.Tensor,
    names: list[str],
    modules: dict[str, nn.Module | None],
    cfg: ProbeConfig,
    layout: Layout = "standard",
) -> tuple[dict[str, torch.Tensor], dict[str, _LayerMeta], set[str]]:
    """Sum every probed unit's reduced input gradient over all samples, chunk by chunk; also
    the layers whose unit turned out constant up to rounding (see ``_Probe.first``).
    ``x_all`` is in the probe's layout; the model takes it in ``layout`` (see .layout)."""
    recall, by_backward = True, net in _BY_BACKWARD
    while True:  # each retry turns a flag that never turns back: at most three attempts
        try:
            return _accumulate_chunks(
                net, everything, x_all, names, modules, cfg, recall, by_backward, layout
            )
        except _StaleTrace:
            if not recall:
                raise
            TRACES.clear(net)
            recall = False
        except RuntimeError as err:
            if by_backward or not _is_reentrant_checkpoint_error(err):
                raise
            _BY_BACKWARD.add(net)
            by_backward = True


#: Models whose forward uses ``torch.utils.checkpoint`` with ``use_reentrant=True``, which
#: refuses ``torch.autograd.grad``: their input gradients come from ``.backward()`` (held
#: weakly; found at a model's first probe that needs it).
_BY_BACKWARD: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _is_reentrant_checkpoint_error(err: RuntimeError) -> bool:
    return "torch.utils.checkpoint is incompatible with .grad()" in str(err)


def _input_grad(
    output: torch.Tensor, x: torch.Tensor, retain_graph: bool, by_backward: bool
) -> torch.Tensor | None:
    """The gradient of the scalar ``output`` w.r.t. ``x`` (None where it does not depend on it).

    ``by_backward``: through ``.backward()`` into ``x.grad`` (taken and cleared), for a model
    with reentrant checkpoints. The probe's guard has every parameter's ``requires_grad`` off,
    so no ``.grad`` of the model changes; a tensor that is not a registered parameter but
    requires grad (a plain attribute) would get one, which ``torch.autograd.grad`` avoids: it
    is the default.
    """
    if not by_backward:
        # allow_unused: an output that ignores the input gets None, typed as a Tensor.
        grad: torch.Tensor | None = torch.autograd.grad(
            output, x, retain_graph=retain_graph, allow_unused=True
        )[0]
        return grad
    x.grad = None
    output.backward(retain_graph=retain_graph)
    grad, x.grad = x.grad, None
    return grad


def _accumulate_chunks(
    net: nn.Module,
    everything: list[nn.Module],
    x_all: torch.Tensor,
    names: list[str],
    modules: dict[str, nn.Module | None],
    cfg: ProbeConfig,
    recall: bool,
    by_backward: bool,
    layout: Layout = "standard",
) -> tuple[dict[str, torch.Tensor], dict[str, _LayerMeta], set[str]]:
    """Sum every probed unit's reduced input gradient over all samples, chunk by chunk.

    The first chunk (one sample unless ``chunk_size=None``) runs the model as written: it is
    traced for the TRF, checked, measured for the ``"auto"`` chunk size, and its forward shows
    which rewrites of :mod:`.fastpath` are safe; the later chunks run with them. With
    ``recall``, a trace remembered from an earlier probe of the unchanged model
    (:mod:`.trace_cache`) stands in for that chunk and every chunk runs the fast path; a
    probed output whose shape differs from the remembered one raises :class:`_StaleTrace`, as
    does a fingerprint that turns out changed after a speculative record was used.
    """
    device, dtype = model_device_dtype(net, x_all)
    n = x_all.shape[0]
    budget = cfg.memory_budget
    if cfg.chunk_size == AUTO and budget is None:
        budget = default_budget(device)
    # BatchNorm without running statistics normalises with batch statistics even in eval mode,
    # so samples of one chunk would leak into each other's gradients: one at a time.
    plan = ChunkPlan.create(cfg.chunk_size, n, budget, _mixes_batch_in_eval(net, everything))
    probe = _Probe(
        net,
        names,
        modules,
        per_layer(cfg.output_transform, names, "output_transform"),
        cfg,
        x_all.dim() - 2,
        by_backward,
        layout,
    )
    positions = per_layer(cfg.position, names, "position")
    # The optimize=False path is the reference the fast path is checked against: it always
    # traces. Otherwise a probe of a model whose fingerprint is unchanged since an earlier
    # probe of the same input shape reuses that probe's trace (see .trace_cache).
    key: Hashable | None = None
    if cfg.optimize:
        try:
            key = probe_key(x_all, names, probe.transforms, device, dtype)
        except Exception:  # an odd transform must never cost the probe: it just traces
            key = None
    use = _TraceUse(net, everything, key, recall, device)
    with probe_context(net, [device], everything):
        known = use.lookup()
        try:
            with original_forwards(net, everything):
                sums, fast = _run_chunks(probe, plan, known, x_all, positions, device, dtype)
        except _StaleTrace:
            raise
        except Exception as err:
            # A record used before its check may have caused the error (a layer path that
            # moved): only an unchanged model gets it; a changed one is probed again.
            if use.stale():
                raise _StaleTrace from err
            raise
        # A model whose channel sum cancels is checked again at every probe (only a traced
        # first chunk checks): its trace is not remembered. Before the guard's exit, which
        # waits for the device: on a GPU this overlaps the last chunk's kernels.
        if not probe.cancelled:
            use.remember(fast, probe)
    return sums, probe.meta, probe.cancelled


class _TraceUse:
    """One probe's use of the trace cache (:mod:`.trace_cache`).

    On a GPU a speculative record is used before the model's fingerprint is checked: the check
    runs once the chunks' kernels are queued, while the device works, and a changed model makes
    the probe start again, traced (:class:`_StaleTrace`). On a CPU nothing would overlap the
    check: it runs first. Fingerprints are taken inside the probe's guard, in eval mode and
    with compiled modules not yet routed (their forward is then an instance attribute, new at
    every probe).
    """

    def __init__(
        self,
        net: nn.Module,
        everything: list[nn.Module],
        key: Hashable | None,
        recall: bool,
        device: torch.device,
    ) -> None:
        self.net, self.everything, self.key, self.recall = net, everything, key, recall
        self.entry = TRACES.entry(net, key) if key is not None and recall else None
        self.overlap = key is not None and _checks_while_device_works(device)
        self.hooks: Hashable = None
        self.speculative = False
        self.known: TracedProbe | None = None
        self.before: Hashable | None = None

    def lookup(self) -> TracedProbe | None:
        """The record this probe may use (call inside the guard, before the chunks)."""
        entry = self.entry
        if self.overlap:
            self.hooks = hooks_key(self.everything)
            self.speculative = entry is not None and entry.speculative and entry.hooks == self.hooks
        if self.speculative:
            self.known = entry.record  # type: ignore[union-attr]
        elif self.key is not None:
            self.before = _fingerprint(self.net, self.everything)
            if entry is not None and self.before is not None and self.before == entry.fingerprint:
                self.known = entry.record
        return self.known

    def stale(self) -> bool:
        """Whether the record was used unchecked and the model has changed since."""
        if not self.speculative:
            return False
        return _fingerprint(self.net, self.everything) != self.entry.fingerprint  # type: ignore[union-attr]

    def remember(self, fast: FastPath, probe: _Probe) -> None:
        """Check a record used unchecked, and remember this probe's trace for the next one.

        Raises:
            _StaleTrace: the record was used unchecked and the model's fingerprint changed.
        """
        if self.key is None:
            return
        known, entry = self.known, self.entry
        reused = known is not None and fast.recipe is known.recipe
        if not self.overlap:
            if self.before is not None and not reused:  # a reused record is kept already
                TRACES.put(self.net, self.key, self.before, probe.remembered(fast))
            return
        after = _fingerprint(self.net, self.everything)
        if self.speculative and after != entry.fingerprint:  # type: ignore[union-attr]
            raise _StaleTrace
        if after is None or (self.speculative and reused):
            return
        # Unchecked next time only if nothing suggests that the model changes: not a probe
        # that started again after a stale record (recall=False), not a record that failed
        # its check, and not a forward that changed the fingerprint itself (a module that
        # keeps a list of its inputs).
        trusted = self.speculative or entry is None or known is not None
        again = self.recall and trusted and (self.speculative or self.before == after)
        TRACES.put(self.net, self.key, after, probe.remembered(fast), again, self.hooks)


def _checks_while_device_works(device: torch.device) -> bool:
    """Whether a probe on ``device`` checks a remembered trace's fingerprint after queueing
    its kernels: on CUDA, whose kernels run while the host goes on."""
    return device.type == "cuda"


def _fingerprint(net: nn.Module, everything: list[nn.Module]) -> Hashable | None:
    """The model's fingerprint, or None where an odd attribute cannot be read (that probe
    traces and is not remembered: nothing in the fingerprint may cost the user a probe)."""
    try:
        return model_fingerprint(net, everything)
    except Exception:
        return None


def _run_chunks(
    probe: _Probe,
    plan: ChunkPlan,
    known: TracedProbe | None,
    x_all: torch.Tensor,
    positions: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], FastPath]:
    """Every chunk of the probe: the first traced unless ``known`` stands in for its trace."""
    fast = FastPath.disabled()
    sums: dict[str, torch.Tensor] = {}
    if known is not None:
        fast = probe.recall(known, positions)
        plan.measured(known.per_sample_bytes, start=0)
    n, start = x_all.shape[0], 0
    while start < n:
        traced = known is None and start == 0
        # The first sample goes alone (traced, measured) unless all go at once.
        size = 1 if traced and probe.cfg.chunk_size is not None else plan.size(start)
        x: torch.Tensor | None = None
        try:
            # Inside the try: moving the chunk to the device can be what runs out.
            x = x_all[start : start + size].to(device=device, dtype=dtype).detach()
            if x.is_inference():  # made under torch.inference_mode: autograd cannot use it
                x = x.clone()
            if traced:
                given = to_model(x_all, probe.layout)  # the inputs as the user gave them
                with model_forward_context(given, size, probe.spatial_dims):
                    parts, fast = probe.first(x, positions)
                plan.measured(probe.per_sample_bytes, start=size)
            else:
                parts = probe.later(x, fast)
        except torch.OutOfMemoryError as err:
            # The traceback's frames hold the failed chunk's tensors: free them now.
            traceback.clear_frames(err.__traceback__)
            parts = None
        if parts is None:
            x = None  # the error below must not keep the chunk alive through this frame
            if not plan.shrink(size):
                raise out_of_memory_error(plan, size, device) from None
            continue
        for name, part in zip(probe.names, parts, strict=True):
            sums[name] = part if name not in sums else sums[name] + part
        start += size
    return sums, fast


class _Probe:
    """One probe's chunk runs: forward to the probed layers, backward of their units."""

    def __init__(
        self,
        net: nn.Module,
        names: list[str],
        modules: dict[str, nn.Module | None],
        transforms: dict[str, OutputTransform | None],
        cfg: ProbeConfig,
        spatial_dims: int,
        by_backward: bool = False,
        layout: Layout = "standard",
    ) -> None:
        self.net, self.names, self.modules, self.transforms = net, names, modules, transforms
        self.cfg, self.spatial_dims = cfg, spatial_dims
        self.layout = layout  # how the model takes the chunks (see .layout)
        self.meta: dict[str, _LayerMeta] = {}
        self.per_sample_bytes = 0.0
        self.recalled = False  # meta comes from an earlier probe's trace
        self.cancelled: set[str] = set()  # layers whose channel sum is constant (see first)
        self.by_backward = by_backward  # input gradients through .backward() (_input_grad)
        # Hand copies of the probed outputs downstream (see _WrittenInPlace): from the start
        # where an earlier probe of these layers found a write.
        self.protect = tuple(names) in _WRITTEN.get(net, ())

    def first(
        self, x: torch.Tensor, positions: dict[str, Any]
    ) -> tuple[list[torch.Tensor], FastPath]:
        """Run the model as written, traced, checked and measured; plan the fast path."""
        try:
            return self._first(x, positions)
        except _WrittenInPlace:
            self._written()  # this chunk again (traced and measured afresh), and the rest
            return self._first(x, positions)

    def _first(
        self, x: torch.Tensor, positions: dict[str, Any]
    ) -> tuple[list[torch.Tensor], FastPath]:
        x.requires_grad_(True)
        tracer = ReceptiveFieldTracer(x)
        meter = SavedBytesMeter(self.net)
        recorder = ForwardRecorder(self.net)
        with (
            unbatched_guard(
                self.net,
                self.spatial_dims,
                NO_AXES_HINT if self.layout == "no_channel" and x.dim() == 3 else UNBATCHED_HINT,
            ),
            tracer,
            meter,
            recorder if self.cfg.optimize else nullcontext(),
        ):
            outputs = _forward_capture(
                self.net, x, self.names, self.modules, self.transforms, self.layout, self.protect
            )
        if self.layout == "standard":
            self._check_layout(x, outputs, tracer)
        if self.layout in ("standard", "no_channel"):
            self._check_reshaped(x, outputs)
        _check_batch(outputs, x.shape[0])
        for name, out in outputs.items():
            pos = check_output(
                name,
                out.shape,
                self.spatial_dims,
                positions[name],
                self.transforms[name] is not None,
            )
            self.meta[name] = _LayerMeta(tuple(out.shape[1:]), pos, _safe_geometry(tracer, out))
        self.per_sample_bytes = (meter.nbytes + 2 * x.nbytes) / x.shape[0]
        fast = FastPath.disabled()
        if self.cfg.optimize and _plain_parameters(self.net):
            probed = [m for m in self.modules.values() if m is not None]
            layout = _wants_channels_last(self.net, x, x.device)
            fast = FastPath.plan(self.net, recorder, list(outputs.values()), probed, layout)
        return self._backward(x, outputs, check_cancellation=True), fast

    def _written(self) -> None:
        """The forward wrote into a probed output: copies from now on, and in later probes."""
        self.protect = True
        _WRITTEN.setdefault(self.net, set()).add(tuple(self.names))

    def _check_layout(
        self, x: torch.Tensor, outputs: dict[str, torch.Tensor], tracer: ReceptiveFieldTracer
    ) -> None:
        """Raise :class:`_OtherLayout` when the first sample, read as ``(N, C, *spatial)``,
        shows that the model takes the inputs in another layout (see .layout)."""
        if x.dim() < 5 and all(o.dim() == x.dim() + 1 for o in outputs.values()):
            raise _OtherLayout("no_channel")
        nd = self.spatial_dims
        if any(o.dim() != x.dim() for o in outputs.values()):
            return  # another rank: no reading of the channels gives it (see _check_reshaped)
        if all(carries_every_spatial_axis(tracer.lookup(o), nd) for o in outputs.values()):
            return
        # A probed output's spatial axes do not all come from the inputs' spatial axes: the
        # model may take the channels last and move them itself. That is the layout only if
        # the same sample traced so carries them all (an op the tracer cannot follow, as in
        # a ViT, loses them in either reading).
        xc = to_probe(x.detach(), "channels_last")  # x is the chunk as the user gave it
        try:
            with torch.no_grad(), ReceptiveFieldTracer(xc) as moved:
                again = _forward_capture(
                    self.net, xc, self.names, self.modules, self.transforms, "channels_last", True
                )
        except Exception:
            return  # the model does not take them so: its own reading stands
        if all(carries_every_spatial_axis(moved.lookup(o), nd) for o in again.values()):
            raise _OtherLayout("channels_last")

    def _check_reshaped(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Raise :class:`_OtherLayout` with a :class:`Reshaped` layout when the probed outputs
        have another rank than the inputs and the model's first spatial layer of that rank
        gets a reshape of them: as many elements per sample (flat images ``(N, 784)`` that
        the model views as ``(N, 1, 28, 28)``)."""
        ranks = {o.dim() for o in outputs.values()}
        rank = ranks.pop() if len(ranks) == 1 else 0
        if not 3 <= rank <= 5 or rank == x.dim():
            return
        given = to_model(x.detach(), self.layout)  # the first sample as the user gave it
        seen: list[tuple[int, ...]] = []

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            t = args[0] if args else None
            if isinstance(t, torch.Tensor) and t.dim() == rank and t.numel() == given.numel():
                seen.append(tuple(t.shape[1:]))
                raise _StopForward

        handles = [m.register_forward_pre_hook(hook) for m in self.net.modules()]
        try:
            with torch.no_grad():
                self.net(given)
        except _StopForward:
            pass
        except Exception:
            return  # the model's own error: the rank check below reports the outputs
        finally:
            for h in handles:
                h.remove()
        if seen:
            raise _OtherLayout(Reshaped(tuple(given.shape[1:]), seen[0]))

    def recall(self, known: TracedProbe, positions: dict[str, Any]) -> FastPath:
        """Take the layers' shapes and geometry from an earlier probe's trace; its fast path."""
        for name in self.names:
            shape = known.output_shapes[name]
            pos = check_output(name, (1, *shape), self.spatial_dims, positions[name])
            self.meta[name] = _LayerMeta(shape, pos, known.geometries[name])
        self.per_sample_bytes = known.per_sample_bytes
        self.recalled = True
        if known.recipe is None:
            return FastPath.disabled()
        return FastPath.build(self.net, known.recipe)

    def remembered(self, fast: FastPath) -> TracedProbe:
        """What this probe's trace showed, for the next probe of the same model."""
        return TracedProbe(
            output_shapes={n: m.output_shape for n, m in self.meta.items()},
            geometries={n: m.geometry for n, m in self.meta.items()},
            per_sample_bytes=self.per_sample_bytes,
            recipe=fast.recipe,
        )

    def later(self, x: torch.Tensor, fast: FastPath) -> list[torch.Tensor]:
        """A chunk after the first, with the fast path when the model tolerates it."""
        if fast.enabled:
            xf = x.contiguous(memory_format=torch.channels_last) if fast.channels_last else x
            try:
                with fast.active():
                    parts = self._run(xf)
                    fast.check_settled()
                return parts
            except (torch.OutOfMemoryError, _StaleTrace):
                raise
            except Exception:
                # The model's code did not accept a rewrite (e.g. .view() of a channels_last
                # tensor), or took another path than the traced chunk, where a fold does not
                # hold (FoldDivergedError): this chunk and the rest run the model as written, and
                # the remembered trace of this probe keeps no fast path.
                fast.disable()
        return self._run(x)

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        x.requires_grad_(True)
        try:
            outputs = _forward_capture(
                self.net, x, self.names, self.modules, self.transforms, self.layout, self.protect
            )
        except _WrittenInPlace:
            self._written()
            outputs = _forward_capture(
                self.net, x, self.names, self.modules, self.transforms, self.layout, True
            )
        _check_batch(outputs, x.shape[0])
        if self.recalled:
            for name, out in outputs.items():
                if tuple(out.shape[1:]) != self.meta[name].output_shape:
                    raise _StaleTrace
        return self._backward(x, outputs)

    def _backward(
        self, x: torch.Tensor, outputs: dict[str, torch.Tensor], check_cancellation: bool = False
    ) -> list[torch.Tensor]:
        """Per layer: the float64 sum over samples and input channels of the reduced gradient.

        With ``check_cancellation`` (the traced first chunk), a unit that sums several channels
        is also checked for a constant sum (:func:`_cancels`), at the cost of one more backward
        of that chunk per such layer.
        """
        parts = []
        last = len(self.names) - 1
        for i, name in enumerate(self.names):
            unit = _select_unit(outputs[name], self.meta[name].position, self.cfg.channels)
            if self.cfg.reduction == "replknet":
                unit = torch.relu(unit)
            if not unit.requires_grad:
                raise ValueError(
                    f"layer {name!r}'s output is not connected to the input by autograd "
                    "(computed under no_grad, detached, by a fused inference kernel, or inside "
                    "a torch.utils.checkpoint segment with use_reentrant=True, whose forward "
                    "runs without autograd); probe a layer whose output is differentiable "
                    "w.r.t. the input (for a checkpointed segment: its output)."
                )
            check = check_cancellation and self.cfg.reduction == "abs" and unit.shape[1] > 1
            by_backward = self.by_backward
            g = _input_grad(unit.sum(), x, i < last or check, by_backward)
            if check and g is not None and _cancels(unit, x, g, i < last, by_backward):
                self.cancelled.add(name)
            if g is None:
                parts.append(torch.zeros(x.shape[2:], dtype=torch.float64, device=x.device))
                continue
            g = torch.relu(g) if self.cfg.reduction == "replknet" else g.abs()
            parts.append(g.sum(dim=(0, 1), dtype=torch.float64))
        return parts


def _assemble(
    sums: dict[str, torch.Tensor],
    meta: dict[str, _LayerMeta],
    names: list[str],
    x_all: torch.Tensor,
    cfg: ProbeConfig,
    n: int,
    cancelled: Collection[str] = (),
) -> ERFMaps:
    """Turn the gradient sums of ``n`` samples into :class:`ERFMap` s: mean, status, location."""
    in_shape = tuple(x_all.shape[2:])
    result = ERFMaps()
    for name in names:
        out_shape, pos, geo = meta[name]
        grad = sums[name].cpu() / n  # divided on the host: one kernel launch less per layer
        status = map_status(grad, name, cancelled=name in cancelled)
        location = (
            geo.center(pos)
            if geo is not None
            else tuple(
                (p + 0.5) * i / o - 0.5
                for p, i, o in zip(pos, in_shape, out_shape[1:], strict=True)
            )
        )
        result[name] = ERFMap(
            grad=grad,
            layer=name,
            position=pos,
            output_shape=out_shape,
            location=tuple(float(v) for v in location),
            geometry=geo,
            num_samples=n,
            reduction=cfg.reduction,
            status=status,
            config=cfg.metrics,
        )
    return result


def map_status(grad: torch.Tensor, name: str, cancelled: bool = False) -> Status:
    """``"ok"``, or ``"nonfinite"`` / ``"zero"`` with an :class:`ERFWarning` saying why.

    ``cancelled``: the probe found the unit's sum over channels constant up to rounding, so
    the map is rounding noise: ``"zero"``, as an exactly zero map.
    """
    finite, nonzero = _finite_and_nonzero(grad)
    if not finite:
        warnings.warn(
            f"compute_erf: the gradient of {name!r} contains NaN/Inf; its metrics are NaN. "
            "Check the model for overflow (or probe in float32).",
            ERFWarning,
            stacklevel=3,
        )
        return "nonfinite"
    if cancelled or not nonzero:
        warnings.warn(
            f"compute_erf: the gradient of {name!r} is zero everywhere; its metrics are NaN. "
            "Causes: dead ReLUs, a unit that does not depend on the input, or a sum over "
            "channels that is constant (after LayerNorm/GroupNorm it always is): pick "
            "channels=[...] or reduction='replknet'.",
            ERFWarning,
            stacklevel=3,
        )
        return "zero"
    return "ok"


def _finite_and_nonzero(grad: torch.Tensor) -> tuple[bool, bool]:
    """Whether every value is finite, and whether any is non-zero: in NumPy for a CPU map
    (~15 us for 224x224 against ~200 us for the two torch reductions, which spin up threads)."""
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        a = grad.detach().numpy()
        return bool(np.isfinite(a).all()), bool(a.any())
    return bool(torch.isfinite(grad).all()), bool(grad.any())


# --------------------------------------------------------------------------------------------


def _forward_capture(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str],
    modules: dict[str, nn.Module | None],
    transforms: dict[str, OutputTransform | None],
    layout: Layout = "standard",
    protect: bool = False,
) -> dict[str, torch.Tensor]:
    """The probed layers' outputs of the model's forward on ``x`` (in the probe's layout; the
    model gets it in ``layout``, see .layout); the forward stops after the last of them.

    A probed output that the rest of the forward writes into (an in-place ReLU behind the
    layer, ``out += identity``) would be read with those writes, and differentiated through
    them: the forward then raises :class:`_WrittenInPlace`. With ``protect``, the layers'
    outputs are captured as computed and the model goes on with copies of them (one copy of
    each probed layer's output but the last, which ends the forward).
    """
    captured: dict[str, torch.Tensor] = {}
    versions: dict[str, int] = {}
    hooked = [n for n in names if modules[n] is not None]

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if name in captured:  # a module called twice: its first call is probed
                return None
            out = captured[name] = apply_transform(name, output, transforms[name])
            versions[name] = _version(out)
            if len(captured) == len(names):
                raise _StopForward
            return _copied(output) if protect else None

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in hooked]  # type: ignore[union-attr]
    try:
        # The model gets a copy: a forward that writes into its input (an in-place ReLU or
        # normalisation first, or a clamp_ under no_grad) then neither fails on the leaf that
        # gradients are taken for nor changes the caller's inputs, which a chunk is a view of.
        # One copy of the chunk's input, small beside its activations.
        output = model(to_model(x, layout))
    except _StopForward:
        output = None
    finally:
        for h in handles:
            h.remove()
    written = [n for n, out in captured.items() if _version(out) != versions[n]]
    if written and not protect:
        raise _WrittenInPlace
    if written:
        raise ValueError(
            f"The model's forward writes into the output of {written} after the layer returned "
            "it, even when the layers after it get a copy (the model keeps a reference to it "
            "and modifies it in place later), so that output is not the layer's. Probe the "
            "layer in a call of its own (the forward then stops at it), or make the write "
            "out of place."
        )
    if OUTPUT in names and modules[OUTPUT] is None and output is not None:
        captured[OUTPUT] = apply_transform(OUTPUT, output, transforms[OUTPUT])
    missing = [n for n in names if n not in captured]
    if missing:
        inlined = ""
        if isinstance(model, torch.fx.GraphModule):
            inlined = (
                " This is a torch.fx GraphModule: one made by torch.export (ExportedProgram"
                ".module()) runs its layers' operations inline, without calling the modules, "
                "so probe the eager model it was exported from."
            )
        raise ValueError(
            f"The model's forward never called {missing}: they exist but are not used on this "
            "path (e.g. a branch not taken, or a module only used in training_step). Probe "
            f"modules that forward() runs.{inlined}"
        )
    return captured


def _version(t: torch.Tensor) -> int:
    """The version counter of ``t`` (bumped by every in-place write); inference tensors,
    which keep none, count as never written (no gradient reaches the input through them,
    and the probe says so)."""
    return -1 if t.is_inference() else t._version


def _copied(output: Any) -> Any:
    """``output`` with each tensor in it (in tuples, lists and dicts too) replaced by a copy."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        items = [_copied(o) for o in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, dict):
        return type(output)((k, _copied(v)) for k, v in output.items())
    return output


def _check_batch(outputs: dict[str, torch.Tensor], n: int) -> None:
    """Refuse probed outputs that do not hold one entry per sample of the ``n`` run: the
    model adds a leading axis (it takes unbatched inputs) or reduces over the batch, and a
    unit would then be summed over samples."""
    for name, out in outputs.items():
        if out.dim() and out.shape[0] != n:
            unbatched = out.shape[0] == 1
            raise (UnbatchedInputError if unbatched else ValueError)(
                f"layer {name!r} gives an output of shape {tuple(out.shape)} for a chunk of {n} "
                f"sample{'s' if n != 1 else ''}: {BATCH_AXIS_DROPPED} (it adds one of its own, "
                "or reduces over it), and compute_erf needs one output per sample, (N, C, "
                "*spatial)."
                f"{' ' + UNBATCHED_HINT if unbatched else ''}"
            )


def _select_unit(
    out: torch.Tensor, pos: tuple[int, ...], channels: int | Sequence[int] | None
) -> torch.Tensor:
    index: tuple[slice | int, ...] = (slice(None), slice(None), *pos)
    unit = out[index]
    if channels is None:
        return unit
    idx = [int(channels)] if isinstance(channels, numbers.Integral) else _int_list(channels)
    bad = [c for c in idx if not -unit.shape[1] <= c < unit.shape[1]]
    if bad or not idx:
        raise ValueError(
            f"channels {idx} are not valid for an output with {unit.shape[1]} channels."
        )
    return unit[:, idx]


def _cancels(
    unit: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    retain_graph: bool,
    by_backward: bool = False,
) -> bool:
    """Whether the sum over the unit's channels is constant up to rounding (``g`` its gradient).

    After a LayerNorm or GroupNorm over channels with equal weights (every such layer at
    initialisation) the normalised channels sum to a constant, so ``g`` is float round-off:
    ~1e-7 of a real ERF in float32, or exactly zero, depending on the rounding. The reference
    is the gradient of the same channels summed with fixed pseudo-random signs, which cannot
    cancel that way; ``g`` far below it (a thousand times the dtype's epsilon, at most 1e-3)
    is round-off. The signs come from a private generator: no RNG stream is touched.
    """
    signs = torch.randint(0, 2, (unit.shape[1],), generator=torch.Generator().manual_seed(0))
    signs = (2 * signs - 1).to(device=unit.device, dtype=unit.dtype)
    ref = _input_grad((unit * signs).sum(), x, retain_graph, by_backward)  # unit: (N, C)
    if ref is None:  # allow_unused: typed as a Tensor, None at run time
        return False
    big, small = float(ref.abs().max()), float(g.abs().max())
    tol = min(1e3 * torch.finfo(g.dtype).eps, 1e-3)
    return big > 0 and small <= tol * big


def _int_list(values: Any) -> list[int]:
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    return [int(v) for v in items]


def _safe_geometry(tracer: ReceptiveFieldTracer | None, out: torch.Tensor) -> RFGeometry | None:
    if tracer is None:
        return None
    try:
        return tracer.geometry(out)
    except Exception:  # a tracer bug must never cost the user their probe
        return None


def _wants_channels_last(net: nn.Module, x: torch.Tensor, device: torch.device) -> bool:
    """Whether 2-D convolutions run faster in channels_last here: on CPU (oneDNN), and on
    CUDA devices with tensor cores that the dtype uses (compute capability 8.0 or later, in
    float16/bfloat16, or float32 with cuDNN's TF32 on, PyTorch's default). On an H100 the
    batched ResNet-18 probe of 64 images at 224x224 took 9.8 ms instead of 11.4 ms;
    elsewhere (older GPUs, full float32, ROCm) NCHW stays."""
    if x.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        return False
    if device.type == "cpu":
        return True
    # ROCm also reports its GPUs as "cuda": MIOpen's channels_last kernels were not measured.
    if (
        device.type != "cuda"
        or torch.version.hip
        or torch.cuda.get_device_capability(device) < (8, 0)
    ):
        return False
    return x.dtype in (torch.float16, torch.bfloat16) or (
        x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    )


def _plain_parameters(net: nn.Module) -> bool:
    """No sharded (DTensor) or other tensor-subclass parameters: FSDP2 / tensor parallelism
    gather them in hooks around each forward, and copies taken between forwards would be wrong.
    """
    return all(type(p.data) is torch.Tensor for p in net.parameters())


def _defers_finite_check(inputs: Any) -> bool:
    """Whether the inputs' NaN/Inf check is read after the probe: on a GPU, where reading it
    first would make the probe wait for the device before its first kernel."""
    return isinstance(inputs, torch.Tensor) and inputs.device.type == "cuda"


def _mixes_batch_in_eval(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
        for m in (model.modules() if modules is None else modules)
    )

"""The logic of ``ERFMonitor``, free of any Lightning import.

``erf_callback.pytorch_lightning.ERFMonitor`` and ``erf_callback.lightning.ERFMonitor`` are
this class mixed into the ``Callback`` of their namespace (the two namespaces cannot be mixed in
one Trainer). Everything here only duck-types the ``trainer`` and ``pl_module`` it is given.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from erf_callback.callback.distributed import (
    ProbeGroup,
    probe_group,
    run_probe,
    torch_gather_to_zero,
)
from erf_callback.callback.guarded import (
    Guard,
    free_probe_memory,
    has_nonfinite_state,
    is_out_of_memory,
)
from erf_callback.callback.history import (
    ERFHistory,
    claim_history_files,
    history_paths,
)
from erf_callback.callback.images import HeatmapStyle, ProbeImages
from erf_callback.callback.inputs import (
    InputKey,
    InputSource,
    extract_input,
    gather_inputs,
    noise_like,
    reuses_workers,
)
from erf_callback.callback.publish import (
    MAIN_SCALARS,
    ImagePublisher,
    add_custom_scalars,
    log_hparam_metrics,
    log_scalars,
)
from erf_callback.callback.record import record_probe
from erf_callback.callback.runfiles import (
    DEFAULT_BASENAME,
    check_monitors,
    derived_basename,
    run_directory,
)
from erf_callback.callback.schedule import AUTO_WARMUP_STEPS, DEFAULT_MAX_OVERHEAD, ProbeSchedule
from erf_callback.engine.config import (
    DEFAULT,
    Channels,
    Default,
    Position,
    ProbeConfig,
    Reduction,
    is_int,
)
from erf_callback.engine.erf_map import ERFMap
from erf_callback.engine.layers import deepest_spatial_layer, model_device_dtype, resolve_layers
from erf_callback.engine.misread import RESHAPE
from erf_callback.engine.transforms import OutputTransform
from erf_callback.engine.validate import (
    UnbatchedInputError,
    check_eager,
    check_inputs,
    is_numpy,
    normalize_layers,
    torch_error,
    uninitialised,
)
from erf_callback.fit.metrics import MetricConfig
from erf_callback.warnings import ERFWarning

__all__ = ["ERFMonitorBase"]

log = logging.getLogger("erf_callback")
if not log.handlers:
    # Like Lightning's own logger: one-time notes (auto interval, loggers without images)
    # should reach the console without users configuring logging.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

_STATE_VERSION = 1


def _no_forward(err: NotImplementedError, net: nn.Module) -> bool:
    """Whether ``err`` is ``net``'s own missing forward: raised by ``nn.Module``'s stub
    (``_forward_unimplemented``) called on ``net`` itself, not by a module inside it."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_forward_unimplemented" and frame.f_locals.get("self") is net:
            return True
        tb = tb.tb_next
    return False


class ERFMonitorBase:
    """Track the effective receptive field of chosen layers through training.

    Probes at initialisation (before the first optimiser step), on a schedule, and once at
    the end; logs ``<tag_prefix>/<layer>/<metric>`` scalars to every logger, heatmaps, radial
    profiles and an evolution grid to TensorBoard (and W&B), and writes the history as CSV and
    JSON into the logger's directory. Probing never changes training: it runs in eval mode
    with ``torch.autograd.grad`` on ``pl_module``, and restores modes, flags, buffers and RNG.

    Args:
        layers: layer names of the probed module (as in ``named_modules()``). Default: the
            deepest module with a spatial output (e.g. ``"layer4"`` in a ResNet).
        every_n_steps: probe every N optimiser steps (``trainer.global_step``; a multiple
            of N that it jumps over, with several optimisers stepped per batch, at the next).
        num_samples: probe inputs averaged per probe.
        every_n_epochs: probe at the end of every N-th epoch.
        at_steps: probe at these optimiser steps.
        log_spaced: probes per decade of steps (dense early, where the ERF moves most).
        max_overhead: with no schedule argument at all, the interval is chosen after the
            first steps so probing costs at most this fraction of training time.
        probe_at_init: probe before the first optimiser step (also the fit-start check).
        probe_at_end: probe once when training ends.
        inputs: ``"train"`` (default: a fixed batch captured once from the training data, so
            every probe sees the same images), ``"noise"`` (standard Gaussian noise from the
            callback's own generator seeded by ``seed``), a tensor ``(N, C, *spatial)``, an
            iterable of batches (e.g. a DataLoader; a list of single images is not one:
            ``torch.stack(images)``), or a ``Dataset`` (its first ``num_samples`` samples,
            collated as a DataLoader would).
        input_key: which element of a batch is the input: an index (tuple/list), a key (dict),
            an attribute name (dataclass or named-tuple batches) or a callable
            ``batch -> tensor``. Default: the first image-like tensor found.
        seed: seed of the noise generator.
        module: attribute path of the submodule to probe (e.g. ``"backbone"``); default the
            LightningModule itself (its ``forward`` must run the network).
        probe: every probe option in one :class:`~erf_callback.ProbeConfig`; the keyword
            arguments below override its fields.
        position, channels, reduction, output_transform, chunk_size: as in
            :func:`~erf_callback.compute_erf`.
        metric_config: metric choices (radius factor, energy fraction, fit method, ...); the
            same as ``ProbeConfig.metrics``.
        log_images: log heatmaps, the init-vs-now pair, radial profiles, the evolution grid
            and the all-layers radius chart.
        heatmap_style: ``"annotated"`` (title, colour bar, legend) or ``"raw"`` (the map at
            input resolution with the overlays drawn into its pixels, no text).
        detail_scalars: also log the metrics beyond radius, growth, ERF/TRF, R² and border
            mass, under ``<tag_prefix>_detail/``.
        images_every_n_probes: log images at every N-th probe only (scalars always).
        cmap: matplotlib colour map of the heatmaps.
        history_map_size: maps are kept downsampled to at most this many pixels per side.
        tag_prefix: first part of every logged tag.
        history_filename: base name of the CSV/JSON history files (a trailing ``.csv`` or
            ``.json`` is dropped: ``"hist.csv"`` writes ``hist.csv`` and ``hist.json``).
            Default ``"erf_history"``, or, with several monitors in one Trainer,
            ``"erf_history-<tag_prefix>-<layers>"``.

    Example:
        >>> from erf_callback import ERFMonitor
        >>> monitor = ERFMonitor(layers=["layer2", "layer4"], every_n_steps=200, num_samples=32)
    """

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        every_n_steps: int | None = None,
        num_samples: int = 32,
        *,
        every_n_epochs: int | None = None,
        at_steps: Sequence[int] | None = None,
        log_spaced: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
        probe_at_init: bool = True,
        probe_at_end: bool = True,
        inputs: InputSource = "train",
        input_key: InputKey = None,
        seed: int = 0,
        module: str | None = None,
        probe: ProbeConfig | None = None,
        position: Position | Default | None = DEFAULT,
        channels: Channels | Default | None = DEFAULT,
        reduction: Reduction | Default = DEFAULT,
        output_transform: OutputTransform
        | Mapping[str, OutputTransform]
        | Default
        | None = DEFAULT,
        chunk_size: int | Default | None = DEFAULT,
        metric_config: MetricConfig | Default | None = DEFAULT,
        log_images: bool = True,
        heatmap_style: HeatmapStyle = "annotated",
        detail_scalars: bool = True,
        images_every_n_probes: int = 1,
        cmap: str = "inferno",
        history_map_size: int = 64,
        tag_prefix: str = "erf",
        history_filename: str | None = None,
    ) -> None:
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
        num_samples = int(num_samples)
        if isinstance(inputs, str) and inputs not in ("train", "noise"):
            raise ValueError(
                "inputs must be 'train', 'noise', a tensor, an iterable of batches or a "
                f"Dataset; got {inputs!r}"
            )
        # A NumPy array is refused here too (iterated, its rows would pass for batches).
        if isinstance(inputs, torch.Tensor) or is_numpy(inputs):
            check_inputs(inputs)  # rank, dtype, NaN/Inf, layout: now rather than at fit start
        for name, value in (
            ("images_every_n_probes", images_every_n_probes),
            ("history_map_size", history_map_size),
        ):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {seed!r}")
        for name, flag in (
            ("probe_at_init", probe_at_init),
            ("probe_at_end", probe_at_end),
            ("log_images", log_images),
            ("detail_scalars", detail_scalars),
        ):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False; got {flag!r}")
        if not isinstance(tag_prefix, str) or not tag_prefix or tag_prefix.endswith("/"):
            raise ValueError(f"tag_prefix must be non-empty without a trailing '/': {tag_prefix!r}")
        if module is not None and not isinstance(module, str):
            raise TypeError(
                f"module must be the name of a submodule of the LightningModule (e.g. 'model') "
                f"or None; got {module!r}"
            )
        if not (input_key is None or is_int(input_key) or isinstance(input_key, str)) and (
            not callable(input_key)
        ):
            raise TypeError(
                "input_key must be None, an index or key into the batch, or a callable "
                f"batch -> images; got {input_key!r}"
            )
        if history_filename is not None and (
            not isinstance(history_filename, str)
            or history_filename in ("", ".", "..")
            or any(sep in history_filename for sep in ("/", "\\"))
        ):
            raise ValueError(
                "history_filename must be a plain file name (written in the run's log "
                f"directory), without a path; got {history_filename!r}"
            )
        if history_filename is not None:
            # The name of one of the files ("history.csv") names both: history.csv, .json.
            stem, extension = os.path.splitext(history_filename)
            if extension in (".csv", ".json"):
                history_filename = stem
        if log_images:
            # matplotlib's registry holds the names; it is imported only when images are drawn.
            from erf_callback.render.raster import check_colormap

            check_colormap(cmap)
        # Checked as compute_erf checks it (a name, names, no duplicates), at construction. The
        # state key must not change when the default layer is resolved at fit start, or a
        # resumed run would not find its own state in the checkpoint: it is built from this.
        self._layers_arg = (
            None if layers is None else normalize_layers(layers, "the deepest spatial layer")
        )
        self.num_samples = num_samples
        self.schedule = ProbeSchedule(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            at_steps=at_steps,
            log_spaced=log_spaced,
            max_overhead=max_overhead,
        )
        self.probe_at_init = probe_at_init
        self.probe_at_end = probe_at_end
        self.input_source = inputs
        self.input_key = input_key
        self.seed = seed
        self.module = module
        self.probe_config = (probe or ProbeConfig()).replace(
            position=position,
            channels=channels,
            reduction=reduction,
            output_transform=output_transform,
            chunk_size=chunk_size,
            metrics=metric_config,
        )
        self.log_images = log_images
        self.images_every_n_probes = images_every_n_probes
        self.cmap = cmap
        self.tag_prefix = tag_prefix
        self._history_filename_arg = history_filename
        self.history_filename = history_filename or DEFAULT_BASENAME
        self._history_map_size = history_map_size
        self._enabled = True
        self._dry_run = False  # fast_dev_run: the fit-start check only, nothing logged
        self._group: ProbeGroup | None = None  # the ranks sharing each probe (None: alone)
        self._renderer = ProbeImages(tag_prefix, cmap, heatmap_style)
        self.detail_scalars = detail_scalars
        self._fitted = False  # a fit with this instance has ended (see setup)
        self._start_run()

    def _start_run(self) -> None:
        """The state of one training run: what a checkpoint holds, and the run's bookkeeping."""
        self.layers = None if self._layers_arg is None else list(self._layers_arg)
        self.history = ERFHistory(self._history_map_size)
        self.schedule.auto_interval = self.schedule.next_auto_step = None
        self._inputs: torch.Tensor | None = None  # CPU copy; part of the checkpoint
        self._history_dir: str | None = None
        self._device_inputs: torch.Tensor | None = None
        self._last_step_seen: int | None = None
        self._last_probed_step: int | None = None
        self._step_clock: float | None = None
        self._step_times: list[float] = []  # seconds per optimiser step (global_step)
        self._trained_seconds = 0.0
        self._probe_seconds: list[float] = []
        self._warned: set[str] = set()
        self._images = ImagePublisher()
        self._guard = Guard(self._warn_once)
        self._told_interval = False
        self._checked = False  # the fit-start check ran in this fit
        # Lazy modules not initialised at the first batch: the check waits for its forward.
        self._awaiting_lazy = False
        self._files_name: str | None = None  # the history files' base name, once taken
        self._hparams_declared = False

    # ---- Lightning hooks -----------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]
            layers=self._layers_arg, tag_prefix=self.tag_prefix, module=self.module
        )

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        if self._fitted and trainer.global_step == 0:
            # This instance already took part in a fit and a new run starts (a new Trainer;
            # the same Trainer fitting on continues at its step, and keeps its history): it
            # gets its own init probe and history. A checkpoint it resumes from is loaded
            # after this (load_state_dict).
            self._start_run()
        self._checked, self._awaiting_lazy, self._files_name = False, False, None
        self._dry_run = bool(getattr(trainer, "fast_dev_run", False))
        if self._dry_run:
            log.info(
                "erf-callback: fast_dev_run is on; ERFMonitor checks its configuration with "
                "one probe at the first batch and logs nothing."
            )
        self._group = probe_group(trainer)  # an unsupported strategy fails here, not in a hang
        net = self._probed_module(pl_module)
        check_eager(net)  # a TorchScript model fails here, before any data
        if self.layers is not None:
            self._check_layer_names(net)  # unknown names fail here, before any data

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # Before Lightning logs the hyperparameters: TensorBoard reads a run's first hparams
        # summary only, and this one declares the ERF scalars as the HParams tab's metrics.
        if self._enabled and self.layers is not None and trainer.is_global_zero:
            self._declare_hparam_metrics(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._enabled:
            return
        # Trainer.log_dir broadcasts from rank 0: every rank must ask, and at the same point.
        log_dir = getattr(trainer, "log_dir", None)
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ERFMonitorBase)]
        for monitor in monitors:
            monitor._name_history_files(len(monitors))
        check_monitors(monitors)
        if self._inputs is None and not isinstance(self.input_source, str):
            self._inputs = gather_inputs(self.input_source, self.input_key, self.num_samples)
        self._last_step_seen = trainer.global_step
        if self._dry_run:
            return
        if trainer.is_global_zero:
            self._history_dir = run_directory(trainer, log_dir)
            self._guard.each_logger(
                trainer.loggers,
                "chart layout",
                lambda one: add_custom_scalars(one, self.tag_prefix),
                trainer.global_step,
            )
            self._write_history(trainer)  # takes this run's file names at once

    def on_train_batch_start(
        self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        if self._inputs is None:
            self._inputs = self._capture_inputs(trainer, batch)
        if self._checked or self._awaiting_lazy:
            return
        lazy = uninitialised(self._probed_module(pl_module))
        if lazy:
            # The first forward gives lazy modules their shapes (a probe must not: that would
            # change the model). The check and the initialisation probe run after it, before
            # the first optimiser step moves the weights (on_before_optimizer_step).
            self._awaiting_lazy = True
            log.info(
                "erf-callback: %d parameters/buffers of lazy modules (e.g. %r) are not "
                "initialised yet; the configuration check and the initialisation probe run "
                "after the first forward, before the first optimiser step",
                len(lazy),
                lazy[0],
            )
            return
        self._fit_start_check(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        if self._awaiting_lazy and self._enabled and not trainer.sanity_checking:
            self._awaiting_lazy = False
            # Still uninitialised after a forward (a lazy module the forward never reaches):
            # the check raises, naming them.
            self._fit_start_check(trainer, pl_module)

    def _fit_start_check(self, trainer: Any, pl_module: nn.Module) -> None:
        """The fit-start check: resolve the default layer and probe once, strictly, so that
        a bad configuration fails before any training time is spent; the initialisation
        probe, recorded, unless resuming, under fast_dev_run or with probe_at_init=False."""
        if self.layers is None:
            assert self._inputs is not None  # captured at the first batch, before this
            self.layers = [deepest_spatial_layer(self._probed_module(pl_module), self._inputs)]
            log.info("erf-callback: probing the deepest spatial layer %r", self.layers[0])
            check_monitors([cb for cb in trainer.callbacks if isinstance(cb, ERFMonitorBase)])
        self._checked = True
        if self._last_probed_step is None and not self._dry_run:
            self._probe_if_new(trainer, pl_module, dry=not self.probe_at_init, strict=True)
        else:
            self._probe(trainer, pl_module, dry=True, strict=True, mark=False)
        self._step_clock = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or self._dry_run or trainer.sanity_checking:
            return
        step, previous = trainer.global_step, self._last_step_seen
        if step == previous:
            return  # inside a gradient-accumulation window: no optimiser step happened
        self._last_step_seen = step
        if previous is None or previous > step:
            previous = step - 1
        self._time_step(trainer, step - previous)
        if self._needs_timing_probe():
            # Resumed before the automatic interval was chosen: time one probe now.
            self._probe_if_new(trainer, pl_module)
            self._choose_interval(trainer)
        elif self.schedule.due_after(previous, step):
            self._probe_if_new(trainer, pl_module)
            if self.schedule.is_auto and self._step_times:
                self._choose_interval(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._enabled or self._dry_run:
            return
        if self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._probe_if_new(trainer, pl_module)

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage == "fit":
            self._fitted = True

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._enabled or self._dry_run or self._last_probed_step is None:
            return
        if self.probe_at_end:
            self._probe_if_new(trainer, pl_module)
        if trainer.is_global_zero and len(self.history):
            self._write_history(trainer)
            if not self._hparams_declared:  # the default layer was unknown at fit start
                self._declare_hparam_metrics(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "layers": self.layers,
            "history": self.history.state_dict(),
            "auto_interval": self.schedule.auto_interval,
            "next_auto_step": self.schedule.next_auto_step,
            "last_probed_step": self._last_probed_step,
            "inputs": self._inputs,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"ERFMonitor state version {state_dict.get('version')} is not supported "
                f"(this erf-callback writes version {_STATE_VERSION})."
            )
        self.layers = state_dict["layers"]
        self.history.load_state_dict(state_dict["history"])
        self.schedule.auto_interval = state_dict["auto_interval"]
        self.schedule.next_auto_step = state_dict.get("next_auto_step")
        self._last_probed_step = state_dict["last_probed_step"]
        self._inputs = state_dict["inputs"]
        self._device_inputs = None

    # ---- public helpers --------------------------------------------------------------------

    @property
    def probe_seconds(self) -> list[float]:
        """Wall time of every probe of this run (for overhead accounting)."""
        return list(self._probe_seconds)

    @property
    def history_files(self) -> tuple[str, str] | None:
        """Paths of this run's CSV and JSON history files, once rank 0 has taken them."""
        if self._files_name is None or self._history_dir is None:
            return None
        return history_paths(self._history_dir, self._files_name)

    @property
    def probe_inputs(self) -> torch.Tensor | None:
        """The fixed probe inputs (CPU), once captured."""
        return self._inputs

    # ---- probing ---------------------------------------------------------------------------

    def _check_layer_names(self, net: nn.Module) -> None:
        """Resolve the layer names in ``net``; names written from the LightningModule (with
        ``module``'s prefix) get the names to write instead."""
        assert self.layers is not None
        try:
            resolve_layers(net, self.layers)
        except KeyError as err:
            prefix = f"{self.module}." if self.module else None
            given = [n for n in self.layers if prefix and n.startswith(prefix)]
            inside = [n[len(prefix) :] for n in given] if prefix else []
            try:
                resolve_layers(net, inside)
            except KeyError:
                inside = []
            if not inside:
                raise
            raise KeyError(
                f"{err.args[0]} ERFMonitor(module={self.module!r}) names layers inside "
                f"{self.module!r}: write {inside} for {given}."
            ) from None

    def _probed_module(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            children = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"ERFMonitor(module={self.module!r}): no such submodule; the LightningModule "
                f"has {children}."
            ) from err

    def _probe_if_new(
        self, trainer: Any, pl_module: nn.Module, *, dry: bool = False, strict: bool = False
    ) -> None:
        if trainer.global_step == self._last_probed_step:
            return  # never twice for one global_step
        start = time.perf_counter()
        self._probe(trainer, pl_module, dry=dry, strict=strict)
        self._probe_seconds.append(time.perf_counter() - start)
        if self._step_clock is not None:
            self._step_clock += time.perf_counter() - start  # probe time is not step time

    def _probe(
        self, trainer: Any, pl_module: nn.Module, *, dry: bool, strict: bool, mark: bool = True
    ) -> None:
        assert self.layers is not None
        assert self._inputs is not None
        net = self._probed_module(pl_module)
        step = trainer.global_step
        maps: dict[str, ERFMap] | None = None
        try:
            x = self._inputs_on(net)
            with warnings.catch_warnings():
                # The engine's NaN/zero warnings are re-issued below once per layer and kind.
                warnings.simplefilter("ignore", ERFWarning)
                maps = run_probe(net, x, self.layers, self.probe_config, self._group)
        except Exception as err:
            oom = is_out_of_memory(err)
            if strict and not oom:  # configuration errors: loud, at fit start
                if isinstance(err, UnbatchedInputError) and isinstance(
                    self.input_source, (list, tuple)
                ):
                    raise ValueError(
                        f"{err} ERFMonitor(inputs=[...]) takes a tensor or an iterable of "
                        "batches: a list of single images must be stacked into one batch "
                        "first, inputs=torch.stack(images)."
                    ) from err
                reshape = getattr(err, RESHAPE, None)
                if isinstance(reshape, str):
                    raise type(err)(f"{err} {self._reshape_hint(reshape)}") from err
                if isinstance(err, NotImplementedError) and _no_forward(err, net):
                    if self.module is None:
                        raise ValueError(
                            "ERFMonitor calls the LightningModule's forward(x), which is not "
                            "implemented. Implement forward, or pass "
                            "module='<attribute of the network>'."
                        ) from err
                    raise ValueError(
                        f"ERFMonitor(module={self.module!r}) probes a {type(net).__name__}, "
                        "which has no forward(x) (a container such as ModuleList or "
                        "ModuleDict calls nothing itself). Pass module= the submodule that "
                        "runs the network on the image, or leave module= out to probe "
                        "through the LightningModule's forward."
                    ) from err
                # The model's own failure on the probe inputs (or torch's, which the monitor
                # accounts for in place of compute_erf).
                said = torch_error(err)
                if type(said) is RuntimeError:
                    raise RuntimeError(self._inputs_failure(said)) from said
                raise
            # Mid-training, or out of memory: a skipped probe, never a crashed run.
            hint = " Lower chunk_size or num_samples, or probe fewer layers." if oom else ""
            self._warn_once(
                f"skip:{type(err).__name__}",
                f"ERF probe at step {step} skipped ({type(err).__name__}: {err}); "
                f"training goes on.{hint}",
            )
        if maps is None:
            # Outside the except block: only now is the traceback, which holds the failed
            # probe's tensors, gone, so the memory can really be given back.
            free_probe_memory()
            return
        if any(m.status != "ok" for m in maps.values()) and has_nonfinite_state(net):
            # NaN weights can also give all-zero gradients (NaN fails ReLU's `> 0`): a diverged
            # model is "nonfinite", not "zero" (dead units), whatever the map shows.
            for m in maps.values():
                if m.status != "ok":
                    m.status = "nonfinite"
        if mark:
            self._last_probed_step = step
        if dry:
            return
        if strict:
            self._record(trainer, maps)
        else:
            self._guard.call(
                "record", f"recording the ERF probe at step {step}", self._record, trainer, maps
            )

    def _record(self, trainer: Any, maps: dict[str, ERFMap]) -> None:
        step = trainer.global_step
        probe = self.history.num_probes
        # Under DDP every rank holds the same maps and history, so the ranks split the
        # rendering (the slowest part of a probe) and rank 0 gathers the pictures: every rank
        # reaches that gather at every probe, whatever failed before it, so none waits alone.
        group = self._group if self.log_images else None
        mine: dict[str, np.ndarray] = {}
        failure: Exception | None = None
        try:
            recorded = record_probe(
                self.history,
                maps,
                step,
                trainer.current_epoch,
                self.tag_prefix,
                self._warn_once,
                self.detail_scalars,
            )
            valid, layer_metrics = recorded.maps, recorded.metrics
            # A probe without valid maps still redraws the radius chart (its crosses mark the
            # probes that gave none) once an earlier probe drew a curve.
            drawable = bool(valid) or any(r["status"] == "ok" for r in self.history.records)
            wanted = self.log_images and drawable and probe % self.images_every_n_probes == 0
            if wanted and group is None and trainer.is_global_zero:
                # One process: no picture for a run whose loggers cannot store any (CSV only,
                # logger=False). Ranks keep rendering their shares: every rank must reach the
                # gather, and only rank 0's loggers are real.
                wanted = self._guard.call(
                    "image-loggers",
                    f"checking which loggers take ERF images at step {step}",
                    self._images.any_takes_images,
                    trainer.loggers,
                    then="rendering the images anyway;",
                ) in (True, None)
            if wanted and (group is not None or trainer.is_global_zero):
                share = (group.rank, group.world_size) if group is not None else (0, 1)
                mine = (
                    self._guard.call(
                        "render",
                        f"rendering the ERF images at step {step}",
                        self._renderer.render,
                        valid,
                        self.history,
                        layer_metrics,
                        step,
                        share,
                        maps,
                        then="no images for this probe;",
                    )
                    or {}
                )
        except Exception as err:
            if group is None:
                raise
            failure = err
        images = self._gather_images(group, mine, step) if group is not None else mine
        if failure is not None:
            raise failure
        if not trainer.is_global_zero:
            return
        scalars = recorded.scalars
        # Logging and files are side work: a failing logger, renderer or disk never ends
        # training, and the history (in memory, in checkpoints) is written at the next success.
        self._guard.each_logger(
            trainer.loggers, "scalars", lambda one: log_scalars(one, scalars, step), step
        )
        if images:
            self._guard.each_logger(
                trainer.loggers,
                "images",
                lambda one: self._images.publish(one, images, step),
                step,
            )
        self._write_history(trainer)

    def _gather_images(
        self, group: ProbeGroup, mine: dict[str, np.ndarray], step: int
    ) -> dict[str, np.ndarray]:
        """Every rank's share of the images, merged on rank 0 (empty on the other ranks)."""
        gather = group.gather or torch_gather_to_zero()
        parts = self._guard.call(
            "gather", f"collecting the ERF images of all ranks at step {step}", gather, mine
        )
        merged: dict[str, np.ndarray] = {}
        for part in parts or []:
            merged.update(part or {})
        return merged

    # ---- inputs ----------------------------------------------------------------------------

    def _reshape_hint(self, reshape: str) -> str:
        """How to give the probe its inputs reshaped by ``reshape`` (an expression of
        ``inputs``), where they come from."""
        if isinstance(self.input_source, torch.Tensor):
            return f"Pass ERFMonitor(inputs=...) so: {reshape} of the tensor given now."
        batch = reshape.replace("inputs", "batch[0]", 1)
        return (
            "ERFMonitor takes the probe inputs from the batches as they hold them: reshape "
            f"them with input_key=, e.g. input_key=lambda batch: {batch} for (images, labels) "
            "batches."
        )

    def _inputs_failure(self, err: BaseException) -> str:
        """The message of a model that failed on the probe inputs at the fit-start probe:
        torch's own names neither the probe nor where its inputs came from."""
        x = self._inputs
        shape = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if x is not None else ""
        where = repr(self.module) if self.module is not None else "the LightningModule"
        if isinstance(self.input_source, torch.Tensor):
            source = "from inputs="
            fix = "inputs= must be a batch it takes: (N, C, *spatial), with its input channels."
        elif self.input_source == "noise":
            source = "noise shaped like one sample of the first training batch"
            fix = "Check that the module takes the training batches' images as they are."
        else:
            key = f"input_key={self.input_key!r}" if self.input_key is not None else "the first"
            batches = "training batch" if self.input_source == "train" else "inputs= batches"
            source = f"{key} image tensor of the {batches}"
            fix = "If the module takes another part of the batch, set input_key= or module=."
        return (
            f"ERFMonitor's fit-start probe ran {where} on the probe inputs {shape} ({source}), "
            f"and it failed: {str(err).rstrip().rstrip('.')}. {fix}"
        )

    def _inputs_on(self, net: nn.Module) -> torch.Tensor:
        assert self._inputs is not None
        device, _ = model_device_dtype(net, self._inputs)
        if self._device_inputs is None or self._device_inputs.device != device:
            self._device_inputs = self._inputs.to(device)
        return self._device_inputs

    def _capture_inputs(self, trainer: Any, batch: Any) -> torch.Tensor:
        first = extract_input(batch, self.input_key)
        if self.input_source == "noise":
            return noise_like(first, self.num_samples, self.seed)
        parts, have = [first.detach().to("cpu", copy=True)], first.shape[0]
        if have < self.num_samples:
            loader = getattr(trainer, "train_dataloader", None)
            if loader is not None and not reuses_workers(loader):
                need = self.num_samples - have
                more = gather_inputs(loader, self.input_key, need, skip=1)
                if more.shape[0]:
                    parts.append(more)
                got = have + more.shape[0]
                if got < self.num_samples:
                    self._warn_once(
                        "few-samples",
                        f"ERFMonitor: the training data holds {got} samples < num_samples="
                        f"{self.num_samples}; probing with those {got}.",
                    )
            else:
                self._warn_once(
                    "few-samples",
                    f"ERFMonitor: the first batch has {have} samples < num_samples="
                    f"{self.num_samples}, and the dataloader cannot be re-read safely "
                    "(persistent workers); probing with the samples at hand.",
                )
        inputs = torch.cat(parts)[: self.num_samples]
        return inputs.float() if not inputs.is_floating_point() else inputs

    # ---- bookkeeping -----------------------------------------------------------------------

    def _time_step(self, trainer: Any, steps: int) -> None:
        """Time the batch that just advanced ``global_step`` by ``steps`` (more than one when
        it stepped several optimisers): the schedule counts in optimiser steps."""
        now = time.perf_counter()
        if self._step_clock is not None:
            self._step_times.append((now - self._step_clock) / steps)
            self._trained_seconds += now - self._step_clock
        self._step_clock = now
        if (
            self.schedule.is_auto
            and self.schedule.auto_interval is None
            and len(self._step_times) >= AUTO_WARMUP_STEPS
            and self._probe_seconds
        ):
            self._choose_interval(trainer)

    def _needs_timing_probe(self) -> bool:
        return (
            self.schedule.is_auto
            and self.schedule.auto_interval is None
            and not self._probe_seconds
            and len(self._step_times) >= AUTO_WARMUP_STEPS
        )

    def _choose_interval(self, trainer: Any) -> None:
        """Set the automatic interval from measured times; called at the same steps on all ranks.

        The first probe carries one-time costs (imports, plotting caches), so once later
        probes exist their median is used; the interval is revisited after every probe.
        """
        later = self._probe_seconds[1:] or self._probe_seconds
        # The history files grow with every probe: the newest probe is the better forecast
        # when it is the slowest.
        probe_s = max(float(np.median(later[-20:])), later[-1])
        step_s = float(np.median(self._step_times[-200:]))
        step = trainer.global_step
        # The end probe is kept in reserve, so the budget holds over the whole run with it.
        reserve = probe_s if self.probe_at_end else 0.0
        interval = self.schedule.choose_auto_interval(
            probe_s, step_s, sum(self._probe_seconds) + reserve, self._trained_seconds, step
        )
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and hasattr(strategy, "broadcast"):
            # Ranks time differently; all must agree or a collective could hang.
            interval = int(strategy.broadcast(interval, src=0))
            self.schedule.auto_interval = interval
            self.schedule.next_auto_step = step + interval
        if not self._told_interval:
            self._told_interval = True
            log.info(
                "erf-callback: probe %.3fs, step %.4fs -> next probe in %d steps; probes are "
                "spaced so that they take <= %.0f%% of the training time so far",
                probe_s,
                step_s,
                interval,
                100 * self.schedule.max_overhead,
            )

    def _name_history_files(self, num_monitors: int) -> None:
        if self._history_filename_arg is None:
            self.history_filename = (
                DEFAULT_BASENAME
                if num_monitors == 1
                else derived_basename(self.tag_prefix, self.module, self._layers_arg)
            )

    def _declare_hparam_metrics(self, trainer: Any, pl_module: nn.Module) -> None:
        tags = [
            f"{self.tag_prefix}/{layer}/{k}" for layer in self.layers or [] for k in MAIN_SCALARS
        ]
        params = dict(getattr(pl_module, "hparams_initial", None) or {})
        datamodule = getattr(trainer, "datamodule", None)
        params.update(getattr(datamodule, "hparams_initial", None) or {})
        params.pop("_class_path", None)
        try:
            self._hparams_declared = log_hparam_metrics(trainer.loggers, tags, params)
        except Exception as err:  # a convenience: never worth ending a run for
            self._hparams_declared = True
            self._warn_once(
                "hparams", f"ERFMonitor: HParams metrics not written ({type(err).__name__}: {err})."
            )

    def _write_history(self, trainer: Any) -> None:
        """Write the history files (rank 0), never raising: a failure warns once per
        directory; the next call rewrites everything, so nothing is lost."""
        directory = self._history_dir or trainer.default_root_dir
        then = (
            "the history stays in memory and in checkpoints and is written at the next "
            "successful write;"
        )
        what = f"writing the ERF history to {directory!r}"
        if self._files_name is not None:
            self._guard.call(
                f"write:{directory}",
                what,
                self.history.write,
                directory,
                self._files_name,
                then=then,
            )
            return
        name = self._guard.call(
            f"write:{directory}",
            what,
            claim_history_files,
            directory,
            self.history_filename,
            self.history,
            then=then,
        )
        self._files_name = name

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, ERFWarning, stacklevel=3)

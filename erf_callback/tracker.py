"""``ERFTracker``: the callback's probing for any training loop, no Lightning needed.

One object holds the engine (:func:`~erf_callback.compute_erf`), the schedule
(:class:`~erf_callback.callback.schedule.ProbeSchedule`), the history
(:class:`~erf_callback.callback.history.ERFHistory`) and the TensorBoard images of
:mod:`erf_callback.callback.images`; a plain-PyTorch loop calls :meth:`ERFTracker.step` after
every optimiser step. It logs the same tags and writes the same history files as
``ERFMonitor``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from erf_callback.callback.history import ERFHistory
from erf_callback.callback.images import render_probe_images
from erf_callback.callback.publish import ImagePublisher, add_custom_scalars, log_scalars
from erf_callback.callback.record import record_probe
from erf_callback.callback.schedule import AUTO_WARMUP_STEPS, DEFAULT_MAX_OVERHEAD, ProbeSchedule
from erf_callback.engine.compute import compute_erf
from erf_callback.engine.config import DEFAULT, Channels, Default, Position, ProbeConfig, Reduction
from erf_callback.engine.erf_map import ERFMap
from erf_callback.engine.layers import resolve_layers
from erf_callback.engine.transforms import OutputTransform
from erf_callback.engine.validate import check_inputs, normalize_layers
from erf_callback.fit.metrics import MetricConfig
from erf_callback.warnings import ERFWarning

__all__ = ["ERFTracker"]

_STATE_VERSION = 1


class _WriterLogger:
    """A ``SummaryWriter`` seen as a logger, so the callback's publishing code serves both."""

    def __init__(self, writer: Any) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, step)


class ERFTracker:
    """Track the effective receptive field of layers through a plain PyTorch training loop.

    Construction probes the untrained model (step 0), so a bad layer name or input fails
    before any training time is spent. Then call :meth:`step` after every optimiser step and
    :meth:`close` at the end (or use the tracker as a context manager). Each probe logs
    ``<tag_prefix>/<layer>/<metric>`` scalars and, with ``log_images``, heatmaps, radial
    profiles and the evolution grid to ``writer``, and rewrites ``<history_filename>.csv`` /
    ``.json`` in ``history_dir``. Probing never changes training (eval mode, no weight
    gradients, modes/buffers/RNG restored); a probe that fails after the first is skipped with
    one :class:`~erf_callback.ERFWarning`.

    Args:
        model: the network (or the part of it to probe).
        layers: layer names as in ``model.named_modules()`` (``"output"``: the model output).
        inputs: the fixed probe inputs ``(N, C, *spatial)``, e.g. 32 training images.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or None: history only).
        every_n_steps: probe every N steps.
        at_steps: probe at these steps.
        log_spaced: probes per decade of steps.
        max_overhead: with no schedule argument, the interval is chosen after the first
            steps so that probing costs at most this fraction of the loop's time.
        probe_at_init: probe at construction (step 0). Pass False when resuming.
        probe_at_end: probe once more in :meth:`close`.
        probe: every probe option in one :class:`~erf_callback.ProbeConfig`; the keyword
            arguments below override its fields.
        position, channels, reduction, output_transform, chunk_size: as in
            :func:`~erf_callback.compute_erf`.
        metric_config: metric choices (radius factor, energy fraction, fit method, ...).
        log_images: log heatmaps, radial profiles and the evolution grid.
        images_every_n_probes: log images at every N-th probe only (scalars always).
        cmap: matplotlib colour map of the heatmaps.
        history_map_size: maps are kept downsampled to at most this many pixels per side.
        tag_prefix: first part of every tag.
        history_dir: where the history files go; default ``writer.log_dir`` (no files without
            either).
        history_filename: base name of the history files.

    Example:
        >>> import torch
        >>> from erf_callback import ERFTracker
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(2)])
        >>> tracker = ERFTracker(net, ["1"], torch.randn(4, 1, 16, 16), every_n_steps=2)
        >>> [tracker.step() is not None for _ in range(4)]
        [False, True, False, True]
        >>> [r["step"] for r in tracker.history.records], tracker.history.records[0]["trf_x"]
        ([0, 2, 4], 5.0)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        inputs: torch.Tensor,
        writer: Any | None = None,
        *,
        every_n_steps: int | None = None,
        at_steps: Sequence[int] | None = None,
        log_spaced: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
        probe_at_init: bool = True,
        probe_at_end: bool = True,
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
        images_every_n_probes: int = 1,
        cmap: str = "inferno",
        history_map_size: int = 64,
        tag_prefix: str = "erf",
        history_dir: str | os.PathLike[str] | None = None,
        history_filename: str = "erf_history",
    ) -> None:
        if images_every_n_probes < 1:
            raise ValueError(f"images_every_n_probes must be >= 1; got {images_every_n_probes}")
        if not tag_prefix or tag_prefix.endswith("/"):
            raise ValueError(f"tag_prefix must be non-empty without a trailing '/': {tag_prefix!r}")
        self.model = model
        self.layers = normalize_layers(layers)
        resolve_layers(model, self.layers)  # unknown names fail here, with the closest names
        self.inputs = check_inputs(inputs).detach().to("cpu", copy=True)
        self.writer = writer
        self.schedule = ProbeSchedule(
            every_n_steps=every_n_steps,
            at_steps=at_steps,
            log_spaced=log_spaced,
            max_overhead=max_overhead,
        )
        self.probe_at_end = probe_at_end
        self.probe_config = (probe or ProbeConfig()).replace(
            position=position,
            channels=channels,
            reduction=reduction,
            output_transform=output_transform,
            chunk_size=chunk_size,
            metrics=MetricConfig() if metric_config is None else metric_config,
        )
        self.log_images = log_images
        self.images_every_n_probes = images_every_n_probes
        self.cmap = cmap
        self.tag_prefix = tag_prefix
        self.history_filename = history_filename
        self.history_dir = None if history_dir is None else os.fspath(history_dir)
        if self.history_dir is None and writer is not None:
            self.history_dir = getattr(writer, "log_dir", None)
        self.history = ERFHistory(history_map_size)
        self.global_step = 0
        self.probe_seconds: list[float] = []
        self._loggers = [] if writer is None else [_WriterLogger(writer)]
        self._images = ImagePublisher()
        self._warned: set[str] = set()
        self._last_probed_step: int | None = None
        self._step_times: list[float] = []
        self._clock: float | None = None
        self._closed = False
        add_custom_scalars(self._loggers, tag_prefix)
        if probe_at_init:
            self.probe(strict=True)  # configuration errors surface now, before training
        self._clock = time.perf_counter()

    # ---- the loop's calls ----------------------------------------------------------------

    def step(self, step: int | None = None, epoch: int = 0) -> dict[str, ERFMap] | None:
        """Call after each optimiser step; probes when the schedule says so.

        Args:
            step: the loop's step count after this optimiser step; default: one more than
                the last call's (the first call is step 1).
            epoch: recorded with the probe.

        Returns:
            The maps when a probe ran (and succeeded), else None.
        """
        self.global_step = self.global_step + 1 if step is None else int(step)
        self._time_step()
        if self.schedule.is_auto and self.schedule.auto_interval is None:
            if len(self._step_times) < AUTO_WARMUP_STEPS:
                return None
            if not self.probe_seconds:  # no init probe: time one now to choose the interval
                maps = self.probe(epoch=epoch)
                self._choose_interval()
                return maps
            self._choose_interval()
        if not self.schedule.due_at_step(self.global_step):
            return None
        maps = self.probe(epoch=epoch)
        if self.schedule.is_auto:
            self._choose_interval()
        return maps

    def probe(self, *, epoch: int = 0, strict: bool = False) -> dict[str, ERFMap] | None:
        """Probe now (at :attr:`global_step`) whatever the schedule; at most once per step.

        With ``strict`` an error is raised; otherwise the probe is skipped with one warning.
        """
        if self.global_step == self._last_probed_step:
            return None
        start = time.perf_counter()
        try:
            try:
                with warnings.catch_warnings():
                    # The engine's NaN/zero warnings are re-issued once per layer by
                    # record_probe.
                    warnings.simplefilter("ignore", ERFWarning)
                    maps = compute_erf(
                        self.model, self.inputs, self.layers, probe=self.probe_config
                    )
            except Exception as err:
                if strict:
                    raise
                self._warn_once(
                    f"skip:{type(err).__name__}",
                    f"ERF probe at step {self.global_step} skipped ({type(err).__name__}: "
                    f"{err}); training goes on.",
                )
                return None
            self._last_probed_step = self.global_step
            self._record(maps, epoch)
            self.probe_seconds.append(time.perf_counter() - start)
            return maps
        finally:
            self._exclude_from_step_time(time.perf_counter() - start)

    def close(self) -> None:
        """Probe once more (``probe_at_end``), write the history files, flush the writer."""
        if self._closed:
            return
        self._closed = True
        if self.probe_at_end:
            self.probe()
        self.write_history()
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> ERFTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_history(self) -> tuple[str, str] | None:
        """Write the CSV/JSON history into ``history_dir``; returns their paths (or None)."""
        if self.history_dir is None or not len(self.history):
            return None
        return self.history.write(self.history_dir, self.history_filename)

    # ---- resuming ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "version": _STATE_VERSION,
            "global_step": self.global_step,
            "history": self.history.state_dict(),
            "auto_interval": self.schedule.auto_interval,
            "last_probed_step": self._last_probed_step,
            "inputs": self.inputs,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (construct with ``probe_at_init=False`` to resume)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"ERFTracker state version {state.get('version')} is not supported (this "
                f"erf-callback writes version {_STATE_VERSION})."
            )
        self.global_step = int(state["global_step"])
        self.history.load_state_dict(state["history"])
        self.schedule.auto_interval = state["auto_interval"]
        self._last_probed_step = state["last_probed_step"]
        self.inputs = state["inputs"]

    # ---- internals -----------------------------------------------------------------------

    def _record(self, maps: dict[str, ERFMap], epoch: int) -> None:
        step = self.global_step
        probe = self.history.num_probes
        out = record_probe(self.history, maps, step, epoch, self.tag_prefix, self._warn_once)
        log_scalars(self._loggers, out.scalars, step)
        due = probe % self.images_every_n_probes == 0
        if self.log_images and self._loggers and out.maps and due:
            images = render_probe_images(
                out.maps, self.history, self.tag_prefix, self.cmap, out.metrics
            )
            self._images.publish(self._loggers, images, step)
        self.write_history()

    def _time_step(self) -> None:
        now = time.perf_counter()
        if self._clock is not None:
            self._step_times.append(now - self._clock)
        self._clock = now

    def _exclude_from_step_time(self, seconds: float) -> None:
        if self._clock is not None:
            self._clock += seconds  # probe time is not step time

    def _choose_interval(self) -> None:
        # The first probe carries one-time costs (imports, plotting caches).
        probe_s = float(np.median(self.probe_seconds[1:] or self.probe_seconds))
        step_s = float(np.median(self._step_times[-200:]))
        self.schedule.choose_auto_interval(probe_s, step_s)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, ERFWarning, stacklevel=4)

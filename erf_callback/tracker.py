"""``ERFTracker``: the callback's probing for any training loop, no Lightning needed.

``ERFTracker`` drives :class:`~erf_callback.callback.core.ERFMonitorBase`, the logic behind
``ERFMonitor``, which only duck-types its ``trainer``: a small stand-in carries the loop's step
count and the ``SummaryWriter``. So the engine, the schedule (automatic interval included),
the history, the images, the warnings and the checkpoint state are the callback's own code,
and a plain-PyTorch loop gets the same tags and history files as a Lightning run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from erf_callback.callback.core import ERFMonitorBase
from erf_callback.callback.history import ERFHistory
from erf_callback.callback.schedule import DEFAULT_MAX_OVERHEAD, ProbeSchedule
from erf_callback.engine.config import (
    DEFAULT,
    Channels,
    Default,
    Position,
    ProbeConfig,
    Reduction,
    as_python,
    is_int,
)
from erf_callback.engine.transforms import OutputTransform
from erf_callback.engine.validate import check_inputs, check_model
from erf_callback.fit.metrics import MetricConfig

__all__ = ["ERFTracker"]


class _WriterLogger:
    """A ``SummaryWriter`` seen as a logger, so the callback's publishing code serves both."""

    def __init__(self, writer: Any) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, step)


class _Loop:
    """What ``ERFMonitorBase`` reads from a trainer, for a single-process training loop."""

    is_global_zero = True
    sanity_checking = False
    fast_dev_run = False

    def __init__(self, writer: Any | None, history_dir: str | None) -> None:
        self.global_step = 0
        self.current_epoch = 0
        self.loggers = [] if writer is None else [_WriterLogger(writer)]
        self.log_dir = history_dir
        self.default_root_dir = history_dir
        self.callbacks: list[Any] = []  # the tracker's monitor, once built


class _LoopMonitor(ERFMonitorBase):
    """The callback's logic; without a folder the history stays in memory only."""

    def _write_history(self, trainer: Any) -> None:
        if trainer.log_dir is not None:
            super()._write_history(trainer)


class ERFTracker:
    """Track the effective receptive field of layers through a plain PyTorch training loop.

    Construction probes the untrained model (step 0), so a bad layer name or input fails
    before any training time is spent (with ``probe_at_init=False`` the probe is a dry run
    that checks the configuration and records nothing). Then call :meth:`step` after every
    optimiser step and :meth:`close` at the end (or use the tracker as a context manager).
    Each probe logs ``<tag_prefix>/<layer>/<metric>`` scalars and, with ``log_images``,
    heatmaps, radial profiles and the evolution grid to ``writer``, and rewrites
    ``<history_filename>.csv`` / ``.json`` in ``history_dir``. Probing never changes training
    (eval mode, no weight gradients, modes/buffers/RNG restored); a probe that fails after the
    first is skipped with one :class:`~erf_callback.ERFWarning`.

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
        >>> [len(tracker.step()) for _ in range(4)]  # records added: one layer, probed twice
        [0, 1, 0, 1]
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
        if not isinstance(layers, str) and not layers:
            raise ValueError("layers is empty; pass the names of the layers to probe.")
        check_model(model)
        inputs = check_inputs(inputs)
        self.model = model
        self.writer = writer
        folder = os.fspath(history_dir) if history_dir is not None else None
        if folder is None and writer is not None:
            folder = getattr(writer, "log_dir", None)
        self._loop = _Loop(writer, folder)
        self._monitor = _LoopMonitor(
            layers,
            every_n_steps,
            num_samples=inputs.shape[0],
            at_steps=at_steps,
            log_spaced=log_spaced,
            max_overhead=max_overhead,
            probe_at_init=probe_at_init,
            probe_at_end=probe_at_end,
            inputs=inputs,
            probe=probe,
            position=position,
            channels=channels,
            reduction=reduction,
            output_transform=output_transform,
            chunk_size=chunk_size,
            metric_config=metric_config,
            log_images=log_images,
            images_every_n_probes=images_every_n_probes,
            cmap=cmap,
            history_map_size=history_map_size,
            tag_prefix=tag_prefix,
            history_filename=history_filename,
        )
        self._loop.callbacks = [self._monitor]
        self._closed = False
        self._monitor.setup(self._loop, model, "fit")  # unknown layer names fail here
        self._monitor.on_train_start(self._loop, model)
        # The monitor's fit-start probe: step 0, strict (a bad configuration raises now).
        self._monitor.on_train_batch_start(self._loop, model, None, 0)

    # ---- what the loop reads -------------------------------------------------------------

    @property
    def history(self) -> ERFHistory:
        """Every probe's record (and downsampled map), as ``ERFMonitor.history``."""
        return self._monitor.history

    @property
    def schedule(self) -> ProbeSchedule:
        return self._monitor.schedule

    @property
    def layers(self) -> list[str]:
        return list(self._monitor.layers or [])

    @property
    def global_step(self) -> int:
        return int(self._loop.global_step)

    @property
    def inputs(self) -> torch.Tensor:
        """The fixed probe inputs (CPU)."""
        assert self._monitor.probe_inputs is not None
        return self._monitor.probe_inputs

    @property
    def probe_seconds(self) -> list[float]:
        return self._monitor.probe_seconds

    @property
    def history_dir(self) -> str | None:
        return self._loop.log_dir

    # ---- the loop's calls ----------------------------------------------------------------

    def step(self, step: int | None = None, epoch: int = 0) -> list[dict[str, Any]]:
        """Call after each optimiser step; probes when the schedule says so.

        Args:
            step: the loop's step count after this optimiser step (an int or a 0-d integer
                tensor); default: one more than the last call's (the first call is step 1).
            epoch: recorded with the probe.

        Returns:
            The history records this call added (one per layer when it probed; else empty).

        Raises:
            ValueError: ``step`` is not a non-negative int (``1.5`` is not truncated).
        """
        step = as_python(step)  # a count kept in a 0-d tensor is that count
        if step is not None and not (is_int(step) and step >= 0):
            raise ValueError(
                f"step must be a non-negative int (the loop's count of optimiser steps), or "
                f"None to count one more; got {step!r}"
            )
        if self._closed:
            self._monitor._warn_once(
                "tracker-closed",
                "ERFTracker.step() after close(): nothing is probed or written any more. "
                "Close the tracker when training ends (or use it as a context manager).",
            )
            return []
        last = self._loop.global_step
        if step is not None and step < last:
            self._monitor._warn_once(
                "tracker-backwards",
                f"ERFTracker.step(step={step}) after step {last}: the step count went back "
                "(a batch index that restarts every epoch?). Pass the loop's global count of "
                "optimiser steps, or call step() without it to count them.",
            )
        self._loop.global_step = last + 1 if step is None else int(step)
        self._loop.current_epoch = epoch
        before = len(self.history)
        self._monitor.on_train_batch_end(self._loop, self.model, None, None, 0)
        return self.history.records[before:]

    def close(self) -> None:
        """Probe once more (``probe_at_end``), write the history files, flush the writer."""
        if self._closed:
            return
        self._closed = True
        self._monitor.on_train_end(self._loop, self.model)
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> ERFTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resuming ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the step count: plain containers and tensors, so it loads
        with ``torch.load(..., weights_only=True)``."""
        return {"global_step": self.global_step, "monitor": self._monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (construct with ``probe_at_init=False`` to resume)."""
        self._loop.global_step = int(state["global_step"])
        self._monitor.load_state_dict(state["monitor"])
        self._monitor._last_step_seen = self._loop.global_step  # the next step() follows it

"""Send scalars and images to whatever loggers a Trainer has (duck-typed, namespace-free).

* Scalars go to every logger through ``logger.log_metrics(metrics, step)`` (TensorBoard, CSV,
  W&B, MLflow, ...).
* Images go to loggers whose ``experiment`` is a TensorBoard ``SummaryWriter`` (``add_image``
  with uint8 HWC arrays) and to loggers with ``log_image(key, images, step)`` (W&B). Others
  get a one-time info message.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "MAIN_SCALARS",
    "ImagePublisher",
    "add_custom_scalars",
    "custom_scalars_layout",
    "detail_prefix",
    "finite_scalars",
    "log_hparam_metrics",
    "log_scalars",
    "scalar_tags",
    "tensorboard_writer",
]

#: The scalars under the main prefix: how big the ERF is and how it is changing. TensorBoard
#: shows one chart per tag, alphabetically within a prefix, so every other metric goes to a
#: second prefix (``<prefix>_detail``) to keep these few on the first page.
MAIN_SCALARS = ("radius", "radius_growth", "erf_trf_ratio", "gaussian_r2", "border_mass")


def detail_prefix(prefix: str) -> str:
    """Prefix of the metrics that are not among :data:`MAIN_SCALARS`."""
    return f"{prefix}_detail"


def scalar_tags(
    prefix: str, layer: str, values: Mapping[str, float], detail: bool = True
) -> dict[str, float]:
    """Tags of one layer's scalars: main ones under ``prefix``, the rest under ``prefix_detail``.

    Args:
        prefix: the main prefix (``tag_prefix``).
        layer: the layer name.
        values: ``{metric: value}``.
        detail: also return the metrics outside :data:`MAIN_SCALARS`.

    Example:
        >>> scalar_tags("erf", "layer4", {"radius": 3.0, "sigma_x": 1.5})
        {'erf/layer4/radius': 3.0, 'erf_detail/layer4/sigma_x': 1.5}
        >>> scalar_tags("erf", "layer4", {"radius": 3.0, "sigma_x": 1.5}, detail=False)
        {'erf/layer4/radius': 3.0}
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        if key in MAIN_SCALARS:
            out[f"{prefix}/{layer}/{key}"] = value
        elif detail:
            out[f"{detail_prefix(prefix)}/{layer}/{key}"] = value
    return out


log = logging.getLogger("erf_callback")


def finite_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN/Inf: they break charts (a global TRF is ``inf``; it stays in the history)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def log_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    scalars = finite_scalars(metrics)
    if not scalars:
        return
    for logger in loggers:
        logger.log_metrics(scalars, step=step)


def tensorboard_writer(logger: Any) -> Any | None:
    """The logger's ``SummaryWriter`` if it has one, else None."""
    try:
        exp = logger.experiment
    except Exception:  # some loggers build their experiment lazily and may fail offline
        return None
    if hasattr(exp, "_erf_callback_no_such_attribute"):
        # An object that answers every attribute: Lightning's DummyExperiment, the experiment
        # of the DummyLogger that fast_dev_run puts in place of the user's loggers.
        return None
    return exp if hasattr(exp, "add_image") and hasattr(exp, "add_scalar") else None


def _image_sink(logger: Any) -> Callable[[str, np.ndarray, int], None] | None:
    """How ``logger`` stores one image ``(tag, uint8 HWC array, step)``: its TensorBoard
    ``SummaryWriter``, else its own ``log_image`` (W&B); None when it cannot (nor Lightning's
    DummyLogger of fast_dev_run, which answers every attribute and stores nothing)."""
    writer = tensorboard_writer(logger)
    if writer is not None:
        return lambda tag, img, step: writer.add_image(tag, img, step, dataformats="HWC")
    if hasattr(logger, "_erf_callback_no_such_attribute"):
        return None
    log_image = getattr(logger, "log_image", None)
    if not callable(log_image):
        return None
    return lambda tag, img, step: log_image(key=tag, images=[img], step=step)


class ImagePublisher:
    """Logs images to every logger that can take them; tells once about the others."""

    def __init__(self) -> None:
        self._told: set[int] = set()

    def any_takes_images(self, loggers: Iterable[Any]) -> bool:
        """Whether any of ``loggers`` can store images (a TensorBoard ``SummaryWriter`` or a
        ``log_image`` method); tells once about each that cannot. Without one, rendering the
        pictures (the slowest part of a probe) would be wasted: a CSV-only run skips it."""
        found = False
        for logger in loggers:
            if _image_sink(logger) is not None:
                found = True
            else:
                self._tell(logger)
        return found

    def publish(self, loggers: Iterable[Any], images: Mapping[str, np.ndarray], step: int) -> None:
        if not images:
            return
        for logger in loggers:
            sink = _image_sink(logger)
            if sink is None:
                self._tell(logger)
                continue
            for tag, img in images.items():
                sink(tag, img, step)

    def _tell(self, logger: Any) -> None:
        if id(logger) not in self._told:
            self._told.add(id(logger))
            log.info(
                "erf-callback: %s cannot store images; it gets the ERF scalars only. Add a "
                "TensorBoardLogger (or WandbLogger) to see heatmaps.",
                type(logger).__name__,
            )


def custom_scalars_layout(prefix: str) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: one chart per metric with all layers' curves."""
    p, d = re.escape(prefix), re.escape(detail_prefix(prefix))
    charts = {
        "ERF radius, all layers": rf"^{p}/.*/radius$",
        "ERF radius growth since init": rf"^{p}/.*/radius_growth$",
        "ERF / TRF": rf"^{p}/.*/erf_trf_ratio$",
        "Gaussian R^2": rf"^{p}/.*/gaussian_r2$",
        "border mass (share of the fit outside the input)": rf"^{p}/.*/border_mass$",
        "ERF map correlation with init": rf"^{d}/.*/map_correlation$",
        "high-contribution area ratio @0.5": rf"^{d}/.*/area_ratio@0\.5$",
    }
    return {f"{prefix} (erf-callback)": {k: ["Multiline", [v]] for k, v in charts.items()}}


def add_custom_scalars(loggers: Iterable[Any], prefix: str) -> None:
    for logger in loggers:
        writer = tensorboard_writer(logger)
        if writer is not None and hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(custom_scalars_layout(prefix))


def _hparam_value(v: Any) -> int | float | str | bool:
    if isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return str(v)


def _flat_hparams(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, Mapping):
            out.update(_flat_hparams(value, name))
        else:
            out[name] = _hparam_value(value)
    return out


def log_hparam_metrics(
    loggers: Iterable[Any], metric_tags: Iterable[str], params: Mapping[str, Any] | None = None
) -> bool:
    """Declare ``metric_tags`` (scalars logged during the run) as the run's HParams metrics.

    TensorBoard's HParams tab shows, per run, the hyperparameters of its session and the
    *last* value of each declared metric tag, so declaring the main ERF scalars lets runs
    (plain vs dilated, two learning rates) compare side by side. TensorBoard reads only the
    *first* hparams summary of a run, so this must run before Lightning logs the model's
    hyperparameters (the callback calls it from ``on_fit_start``); it therefore writes those
    hyperparameters itself (``params``, flattened) and keeps Lightning's ``hp_metric``
    declared. Nothing is written as a scalar. Loggers without a ``SummaryWriter`` are left
    alone (their scalars already hold the final values).

    Returns:
        whether a summary was written to at least one logger.
    """
    tags = sorted(set(metric_tags))
    if not tags:
        return False
    from torch.utils.tensorboard.summary import hparams

    written = False
    for logger in loggers:
        writer = tensorboard_writer(logger)
        if writer is None or not hasattr(writer, "_get_file_writer"):
            continue
        flat = _flat_hparams({**dict(getattr(logger, "hparams", None) or {}), **(params or {})})
        # The metric values are read back from the scalar tags; the ones given here are unused.
        exp, ssi, sei = hparams(flat, dict.fromkeys([*tags, "hp_metric"], 0.0))
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        writer.flush()
        written = True
    return written

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
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "ImagePublisher",
    "add_custom_scalars",
    "custom_scalars_layout",
    "finite_scalars",
    "log_scalars",
    "tensorboard_writer",
]

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
    return exp if hasattr(exp, "add_image") and hasattr(exp, "add_scalar") else None


class ImagePublisher:
    """Logs images to every logger that can take them; tells once about the others."""

    def __init__(self) -> None:
        self._told: set[int] = set()

    def publish(self, loggers: Iterable[Any], images: Mapping[str, np.ndarray], step: int) -> None:
        if not images:
            return
        for logger in loggers:
            writer = tensorboard_writer(logger)
            if writer is not None:
                for tag, img in images.items():
                    writer.add_image(tag, img, step, dataformats="HWC")
            elif callable(getattr(logger, "log_image", None)):
                for tag, img in images.items():
                    logger.log_image(key=tag, images=[img], step=step)
            elif id(logger) not in self._told:
                self._told.add(id(logger))
                log.info(
                    "erf-callback: %s cannot store images; it gets the ERF scalars only. Add a "
                    "TensorBoardLogger (or WandbLogger) to see heatmaps.",
                    type(logger).__name__,
                )


def custom_scalars_layout(prefix: str) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: one chart per metric with all layers' curves."""
    p = re.escape(prefix)
    charts = {
        "ERF radius, all layers": rf"^{p}/.*/radius$",
        "ERF radius growth since init": rf"^{p}/.*/radius_growth$",
        "ERF / TRF": rf"^{p}/.*/erf_trf_ratio$",
        "Gaussian R^2": rf"^{p}/.*/gaussian_r2$",
        "ERF map correlation with init": rf"^{p}/.*/map_correlation$",
        "high-contribution area ratio @0.5": rf"^{p}/.*/area_ratio@0\.5$",
    }
    return {f"{prefix} (erf-callback)": {k: ["Multiline", [v]] for k, v in charts.items()}}


def add_custom_scalars(loggers: Iterable[Any], prefix: str) -> None:
    for logger in loggers:
        writer = tensorboard_writer(logger)
        if writer is not None and hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(custom_scalars_layout(prefix))

"""Publishing: scalars to every logger, images to those that take them, the chart layout."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from erf_callback import compute_erf
from erf_callback.callback.history import CHANGE_METRICS
from erf_callback.callback.publish import (
    ImagePublisher,
    add_custom_scalars,
    custom_scalars_layout,
    finite_scalars,
    log_scalars,
    scalar_tags,
    tensorboard_writer,
)
from tests.helpers.nets import uniform_stack


class FakeWriter:
    """The SummaryWriter methods the publisher uses, recording calls."""

    def __init__(self) -> None:
        self.images: list[tuple[str, tuple[int, ...], int, str]] = []
        self.layouts: list[dict] = []

    def add_scalar(self, *args: Any) -> None:  # pragma: no cover - presence is what counts
        raise AssertionError("scalars go through log_metrics")

    def add_image(self, tag: str, img: np.ndarray, step: int, dataformats: str) -> None:
        self.images.append((tag, img.shape, step, dataformats))

    def add_custom_scalars(self, layout: dict) -> None:
        self.layouts.append(layout)


class RecordingLogger:
    """``log_metrics`` as every Lightning logger has it, recording calls."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((step, dict(metrics)))


class FakeTensorBoard(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self.experiment = FakeWriter()


class FakeWandb(RecordingLogger):
    """The two WandbLogger methods the callback uses."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[int | None, str, tuple[int, ...]]] = []

    def log_image(self, key: str, images: list, step: int | None = None) -> None:
        assert isinstance(images, list) and images[0].dtype == np.uint8
        self.images.append((step, key, images[0].shape))


class FakeCsv(RecordingLogger):
    """Scalars only (like CSVLogger): its experiment cannot take images."""

    experiment = object()


class OfflineLogger(RecordingLogger):
    """A logger whose lazily built experiment fails (e.g. W&B offline)."""

    @property
    def experiment(self) -> Any:
        raise RuntimeError("no network")


IMAGES = {
    "erf/a/heatmap": np.zeros((6, 4, 3), dtype=np.uint8),
    "erf/a/radial_profile": np.zeros((5, 7, 3), dtype=np.uint8),
}


def test_finite_scalars_drop_nan_and_inf_only() -> None:
    got = finite_scalars({"a": 1, "b": math.nan, "c": math.inf, "d": -math.inf, "e": 0.0})
    assert got == {"a": 1.0, "e": 0.0} and type(got["a"]) is float


def test_scalars_reach_every_logger_with_the_step() -> None:
    loggers = [FakeTensorBoard(), FakeWandb(), FakeCsv()]
    log_scalars(loggers, {"erf/a/radius": 2.0, "erf/a/trf_x": math.inf}, step=3)
    for logger in loggers:
        assert logger.metrics == [(3, {"erf/a/radius": 2.0})]  # non-finite stays out of charts
    log_scalars(loggers, {"erf/a/radius": math.nan}, step=4)
    assert all(len(logger.metrics) == 1 for logger in loggers)  # nothing left: no call


def test_tensorboard_writer_is_found_by_its_methods() -> None:
    tb = FakeTensorBoard()
    assert tensorboard_writer(tb) is tb.experiment
    assert tensorboard_writer(FakeCsv()) is None
    assert tensorboard_writer(FakeWandb()) is None  # no experiment attribute at all
    assert tensorboard_writer(OfflineLogger()) is None  # a failing experiment is not fatal


def test_images_go_to_tensorboard_and_wandb_loggers() -> None:
    tb, wandb = FakeTensorBoard(), FakeWandb()
    ImagePublisher().publish([tb, wandb], IMAGES, step=7)
    assert tb.experiment.images == [
        ("erf/a/heatmap", (6, 4, 3), 7, "HWC"),
        ("erf/a/radial_profile", (5, 7, 3), 7, "HWC"),
    ]
    assert wandb.images == [(7, "erf/a/heatmap", (6, 4, 3)), (7, "erf/a/radial_profile", (5, 7, 3))]
    ImagePublisher().publish([tb, wandb], {}, step=8)  # no images: no calls
    assert len(tb.experiment.images) == 2 and len(wandb.images) == 2


class AnswersEverything(RecordingLogger):
    """Like Lightning's DummyLogger (fast_dev_run): every attribute exists, nothing is kept."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_which_loggers_take_images_is_asked_before_rendering(caplog) -> None:
    # A run whose loggers cannot store images renders none (the slowest part of a probe);
    # each such logger is told once, whether or not images were made.
    publisher = ImagePublisher()
    tb, first_csv, wandb = FakeTensorBoard(), FakeCsv(), FakeWandb()
    csv, offline, dummy = FakeCsv(), OfflineLogger(), AnswersEverything()
    with caplog.at_level(logging.INFO, logger="erf_callback"):
        assert publisher.any_takes_images([tb, first_csv])
        assert publisher.any_takes_images([wandb])
        for _ in range(2):
            assert not publisher.any_takes_images([csv, offline, dummy])
        assert not publisher.any_takes_images([])
        publisher.publish([csv], IMAGES, step=1)  # told already: not again
    told = [r.getMessage() for r in caplog.records if "cannot store images" in r.message]
    assert [m.split()[1] for m in told] == [
        "FakeCsv",
        "FakeCsv",
        "OfflineLogger",
        "AnswersEverything",
    ]


def test_a_logger_without_images_gets_one_info_message(caplog) -> None:
    csv, offline = FakeCsv(), OfflineLogger()
    publisher = ImagePublisher()
    with caplog.at_level(logging.INFO, logger="erf_callback"):
        for step in range(3):
            publisher.publish([csv, offline], IMAGES, step)
    messages = [r.getMessage() for r in caplog.records if "cannot store images" in r.message]
    assert len(messages) == 2  # once per logger, not once per probe
    assert messages[0].startswith("erf-callback: FakeCsv cannot store images")
    assert "OfflineLogger" in messages[1] and "TensorBoardLogger" in messages[1]


def test_images_read_back_from_a_real_summary_writer(tmp_path) -> None:
    class RealTensorBoard:
        def __init__(self) -> None:
            self.experiment = SummaryWriter(str(tmp_path))

    logger = RealTensorBoard()
    img = np.zeros((12, 20, 3), dtype=np.uint8)
    img[:, :10] = 255
    ImagePublisher().publish([logger], {"erf/a/heatmap": img}, step=5)
    add_custom_scalars([logger, FakeCsv()], "erf")
    logger.experiment.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    (event,) = acc.Images("erf/a/heatmap")
    assert (event.step, event.width, event.height) == (5, 20, 12)
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_custom_scalars_are_added_once_per_tensorboard_writer() -> None:
    tb, csv = FakeTensorBoard(), FakeCsv()
    add_custom_scalars([tb, csv, FakeWandb()], "erf2")
    assert tb.experiment.layouts == [custom_scalars_layout("erf2")]


CHARTS = {
    "radius": "ERF radius, all layers",
    "radius_growth": "ERF radius growth since init",
    "erf_trf_ratio": "ERF / TRF",
    "gaussian_r2": "Gaussian R^2",
    "map_correlation": "ERF map correlation with init",
    "area_ratio@0.5": "high-contribution area ratio @0.5",
    "border_mass": "border mass (share of the fit outside the input)",
}


def charts_matching(layout: dict, tag: str) -> list[str]:
    (category,) = layout.values()
    return [
        name
        for name, (kind, patterns) in category.items()
        if kind == "Multiline" and any(re.search(p, tag) for p in patterns)
    ]


@pytest.mark.parametrize("prefix", ["erf", "erf.v2+x"])
def test_each_metric_tag_lands_in_its_own_chart_only(prefix) -> None:
    # Every tag the callback logs: the keys of a real ERFMap's metrics plus the changes.
    m = compute_erf(uniform_stack([3]), torch.randn(1, 1, 12, 12))["output"]
    names = [*m.metrics(), *CHANGE_METRICS, "center_y", "center_x"]
    layout = custom_scalars_layout(prefix)
    assert list(layout) == [f"{prefix} (erf-callback)"]
    for layer in ("layer1", "backbone.stages.2", "net.7"):
        for name in names:
            expected = [CHARTS[name]] if name in CHARTS else []
            # the tag the callback logs: the main prefix or the detail one
            (tag,) = scalar_tags(prefix, layer, {name: 0.0})
            assert charts_matching(layout, tag) == expected, name


@pytest.mark.parametrize(
    "tag",
    [
        "erf2/layer1/radius",  # another monitor's prefix
        "xerf/layer1/radius",
        "erf/radius",  # no layer
        "erf/layer1/area_ratio@0x5",  # the dot is literal
        "erf/layer1/area_ratio@0.55",
        "erf/layer1/radius/extra",
    ],
)
def test_layout_regexes_reject_foreign_tags(tag) -> None:
    assert charts_matching(custom_scalars_layout("erf"), tag) == []

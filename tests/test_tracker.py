"""ERFTracker: the callback's probing for a plain PyTorch loop (no Lightning)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from erf_callback import ERFTracker, ERFWarning
from erf_callback.callback.schedule import AUTO_WARMUP_STEPS
from tests.helpers.nets import relu_stack, stack_closed_form, uniform_stack

KERNELS = [3, 3, 5]


def events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def train(model: torch.nn.Module, steps: int, tracker: ERFTracker | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 1, 16, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step()


def test_tags_schedule_history_and_closed_form(tmp_path):
    net = uniform_stack(KERNELS)
    writer = SummaryWriter(str(tmp_path / "run"))
    with ERFTracker(net, ["1", "2"], torch.rand(4, 1, 33, 33), writer, every_n_steps=3) as t:
        for _ in range(7):  # all-one weights cannot be trained; the schedule is what counts
            t.step()
    writer.close()
    acc = events(str(tmp_path / "run"))
    for layer in ("1", "2"):
        # init (construction), every 3 steps, once more at close
        assert [e.step for e in acc.Scalars(f"erf/{layer}/radius")] == [0, 3, 6, 7]
        for suffix in ("heatmap", "heatmap_log", "radial_profile"):
            assert len(acc.Images(f"erf/{layer}/{suffix}")) == 4
        assert len(acc.Images(f"erf/{layer}/evolution")) == 3  # from the second probe on
    history = pd.read_csv(tmp_path / "run" / "erf_history.csv", dtype={"layer": str})
    assert history["step"].tolist() == [0, 0, 3, 3, 6, 6, 7, 7]
    with open(tmp_path / "run" / "erf_history.json") as f:
        assert len(json.load(f)["maps"]["2"]) == 4
    # The step-0 record is the untrained uniform stack: per-axis variance n(k^2-1)/12 and
    # TRF 1 + sum(k-1) (closed form; the moment fit reproduces it to ~1e-9 relative).
    form = stack_closed_form(KERNELS)[0]
    var, trf = form.variance, form.trf
    first = history[(history["layer"] == "2") & (history["step"] == 0)].iloc[0]
    assert first["sigma_x"] ** 2 == pytest.approx(var, rel=1e-6)
    assert first["trf_x"] == trf
    assert first["radius_growth"] == 1.0


def test_training_is_bitwise_identical_with_and_without_tracker():
    torch.manual_seed(0)
    a = relu_stack(3)
    b = relu_stack(3)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    train(a, 6)
    torch.manual_seed(5)
    tracker = ERFTracker(b, ["4"], torch.randn(4, 1, 16, 16), every_n_steps=3)
    train(b, 6, tracker)
    tracker.close()
    assert [r["step"] for r in tracker.history.records] == [0, 3, 6]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_rng_stream_and_modes_are_untouched():
    net = relu_stack(2)
    net.train()
    inputs = torch.randn(2, 1, 12, 12)
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    ERFTracker(net, ["2"], inputs, every_n_steps=1).step()
    assert torch.equal(torch.rand(5), expected)
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def test_unknown_layer_fails_at_construction_with_closest_names():
    with pytest.raises(KeyError, match=r"No layer named 'layer_2'.*'2'"):
        ERFTracker(relu_stack(2), ["layer_2"], torch.randn(2, 1, 12, 12))


def test_failing_probe_mid_training_is_skipped_with_one_warning():
    net = relu_stack(2)
    tracker = ERFTracker(net, ["2"], torch.randn(2, 1, 12, 12), every_n_steps=1)
    net[0] = torch.nn.Conv2d(3, 8, 3, padding=1)  # wants 3 channels: every probe fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [tracker.step() for _ in range(3)]
    assert results == [[], [], []]
    skipped = [w for w in caught if issubclass(w.category, ERFWarning)]
    assert len(skipped) == 1
    assert "skipped" in str(skipped[0].message)
    assert [r["step"] for r in tracker.history.records] == [0]


def test_nan_map_is_recorded_as_skipped():
    net = relu_stack(2)
    tracker = ERFTracker(net, ["2"], torch.randn(2, 1, 12, 12), every_n_steps=1)
    with torch.no_grad():
        net[0].weight.fill_(float("nan"))
    with pytest.warns(ERFWarning, match="NaN/Inf"):
        tracker.step()
    assert [r["status"] for r in tracker.history.records] == ["ok", "nonfinite"]
    assert math.isnan(tracker.history.records[1]["radius_growth"])


def test_automatic_interval_waits_for_warmup_and_probes_follow_it():
    net = relu_stack(2)
    tracker = ERFTracker(net, ["2"], torch.randn(2, 1, 12, 12), max_overhead=0.9)
    for _ in range(40):
        time.sleep(0.02)  # a "training step" long enough for the interval to be small
        tracker.step()
    interval = tracker.schedule.auto_interval
    assert interval is not None and interval >= 1
    steps = [r["step"] for r in tracker.history.records]
    # the next probe is placed after the last one, by the interval chosen at that probe
    assert tracker.schedule.next_auto_step is not None
    assert tracker.schedule.next_auto_step > steps[-1]
    # init, then nothing until the warm-up steps are timed (how many probes follow depends on
    # the machine's speed: the interval is measured, not fixed)
    assert steps[0] == 0
    assert all(s >= AUTO_WARMUP_STEPS for s in steps[1:])


def test_state_dict_round_trip_resumes_the_history(tmp_path):
    net = relu_stack(2)
    tracker = ERFTracker(net, ["2"], torch.randn(2, 1, 12, 12), every_n_steps=2)
    for _ in range(2):
        tracker.step()
    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    assert len(tracker.history) == 2  # steps 0 and 2
    resumed = ERFTracker(net, ["2"], torch.zeros(1, 1, 4, 4), every_n_steps=2, probe_at_init=False)
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    assert torch.equal(resumed.inputs, tracker.inputs)
    for _ in range(2):
        resumed.step()
    assert [r["step"] for r in resumed.history.records] == [0, 2, 4]
    # change metrics are measured against the restored init record
    assert resumed.history.records[-1]["radius_growth"] == pytest.approx(
        resumed.history.records[-1]["radius"] / resumed.history.records[0]["radius"]
    )


def test_no_writer_writes_files_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = ERFTracker(relu_stack(2), ["2"], torch.randn(2, 1, 12, 12), every_n_steps=1)
    tracker.step()
    tracker.close()
    assert tracker.history_dir is None
    assert len(tracker.history) == 2  # kept in memory
    assert os.listdir(tmp_path) == []  # and nowhere else
    tracker = ERFTracker(
        relu_stack(2), ["2"], torch.randn(2, 1, 12, 12), history_dir=tmp_path / "h"
    )
    tracker.close()
    assert sorted(os.listdir(tmp_path / "h")) == ["erf_history.csv", "erf_history.json"]


def test_engine_only_users_do_not_import_lightning():
    # The tracker is exported from erf_callback; importing it must not pull Lightning in.
    code = (
        "import sys, erf_callback; "
        "print('lightning' in sys.modules or 'pytorch_lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_model_that_is_no_module_is_named_at_construction():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got function"):
        ERFTracker(lambda x: x, ["1"], torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, True, "3", torch.tensor(2.0)])
def test_a_step_that_is_not_a_count_is_refused(bad):
    # 1.5 was truncated to step 1 and -1 recorded as a probe at step -1.
    tracker = ERFTracker(relu_stack(2), ["2"], torch.randn(2, 1, 12, 12), every_n_steps=1)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        tracker.step(step=bad)
    assert [r["step"] for r in tracker.history.records] == [0]


def test_a_step_count_in_a_tensor_is_that_count():
    tracker = ERFTracker(relu_stack(2), ["2"], torch.randn(2, 1, 12, 12), every_n_steps=2)
    assert tracker.step(step=torch.tensor(2)) and tracker.global_step == 2
    assert tracker.step(step=torch.tensor(3)) == []


def test_steps_going_back_warn_once_and_steps_after_close_do_nothing():
    # A per-epoch batch index passed as the step restarts at every epoch: one warning says so.
    tracker = ERFTracker(relu_stack(2), ["2"], torch.randn(2, 1, 12, 12), every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(3):
            for step in (1, 2):
                tracker.step(step=step, epoch=epoch)
    back = [w for w in caught if "the step count went back" in str(w.message)]
    assert len(back) == 1 and issubclass(back[0].category, ERFWarning)
    tracker.close()
    probes = tracker.history.num_probes
    with pytest.warns(ERFWarning, match=r"step\(\) after close\(\): nothing is probed"):
        assert tracker.step() == []
    assert tracker.history.num_probes == probes

"""Each monitor and each run has history files of its own; clashes are errors at fit start."""

import os

import pandas as pd
import pytest
import torch

from erf_callback import ERFMonitor
from tests.helpers.lit import make_trainer, module_class


def steps_in(path: str) -> list[int]:
    return sorted(set(pd.read_csv(path).step))


def test_two_monitors_keep_their_own_history_files(tmp_path):
    a = ERFMonitor(layers=["net.2"], every_n_steps=2, num_samples=8)
    b = ERFMonitor(layers=["net.7"], every_n_steps=3, num_samples=8)
    trainer = make_trainer(tmp_path, [a, b], max_steps=4)
    trainer.fit(module_class()())
    log_dir = trainer.logger.log_dir
    files = sorted(f for f in os.listdir(log_dir) if f.endswith(".csv"))
    assert files == ["erf_history-erf-net.2.csv", "erf_history-erf-net.7.csv"]
    for monitor, layer, steps in ((a, "net.2", [0, 2, 4]), (b, "net.7", [0, 3, 4])):
        assert monitor.history_files[0] == os.path.join(log_dir, f"erf_history-erf-{layer}.csv")
        frame = pd.read_csv(monitor.history_files[0])
        assert set(frame.layer) == {layer} and list(frame.step) == steps


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"layers": ["net.7"], "history_filename": "h"}, "same history files 'h.csv"),
        ({"layers": ["net.2", "net.7"], "history_filename": "g"}, "same tags 'erf/net.2/"),
        ({"layers": None, "history_filename": "g", "module": "net"}, None),  # no clash
    ],
)
def test_clashing_monitors_fail_at_fit_start(tmp_path, second, match):
    first = ERFMonitor(layers=["net.2"], num_samples=8, history_filename="h")
    model = module_class()()
    trainer = make_trainer(tmp_path, [first, ERFMonitor(num_samples=8, **second)], max_steps=1)
    if match is None:
        trainer.fit(model)
        assert model.training_steps == 1
        return
    with pytest.raises(ValueError, match=match):
        trainer.fit(model)
    assert model.training_steps == 0


def test_two_default_monitors_clash_on_the_resolved_layer(tmp_path):
    # The second probes the deepest layer, found only at the first batch: the first's layer.
    # (Two monitors with layers=None, tag_prefix and module alike share a state_key, which
    # Lightning itself refuses.)
    monitors = [ERFMonitor(layers=["net.7"], num_samples=8), ERFMonitor(num_samples=8)]
    model = module_class()()
    with pytest.raises(ValueError, match=r"same tags 'erf/net\.7/"):
        make_trainer(tmp_path, monitors, max_steps=1).fit(model)
    assert model.training_steps == 0


@pytest.mark.parametrize("logger", [False, "csv_without_version"])
def test_runs_sharing_a_directory_never_overwrite_each_other(tmp_path, logger):
    def run(max_steps: int) -> ERFMonitor:
        monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
        kwargs = {"logger": False}
        if logger == "csv_without_version":  # a fixed version: both runs share log_dir
            from pytorch_lightning.loggers import CSVLogger

            kwargs["logger"] = CSVLogger(str(tmp_path), name="", version="")
        make_trainer(tmp_path, [monitor], max_steps=max_steps, **kwargs).fit(module_class()())
        return monitor

    first = run(2)
    second = run(3)
    found = sorted(f for f in os.listdir(tmp_path) if f.startswith("erf_history"))
    assert found == [
        "erf_history-v1.csv",
        "erf_history-v1.json",
        "erf_history.csv",
        "erf_history.json",
    ]
    assert steps_in(str(tmp_path / "erf_history.csv")) == [0, 2]  # the first run's, intact
    assert first.history_files != second.history_files
    assert os.path.basename(first.history_files[0]) == "erf_history.csv"
    assert os.path.basename(second.history_files[0]) == "erf_history-v1.csv"
    assert steps_in(first.history_files[0]) == [0, 2]  # untouched by the second run
    assert steps_in(second.history_files[0]) == [0, 2, 3]


def test_wandb_history_travels_with_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dirs = []
    for max_steps in (2, 3):
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="erf")
        monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
        make_trainer(tmp_path, [monitor], max_steps=max_steps, logger=logger).fit(module_class()())
        run_dir = logger.experiment.dir
        logger.experiment.finish()
        assert os.path.exists(os.path.join(run_dir, "erf_history.json"))
        assert monitor.history_files[0] == os.path.join(run_dir, "erf_history.csv")
        run_dirs.append(run_dir)
    assert run_dirs[0] != run_dirs[1]
    assert steps_in(os.path.join(run_dirs[0], "erf_history.csv")) == [0, 2]
    assert steps_in(os.path.join(run_dirs[1], "erf_history.csv")) == [0, 2, 3]
    assert not os.path.exists(os.path.join(str(tmp_path), "erf_history.csv"))


def test_a_claimed_name_is_given_back_when_the_first_write_fails(tmp_path, monkeypatch):
    from erf_callback.callback import history as history_module
    from erf_callback.callback.history import ERFHistory, claim_history_files

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history_module, "open", no_space, raising=False)  # PATCHED open
    with pytest.raises(OSError, match="No space"):
        claim_history_files(str(tmp_path), "erf_history", ERFHistory())
    assert os.listdir(tmp_path) == []  # no empty CSV, no temp file


def test_a_history_filename_with_an_extension_names_both_files(tmp_path):
    # history_filename="run.csv" wrote run.csv.csv and run.csv.json.
    from erf_callback import ERFTracker
    from tests.helpers.nets import relu_stack

    tracker = ERFTracker(
        relu_stack(2),
        ["2"],
        torch.randn(2, 1, 8, 8),
        history_dir=str(tmp_path),
        history_filename="run.csv",
    )
    tracker.close()
    assert sorted(os.listdir(tmp_path)) == ["run.csv", "run.json"]
    assert len(pd.read_csv(tmp_path / "run.csv")) == tracker.history.num_probes

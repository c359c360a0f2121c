"""Faults around probing never end training: full or read-only disks, failing loggers and
renderers, out of memory, divergence, bad configurations on resume and in fast_dev_run,
label-first batches.

Disk faults are real where the machine allows: a 1 MiB tmpfs filled up, and a read-only bind
mount (both need root and ``mount``; those tests skip cleanly otherwise). One variant with a
patched ``open`` (marked as such) runs everywhere.
"""

import contextlib
import gc
import glob
import json
import os
import subprocess
import warnings
import weakref

import pandas as pd
import pytest
import torch

from erf_callback import ERFMonitor, ERFWarning
from erf_callback.callback import history as history_module
from tests.helpers.lit import make_trainer, module_class, trainer_class

# ---- helpers ---------------------------------------------------------------------------------


def fit(tmp_path, monitor, model=None, **kwargs):
    model = model or module_class()()
    trainer = make_trainer(
        tmp_path, [monitor] if isinstance(monitor, ERFMonitor) else monitor, **kwargs
    )
    trainer.fit(model)
    return trainer, model


def erf_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ERFWarning)]


def on_disk(directory: str, basename: str = "erf_history") -> tuple[list, list]:
    """(probe, step, layer, status) rows of the CSV and of the JSON, as lists."""
    csv = pd.read_csv(os.path.join(directory, f"{basename}.csv"))
    with open(os.path.join(directory, f"{basename}.json")) as f:
        payload = json.load(f)
    keys = ("probe", "step", "layer", "status")
    from_csv = [tuple(row) for row in csv[list(keys)].itertuples(index=False)]
    from_json = [tuple(r[k] for k in keys) for r in payload["records"]]
    return from_csv, from_json


def in_memory(monitor) -> list:
    return [(r["probe"], r["step"], r["layer"], r["status"]) for r in monitor.history.records]


def temp_files(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "**", "*.tmp"), recursive=True)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def mounted(*cmd: str, target: str):
    """``mount *cmd target``; skips the test where mounting is not possible."""
    try:
        _run("mount", *cmd, target)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount here ({err}); the patched-open variant covers this")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


class DiskFault(module_class()):
    """Calls ``hooks[global_step]()`` at the start of that training step (a disk fault that
    comes or goes mid-run), and checks the files on disk at every step."""

    def __init__(self, hooks, check=None) -> None:
        super().__init__()
        self.hooks, self.check, self.seen = hooks, check, {}

    def training_step(self, batch, batch_idx):
        if self.global_step in self.hooks:
            self.hooks[self.global_step]()
        if self.check is not None:
            self.seen[self.global_step] = self.check()
        return super().training_step(batch, batch_idx)


# ---- 1. disk full / read-only / failing loggers ------------------------------------------------


def test_full_disk_never_ends_training_and_the_files_catch_up(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=str(full)):
        filler = full / "filler"

        def fill() -> None:
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                f.write(b"\0" * (8 << 20))  # ENOSPC once the 1 MiB is used

        def check():
            return on_disk(str(full))

        model = DiskFault({3: fill, 6: filler.unlink}, check=check)
        monitor = ERFMonitor(layers=["net.2", "net.7"], every_n_steps=1, num_samples=8)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(full, monitor, model=model, logger=False, max_steps=8)
        assert model.training_steps == 8
        said = [m for m in erf_warnings(record) if "writing the ERF history" in m]
        assert len(said) == 1, said  # once, naming the directory and the error
        assert str(full) in said[0] and "No space left on device" in said[0]
        # While the disk was full the files stayed at the last good write, consistent.
        for step, (from_csv, from_json) in model.seen.items():
            assert from_csv == from_json, step
        assert model.seen[3] == model.seen[4] == model.seen[5] == model.seen[6]
        assert [row[1] for row in model.seen[6][0]] == [0, 0, 1, 1, 2, 2, 3, 3]
        # Afterwards everything probed meanwhile is on disk; nothing left behind.
        from_csv, from_json = on_disk(str(full))
        assert from_csv == from_json == in_memory(monitor)
        assert [r[1] for r in in_memory(monitor)][::2] == list(range(9))  # steps 0..8
        assert temp_files(str(full)) == []
        assert len(monitor.state_dict()["history"]["records"]) == 18


def test_read_only_directory_never_ends_training(tmp_path):
    src, logs = tmp_path / "src", tmp_path / "logs"
    src.mkdir()
    logs.mkdir()
    with mounted("--bind", str(src), target=str(logs)):

        def remount(mode: str):
            return lambda: _run("mount", "-o", f"remount,bind,{mode}", str(logs))

        model = DiskFault({2: remount("ro"), 5: remount("rw")}, check=lambda: on_disk(str(logs)))
        monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(logs, monitor, model=model, logger=False, max_steps=7)
        assert model.training_steps == 7
        said = [m for m in erf_warnings(record) if "writing the ERF history" in m]
        assert len(said) == 1 and "Read-only file system" in said[0] and str(logs) in said[0]
        assert all(a == b for a, b in model.seen.values())
        assert on_disk(str(logs))[0] == on_disk(str(logs))[1] == in_memory(monitor)
        assert len(in_memory(monitor)) == 8 and temp_files(str(logs)) == []


def test_unwritable_from_the_start_patched_open(tmp_path, monkeypatch):
    """PATCHED ``open`` (runs everywhere): the history module's ``open`` fails with EROFS
    until step 3, so even taking the file names at train start fails."""
    failing = {"on": True}
    real_open = open

    def fake_open(path, *args, **kwargs):
        if failing["on"]:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(history_module, "open", fake_open, raising=False)

    def heal() -> None:
        failing["on"] = False

    model = DiskFault({3: heal})
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, monitor, model=model, max_steps=5)
    assert model.training_steps == 5
    said = [m for m in erf_warnings(record) if "writing the ERF history" in m]
    assert len(said) == 1 and "Read-only file system" in said[0]
    log_dir = trainer.logger.log_dir
    assert on_disk(log_dir)[0] == on_disk(log_dir)[1] == in_memory(monitor)
    assert [r[1] for r in in_memory(monitor)] == [0, 2, 4, 5]
    assert temp_files(str(tmp_path)) == [] and monitor.history_files[0].startswith(log_dir)


def test_failing_loggers_and_renderer_never_end_training(tmp_path, monkeypatch):
    _, loggers = trainer_class()

    class Broken(loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("erf/") for k in metrics):
                raise ConnectionError("tracking server unreachable")
            super().log_metrics(metrics, step)

    tb = loggers.TensorBoardLogger(str(tmp_path), name="tb")
    broken = Broken(str(tmp_path), name="broken")

    def no_images(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb.experiment, "add_image", no_images)
    monkeypatch.setattr(tb.experiment, "add_custom_scalars", no_images)
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    model = module_class()()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, model=model, logger=[tb, broken], max_steps=4)
    assert model.training_steps == 4
    said = erf_warnings(record)
    assert sum("Broken" in m and "ConnectionError" in m for m in said) == 1
    assert sum("images to TensorBoardLogger" in m for m in said) == 1
    assert sum("chart layout to TensorBoardLogger" in m for m in said) == 1
    # the TensorBoard logger still got its scalars, the history is complete
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("erf/net.7/radius")] == [0, 2, 4]

    # A renderer that fails (e.g. a broken matplotlib backend): scalars and history go on.
    from erf_callback.callback.images import ProbeImages

    def bad_render(*args, **kwargs):
        raise RuntimeError("no font cache")

    monkeypatch.setattr(ProbeImages, "render", bad_render)
    again = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    with pytest.warns(ERFWarning, match="rendering the ERF images at step 0 failed"):
        trainer, _ = fit(tmp_path, again, max_steps=2)
    assert [r[1] for r in on_disk(trainer.logger.log_dir)[0]] == [0, 2]


# ---- 3, 4. the fit-start check on resume and under fast_dev_run ---------------------------------


def test_resume_runs_the_fit_start_check_without_a_new_entry(tmp_path):
    first = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    make_trainer(tmp_path, [first], max_steps=4, enable_checkpointing=True).fit(module_class()())
    ckpt = glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)[0]
    assert [r["step"] for r in first.history.records] == [0, 2, 4]

    bad = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8, channels=[99])
    assert bad.state_key == first.state_key  # it finds the first run's state
    model = module_class()()
    with pytest.raises(ValueError, match="99"):
        make_trainer(tmp_path, [bad], max_steps=8).fit(model, ckpt_path=ckpt)
    assert model.training_steps == 0

    # A good resume: the check probes at step 4, which was already probed: no second entry.
    good = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    make_trainer(tmp_path, [good], max_steps=6).fit(module_class()(), ckpt_path=ckpt)
    assert [r["step"] for r in good.history.records] == [0, 2, 4, 6]
    assert len(good.probe_seconds) == 1  # the check is not counted as a recorded probe


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": ["net.10"]}, ValueError, "outputs shape"),  # a non-spatial layer
        ({"layers": ["net.7"], "channels": [8]}, ValueError, "8"),
        ({"layers": ["net.7"], "input_key": "image"}, ValueError, "input_key='image'"),
    ],
)
def test_fast_dev_run_checks_the_configuration(tmp_path, kwargs, error, match):
    model = module_class()()
    with pytest.raises(error, match=match):
        fit(tmp_path, ERFMonitor(num_samples=4, **kwargs), model=model, fast_dev_run=2, logger=None)
    assert model.training_steps == 0


def test_fast_dev_run_probes_dry_and_logs_nothing(tmp_path):
    monitor = ERFMonitor(num_samples=4, every_n_steps=1)
    fit(tmp_path, monitor, fast_dev_run=2, logger=None)
    assert monitor.layers == ["net.7"]  # the default layer was resolved
    assert monitor.probe_inputs.shape == (4, 3, 16, 16)  # the inputs were captured
    assert len(monitor.history) == 0 and monitor.history_files is None
    assert glob.glob(os.path.join(str(tmp_path), "**", "erf_history*"), recursive=True) == []


@pytest.mark.parametrize("logger", [None, True])
def test_fast_dev_run_with_named_layers_warns_nothing(tmp_path, logger):
    monitor = ERFMonitor(layers=["net.7"], num_samples=4, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, fast_dev_run=2, logger=logger)
    # fast_dev_run's DummyLogger answers every attribute: it is no SummaryWriter (taken for
    # one, the HParams declaration warned "TypeError: 'function' object is not iterable").
    assert [str(w.message) for w in caught if issubclass(w.category, ERFWarning)] == []


# ---- 5. label-first batches --------------------------------------------------------------------


def _label_first(kind: str):
    class LabelFirst(module_class()):
        def training_step(self, batch, batch_idx):
            images, labels = (batch["image"], batch["label"]) if kind == "dict" else batch[::-1]
            return super().training_step((images, labels), batch_idx)

        def train_dataloader(self):
            def collate(items):
                x, y = torch.utils.data.default_collate(items)
                return {"label": y, "image": x} if kind == "dict" else (y, x)

            return torch.utils.data.DataLoader(
                module_class()().train_dataloader().dataset, batch_size=8, collate_fn=collate
            )

    return LabelFirst


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_label_first_batches_find_the_images(tmp_path, kind):
    monitor = ERFMonitor(layers=["net.7"], num_samples=8, every_n_steps=2)
    fit(tmp_path, monitor, model=_label_first(kind)(), max_steps=2)
    assert monitor.probe_inputs.shape == (8, 3, 16, 16)
    assert [r["status"] for r in monitor.history.records] == ["ok", "ok"]


def test_a_batch_without_images_names_what_it_holds(tmp_path):
    class NoImages(module_class()):
        def train_dataloader(self):
            def collate(items):
                x, y = torch.utils.data.default_collate(items)
                return {"label": y, "features": x.flatten(1), "name": "batch"}

            return torch.utils.data.DataLoader(
                module_class()().train_dataloader().dataset, batch_size=8, collate_fn=collate
            )

    model = NoImages()
    with pytest.raises(ValueError, match="input_key=") as info:
        fit(tmp_path, ERFMonitor(layers=["net.7"], num_samples=8), model=model)
    message = str(info.value)
    assert "['label']: Tensor (8,) int64" in message
    assert "['features']: Tensor (8, 768) float32" in message
    assert "['name']: str" in message
    assert model.training_steps == 0


# ---- 6. out of memory ------------------------------------------------------------------------


def test_out_of_memory_in_a_probe_is_skipped_and_freed(tmp_path, monkeypatch):
    """A fake OOM on CPU, raised from the probe's forward after it allocated a buffer that
    only a garbage collection frees (it sits in a reference cycle with the traceback)."""
    freed: list[str] = []
    import erf_callback.callback.guarded as guarded

    monkeypatch.setattr(guarded, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(guarded, "_empty_cuda_cache", lambda: freed.append("cache"))
    buffers: list[weakref.ref] = []

    class Hungry(module_class()):
        def forward(self, x):
            if self.global_step in (0, 2):  # only the probe calls forward
                buffer = torch.empty(1 << 20)
                buffers.append(weakref.ref(buffer))
                err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")
                err.held = [buffer, err]  # a cycle: freed by gc, not by reference counts
                raise err
            return super().forward(x)

        def training_step(self, batch, batch_idx):
            if buffers:  # the next step after an OOM probe: the probe's buffer is gone
                self.seen_alive = [ref() is not None for ref in buffers]
            return super().training_step(batch, batch_idx)

    model = Hungry()
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    gc.disable()  # only an explicit collection frees the cycle
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(tmp_path, monitor, model=model, max_steps=4)
    finally:
        gc.enable()
    assert model.training_steps == 4  # even the OOM at the fit-start probe did not end it
    said = [m for m in erf_warnings(record) if "out of memory" in m]
    assert len(said) == 1 and "Lower chunk_size or num_samples" in said[0]
    assert [r["step"] for r in monitor.history.records] == [1, 3, 4]
    # every buffer of both failed probes (the second retried with halved chunks) was freed
    assert len(model.seen_alive) >= 2 and not any(model.seen_alive)
    assert freed == ["cache", "cache"]


# ---- 7. divergence ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nan_loss", "overflow"])
def test_divergence_records_nonfinite_probes_and_training_goes_on(tmp_path, how):
    class Diverging(module_class()):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step < 2:
                return loss
            # "overflow": the gradients overflow to Inf and the weights become NaN/Inf; the
            # probes then see all-zero gradients (NaN fails ReLU's `> 0`), not dead units.
            return loss * (float("nan") if how == "nan_loss" else 1e38)

    torch.manual_seed(0)
    model = Diverging()
    monitor = ERFMonitor(layers=["net.2", "net.7"], every_n_steps=1, num_samples=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, monitor, model=model, max_steps=8)
    assert model.training_steps == 8
    assert not all(torch.isfinite(p).all() for p in model.net.parameters())  # diverged
    rows = pd.read_csv(os.path.join(trainer.logger.log_dir, "erf_history.csv"))
    for layer in ("net.2", "net.7"):
        statuses = list(rows[rows.layer == layer].status)
        assert statuses == ["ok"] * 3 + ["nonfinite"] * 6, (layer, statuses)  # steps 0-8
    said = [m for m in erf_warnings(record) if "NaN/Inf gradients or weights" in m]
    assert len(said) == 2  # once per layer
    # TensorBoard's radius chart is redrawn at the probes without maps (their crosses say the
    # curves stop there), not left at the last probe that had one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    charted = [e.step for e in acc.Images("erf/all_layers/radius")]
    assert charted == list(range(1, 9)), charted


def test_nan_weights_at_fit_start_are_recorded_not_raised(tmp_path):
    model = module_class()()
    with torch.no_grad():
        model.net[3].weight.fill_(float("nan"))
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    with pytest.warns(ERFWarning, match="NaN/Inf"):
        fit(tmp_path, monitor, model=model, max_steps=2)
    assert [r["status"] for r in monitor.history.records] == ["nonfinite", "nonfinite"]


@pytest.mark.parametrize("gather_fails", [False, True])
def test_the_image_gather_of_a_rank_group_is_guarded(tmp_path, monkeypatch, gather_fails):
    # The ranks of a group render shares of the pictures and gather them on rank 0. A group
    # of one rank (so it runs in one process) with a working gather logs every picture; one
    # whose gather raises says so once per kind and loses only the pictures: training,
    # scalars and history go on.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from erf_callback.callback import core
    from erf_callback.callback.distributed import ProbeGroup

    calls: list[int] = []

    def gather(obj):
        calls.append(len(obj))
        if gather_fails:
            raise RuntimeError("connection reset by peer")
        return [obj]

    group = ProbeGroup(0, 1, False, "DDPStrategy", all_reduce=lambda t: t, gather=gather)
    monkeypatch.setattr(core, "probe_group", lambda trainer: group)
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    model = module_class()()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, monitor, model=model, max_steps=4)
    assert model.training_steps == 4
    assert calls == [4, 6, 6]  # one gather per probe (steps 0, 2, 4), every picture in it
    said = [m for m in erf_warnings(record) if "collecting the ERF images" in m]
    assert len(said) == (1 if gather_fails else 0)
    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("erf/net.7/radius")] == [0, 2, 4]
    assert ("erf/net.7/heatmap" in acc.Tags()["images"]) is not gather_fails
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4]

import dataclasses
import glob
import json
import os
import warnings

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from erf_callback import ERFMonitor, ERFWarning, compute_erf
from erf_callback.lightning import ERFMonitor as LightningERFMonitor
from tests.helpers.lit import data, make_trainer, module_class, trainer_class, two_optimiser_class

LAYERS = ["net.2", "net.7"]


def events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def fit(tmp_path, monitor, namespace="pytorch_lightning", model=None, **kwargs):
    model = model or module_class(namespace)()
    trainer = make_trainer(tmp_path, [monitor], namespace, **kwargs)
    trainer.fit(model)
    return trainer, model


def test_tensorboard_scalars_images_and_history(tmp_path):
    monitor = ERFMonitor(layers=LAYERS, every_n_steps=2, num_samples=8)
    trainer, model = fit(tmp_path, monitor)
    acc = events(trainer.logger.log_dir)
    tags = acc.Tags()
    for layer in LAYERS:
        steps = [e.step for e in acc.Scalars(f"erf/{layer}/radius")]
        assert steps == [0, 2, 4, 5]  # init, every 2 optimiser steps, end
        for metric in ("gaussian_r2", "erf_trf_ratio", "border_mass", "radius_growth"):
            assert f"erf/{layer}/{metric}" in tags["scalars"]  # the headline numbers
        for metric in ("sigma_x", "area_ratio@0.5", "trf_y", "map_correlation"):
            assert f"erf_detail/{layer}/{metric}" in tags["scalars"]  # the rest
            assert f"erf/{layer}/{metric}" not in tags["scalars"]
        for kind in ("heatmap", "heatmap_log", "radial_profile"):
            assert [i.step for i in acc.Images(f"erf/{layer}/{kind}")] == [0, 2, 4, 5]
        for kind in ("init_vs_now", "evolution"):  # from the second probe: nothing to compare
            assert [i.step for i in acc.Images(f"erf/{layer}/{kind}")] == [2, 4, 5]
        assert [i.step for i in acc.Images(f"erf/{layer}/heatmap_init")] == [0]
        heat = acc.Images(f"erf/{layer}/heatmap")[-1]
        init = acc.Images(f"erf/{layer}/heatmap_init")[0]
        assert (heat.width, heat.height) == (init.width, init.height)
        assert heat.encoded_image_string != init.encoded_image_string
        profile = acc.Images(f"erf/{layer}/radial_profile")[-1]
        assert (profile.width, profile.height) == (480, 320)
        strip = [i.width for i in acc.Images(f"erf/{layer}/evolution")]
        assert strip == sorted(strip) and strip[0] < strip[-1]  # one more frame per probe
        assert acc.Scalars(f"erf/{layer}/radius_growth")[0].value == 1.0
    assert [i.step for i in acc.Images("erf/all_layers/radius")] == [2, 4, 5]
    assert "custom_scalars__config__" in tags["tensors"]

    # The last probe ran on the final weights: its scalars equal compute_erf now.
    maps = compute_erf(model, monitor.probe_inputs, LAYERS)
    for layer in LAYERS:
        expected = maps[layer].metrics()
        for metric in ("radius", "sigma_y", "trf_x", "area_ratio@0.3"):
            prefix = "erf" if metric == "radius" else "erf_detail"
            logged = acc.Scalars(f"{prefix}/{layer}/{metric}")[-1].value
            assert logged == pytest.approx(expected[metric], rel=1e-5)

    history = pd.read_csv(os.path.join(trainer.logger.log_dir, "erf_history.csv"))
    assert len(history) == 8 and set(history.layer) == set(LAYERS)
    assert list(history[history.layer == "net.7"].step) == [0, 2, 4, 5]
    assert (history.radius_growth[history.step == 0] == 1.0).all()
    with open(os.path.join(trainer.logger.log_dir, "erf_history.json")) as f:
        payload = json.load(f)
    assert len(payload["maps"]["net.7"]) == 4 and len(payload["maps"]["net.7"][0]["map"]) == 16


def test_csv_logger_gets_scalars_and_no_images(tmp_path, caplog, monkeypatch):
    _, loggers = trainer_class()
    csv = loggers.CSVLogger(str(tmp_path), name="csv")
    monitor = ERFMonitor(layers=["net.2"], every_n_steps=2, num_samples=8)
    rendered = []
    monkeypatch.setattr(monitor._renderer, "render", lambda *a, **k: rendered.append(a) or {})
    with caplog.at_level("INFO", logger="erf_callback"):
        _, model = fit(tmp_path, monitor, logger=csv)
    assert rendered == []  # no logger could store a picture: none was drawn
    frame = pd.read_csv(os.path.join(csv.log_dir, "metrics.csv"))
    radius = frame["erf/net.2/radius"].dropna()
    assert list(frame.loc[radius.index, "step"]) == [0, 2, 4, 5]
    # The end probe ran on the final weights: the engine alone gives the same radius.
    expected = compute_erf(model, monitor.probe_inputs, ["net.2"])["net.2"].metrics()["radius"]
    assert radius.iloc[-1] == pytest.approx(expected, rel=1e-5)  # CSV keeps ~7 digits
    assert sum("cannot store images" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning"])
def test_both_namespaces(tmp_path, namespace):
    cls = ERFMonitor if namespace == "pytorch_lightning" else LightningERFMonitor
    monitor = cls(layers=["net.7"], every_n_steps=2, num_samples=8)
    fit(tmp_path, monitor, namespace)
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4, 5]


def test_each_class_belongs_to_its_own_namespace():
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    assert issubclass(ERFMonitor, pl.Callback) and not issubclass(ERFMonitor, lp.Callback)
    assert issubclass(LightningERFMonitor, lp.Callback)
    assert not issubclass(LightningERFMonitor, pl.Callback)


def test_probing_never_changes_training(tmp_path):
    class DrawsInForward(module_class()):
        """The probe's forward draws random numbers (eval mode included); training uses
        dropout, so any RNG the probe consumed would change the training losses."""

        def forward(self, x):
            return super().forward(x + 0 * torch.rand_like(x))

    def run(callbacks):
        torch.manual_seed(123)
        model = DrawsInForward()
        _, loggers = trainer_class()
        csv = loggers.CSVLogger(str(tmp_path), name=f"run{len(callbacks)}")
        trainer = make_trainer(tmp_path, callbacks, logger=csv, max_steps=12)
        trainer.fit(model)
        losses = pd.read_csv(os.path.join(csv.log_dir, "metrics.csv"))["train_loss"].dropna()
        return {k: v.clone() for k, v in model.state_dict().items()}, losses.tolist()

    weights_a, losses_a = run([])
    weights_b, losses_b = run([ERFMonitor(), ERFMonitor(layers=["net.2"], every_n_steps=1)])
    assert losses_a == losses_b and len(losses_a) == 12
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k


def test_lazy_modules_are_checked_and_probed_after_the_first_forward(tmp_path):
    # Lazy modules get their shapes from the first forward; Lightning trains such a model
    # as it is, and the monitor must not refuse it at fit start. The check and the
    # initialisation probe wait for the first forward and run before the first optimiser
    # step: the map is the initial weights' (BatchNorm's running statistics have seen one
    # batch), and training is bitwise what it is without the monitor.
    from pytorch_lightning import Callback

    class Lazy(module_class()):
        def __init__(self) -> None:
            super().__init__()
            self.net[0] = torch.nn.LazyConv2d(8, 3, padding=1)
            self.net[1] = torch.nn.LazyBatchNorm2d()
            self.net[-1] = torch.nn.LazyLinear(4)

    at_first_step: dict[str, torch.Tensor] = {}

    class WeightsAtFirstStep(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not at_first_step:
                at_first_step.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    def run(callbacks):
        torch.manual_seed(5)
        model = Lazy()
        make_trainer(tmp_path, callbacks, max_steps=6, logger=None).fit(model)
        return model

    plain = run([])
    monitor = ERFMonitor(module="net", layers=["4"], every_n_steps=3, num_samples=8)
    probed = run([WeightsAtFirstStep(), monitor])
    for k, v in plain.state_dict().items():
        assert torch.equal(v, probed.state_dict()[k]), k
    assert [r["step"] for r in monitor.history.records] == [0, 3, 6]
    initial = Lazy()
    initial(monitor.probe_inputs[:1])  # shapes, then the weights of the first step
    initial.load_state_dict(at_first_step)
    want = compute_erf(initial.net, monitor.probe_inputs, ["4"])["4"].metrics()["radius"]
    assert monitor.history.records[0]["radius"] == pytest.approx(want, rel=1e-6)
    assert monitor.history.records[1]["radius"] != pytest.approx(want, rel=1e-3)


def test_a_lazy_module_the_forward_never_initialises_fails_at_the_first_step(tmp_path):
    class UnusedLazy(module_class()):
        def __init__(self) -> None:
            super().__init__()
            self.spare = torch.nn.LazyLinear(4)  # never called

    model = UnusedLazy()
    with pytest.raises(ValueError, match=r"uninitialised parameters.*'spare.weight'"):
        fit(tmp_path, ERFMonitor(layers=["net.7"], num_samples=8), model=model)
    assert model.training_steps == 1  # the check waited for one forward, then said why


@pytest.mark.parametrize(
    ("layout", "to_model", "stored"),
    [
        ("no channel axis", lambda x: x.unsqueeze(1), lambda x: x[:, 0]),  # (N, H, W)
        ("channels last", lambda x: x.permute(0, 3, 1, 2), lambda x: x.permute(0, 2, 3, 1)),
    ],
)
def test_batches_the_model_rearranges_itself_are_probed(tmp_path, layout, to_model, stored):
    # Batches without a channel axis (the model adds it) or with it last (the model moves
    # it): the default layer is found and every probe maps the (H, W) input.
    class Rearranges(module_class()):
        def __init__(self) -> None:
            super().__init__()
            self.net[0] = torch.nn.Conv2d(1 if layout == "no channel axis" else 3, 8, 3, padding=1)

        def forward(self, x):
            return self.net(to_model(x))

        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def train_dataloader(self):
            x, y = data().tensors
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(stored(x), y), batch_size=8
            )

    monitor = ERFMonitor(every_n_steps=2, num_samples=8, log_images=False)
    fit(tmp_path, monitor, model=Rearranges())
    assert monitor.layers == ["net.7"]  # the last spatial output: the ReLU before pooling
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4, 5]
    assert {r["status"] for r in monitor.history.records} == {"ok"}
    assert monitor.probe_inputs.shape[1:3] == (16, 16)
    assert monitor.history.records[0]["trf_x"] == 9.0  # 3x3, 3x3 stride 2, 3x3
    assert monitor.history.records[0]["center_x"] == pytest.approx(7.5, abs=1.0)


def test_resume_with_the_default_layer_finds_its_state(tmp_path):
    first = ERFMonitor(every_n_steps=3, num_samples=8)  # layers resolved at fit start
    trainer = make_trainer(tmp_path, [first], max_steps=4, enable_checkpointing=True)
    trainer.fit(module_class()())
    ckpt = glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)[0]
    second = ERFMonitor(every_n_steps=3, num_samples=8)
    assert second.state_key == first.state_key
    make_trainer(tmp_path, [second], max_steps=8).fit(module_class()(), ckpt_path=ckpt)
    assert [r["step"] for r in second.history.records] == [0, 3, 6, 8]


def test_resume_keeps_history_and_schedule(tmp_path):
    Classifier = module_class()
    first = ERFMonitor(layers=["net.7"], every_n_steps=3, num_samples=8, log_images=False)
    trainer = make_trainer(tmp_path, [first], max_steps=4, enable_checkpointing=True)
    trainer.fit(Classifier())
    ckpt = glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)[0]
    assert [r["step"] for r in first.history.records] == [0, 3, 4]

    second = ERFMonitor(layers=["net.7"], every_n_steps=3, num_samples=8, log_images=False)
    trainer = make_trainer(tmp_path, [second], max_steps=8)
    trainer.fit(Classifier(), ckpt_path=ckpt)
    # The checkpoint was written before run 1's end probe; no second init probe on resume.
    assert [r["step"] for r in second.history.records] == [0, 3, 6, 8]
    assert torch.equal(second.probe_inputs, first.probe_inputs)
    growth = second.history.records[-1]["radius_growth"]
    assert growth == pytest.approx(
        second.history.records[-1]["radius"] / first.history.records[0]["radius"]
    )


def test_two_monitors_do_not_collide(tmp_path):
    a = ERFMonitor(layers=["net.2"], every_n_steps=2, num_samples=8)
    b = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8, tag_prefix="erf2")
    assert a.state_key != b.state_key
    trainer = make_trainer(tmp_path, [a, b], max_steps=2, enable_checkpointing=True)
    trainer.fit(module_class()())
    ckpt = torch.load(
        glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)[0],
        weights_only=True,  # the callback state is plain data and tensors
    )
    assert {a.state_key, b.state_key} <= set(ckpt["callbacks"])


def test_accumulation_probes_once_per_optimiser_step(tmp_path):
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    fit(tmp_path, monitor, accumulate_grad_batches=3, max_steps=3)
    assert [r["step"] for r in monitor.history.records] == [0, 1, 2, 3]


def test_two_optimisers_per_batch_probe_at_every_scheduled_step_they_pass(tmp_path):
    # A GAN-style loop steps two optimisers per batch: global_step moves 2 per batch (0, 2,
    # 4, ...). every_n_steps=5 and at_steps=[3] probe at the first step past each scheduled
    # one (an exact-step schedule probed only at multiples of 10, and never at 3).
    monitor = ERFMonitor(
        layers=["net.7"], every_n_steps=5, at_steps=[3], num_samples=8, log_images=False
    )
    trainer, _ = fit(tmp_path, monitor, model=two_optimiser_class()(), max_steps=18)
    assert trainer.global_step == 18
    assert [r["step"] for r in monitor.history.records] == [0, 4, 6, 10, 16, 18]  # 18: end


def test_epoch_schedule_and_log_spaced(tmp_path):
    monitor = ERFMonitor(
        layers=["net.7"], every_n_epochs=1, log_spaced=2, num_samples=8, log_images=False
    )
    fit(tmp_path, monitor, max_steps=-1, max_epochs=2)  # 8 steps per epoch
    assert [r["step"] for r in monitor.history.records] == [0, 1, 3, 8, 10, 16]


def test_no_probes_in_sanity_check_fast_dev_run_validate_and_test(tmp_path):
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=100, num_samples=8)
    trainer, model = fit(tmp_path, monitor, num_sanity_val_steps=2, limit_val_batches=2)
    assert [r["step"] for r in monitor.history.records] == [0, 5]
    trainer.validate(model)
    assert len(monitor.history) == 2

    dev = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    fit(tmp_path, dev, fast_dev_run=2, logger=None)
    assert len(dev.history) == 0


def test_configuration_errors_surface_at_fit_start(tmp_path):
    model = module_class()()
    with pytest.raises(KeyError, match=r"'net.77'.*Closest names: 'net.7'"):
        fit(tmp_path, ERFMonitor(layers=["net.77"]), model=model)
    assert model.training_steps == 0
    with pytest.raises(ValueError, match=r"'net.10' outputs shape"):
        fit(tmp_path, ERFMonitor(layers=["net.10"]), model=model)
    assert model.training_steps == 0
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        ERFMonitor(every_n_steps=0)
    with pytest.raises(TypeError, match=r"layers must be a layer name.*got 7"):
        ERFMonitor(layers=7)
    with pytest.raises(ValueError, match=r"layers is empty.*None to probe the deepest"):
        ERFMonitor(layers=[])
    with pytest.raises(ValueError, match=r"layers has duplicates"):
        ERFMonitor(layers=["net.7", "net.7"])
    with pytest.raises(ValueError, match=r"output_transform must be a callable"):
        ERFMonitor(layers=["net.7"], output_transform="tokens")
    with pytest.raises(ValueError, match="no such submodule"):
        fit(tmp_path, ERFMonitor(module="backbone"), model=model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"at_steps": 5}, ValueError, r"at_steps must be a sequence.*got 5"),
        ({"max_overhead": None}, ValueError, r"max_overhead must be a number in \(0, 1\)"),
        ({"inputs": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, ValueError, "floating point"),
        ({"inputs": torch.full((2, 3, 8, 8), float("nan"))}, ValueError, "NaN or Inf in 2 of 2"),
        ({"seed": "a"}, ValueError, r"seed must be a non-negative int; got 'a'"),
        ({"module": 3}, TypeError, r"module must be the name of a submodule"),
        ({"cmap": "infernoo"}, ValueError, r"cmap='infernoo'.*did you mean 'inferno'"),
        ({"history_map_size": 7.5}, ValueError, r"history_map_size must be a positive int"),
        ({"images_every_n_probes": 1.5}, ValueError, r"images_every_n_probes must be a pos"),
        ({"tag_prefix": 3}, ValueError, r"tag_prefix must be non-empty"),
        ({"history_filename": "../h"}, ValueError, r"plain file name.*got '../h'"),
        ({"log_images": "yes"}, ValueError, r"log_images must be True or False"),
        ({"probe_at_init": 0}, ValueError, r"probe_at_init must be True or False"),
        ({"input_key": 3.5}, TypeError, r"input_key must be None, an index or key"),
    ],
)
def test_arguments_of_the_wrong_kind_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ERFMonitor(layers=["net.7"], **kwargs)


def test_a_colour_map_is_checked_only_when_images_are_drawn():
    assert ERFMonitor(layers=["net.7"], cmap="not-a-map", log_images=False).cmap == "not-a-map"


def test_one_monitor_in_two_fits_gives_each_run_its_own_history(tmp_path):
    # A notebook re-running a cell, or a sweep reusing one callback object: a new Trainer is a
    # new run (its own TensorBoard version), with its own init probe, history and files.
    monitor = ERFMonitor(layers=["net.6"], every_n_steps=2, num_samples=4, log_images=False)
    model = module_class()()
    make_trainer(tmp_path, [monitor], max_steps=4).fit(model)
    first = monitor.history_files
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4]

    make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert [r["step"] for r in monitor.history.records] == [0, 2]
    second = monitor.history_files
    assert second is not None and first is not None and second[0] != first[0]
    assert list(pd.read_csv(second[0])["step"].unique()) == [0, 2]
    assert list(pd.read_csv(first[0])["step"].unique()) == [0, 2, 4]  # left as it was

    # The same Trainer fitting on continues its run: the history goes on.
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(model)
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model)
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4, 6]


def test_nan_probe_warns_skips_and_training_goes_on(tmp_path):
    model = module_class()(poison_after=2)
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    with pytest.warns(ERFWarning, match="skipped: NaN/Inf"):
        fit(tmp_path, monitor, model=model)
    assert model.training_steps == 5
    statuses = [r["status"] for r in monitor.history.records]
    assert statuses[:2] == ["ok", "ok"] and set(statuses[2:]) == {"nonfinite"}


def test_integer_image_batches_are_probed_as_the_model_sees_them(tmp_path):
    # uint8 images that the model scales itself: the probe takes the batch as floats (0-255),
    # as the training step's forward does, so the map is the model's own ERF (an explicit
    # inputs= tensor must be float; the error says how to convert it).
    from torch.utils.data import DataLoader, TensorDataset

    class Uint8Images(module_class()):
        def forward(self, x):
            return self.net(x.float() / 255)

        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0].float() / 255, batch[1]), batch_idx)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
            return DataLoader(TensorDataset(x, torch.randint(0, 4, (16,), generator=g)), 8)

    monitor = ERFMonitor(layers=["net.7"], num_samples=8, every_n_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ERFWarning)
        fit(tmp_path, monitor, model=Uint8Images(), max_steps=2)
    assert monitor.probe_inputs.dtype == torch.float32
    assert float(monitor.probe_inputs.max()) > 1.0  # the raw 0-255 values, not rescaled
    assert [r["status"] for r in monitor.history.records] == ["ok", "ok"]


def test_default_layer_noise_inputs_and_input_key(tmp_path):
    monitor = ERFMonitor(num_samples=4, inputs="noise", seed=7, every_n_steps=100)
    fit(tmp_path, monitor)
    assert monitor.layers == ["net.7"]  # the deepest module with a spatial output
    expected = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(monitor.probe_inputs, expected)

    class DictBatches(module_class()):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["image"], batch["label"]), batch_idx)

        def train_dataloader(self):
            def collate(items):
                x, y = torch.utils.data.default_collate(items)
                return {"label": y, "image": x}

            return torch.utils.data.DataLoader(data(), batch_size=8, collate_fn=collate)

    keyed = ERFMonitor(layers=["net.2"], num_samples=20, input_key="image", every_n_steps=100)
    fit(tmp_path, keyed, model=DictBatches())
    assert keyed.probe_inputs.shape == (20, 3, 16, 16)  # topped up beyond one batch of 8


@dataclasses.dataclass
class LabelledImages:  # a batch type of the user's own: labels first, images by name
    label: torch.Tensor
    image: torch.Tensor


def test_dataclass_batches_are_searched_and_keyed_by_field_name(tmp_path):
    class DataclassBatches(module_class()):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch.image, batch.label), batch_idx)

        def train_dataloader(self):
            def collate(items):
                x, y = torch.utils.data.default_collate(items)
                return LabelledImages(label=y, image=x)

            return torch.utils.data.DataLoader(data(), batch_size=8, collate_fn=collate)

    monitor = ERFMonitor(layers=["net.2"], num_samples=8, every_n_steps=100)
    fit(tmp_path, monitor, model=DataclassBatches())
    assert torch.equal(monitor.probe_inputs, data().tensors[0][:8])  # found among the fields
    from erf_callback.callback.inputs import extract_input

    batch = LabelledImages(label=torch.tensor([1, 2]), image=torch.ones(2, 3, 4, 4))
    assert extract_input(batch, "image") is batch.image  # keyed by field name


def test_a_wrong_field_name_lists_the_dataclass_fields():
    from erf_callback.callback.inputs import extract_input

    batch = LabelledImages(label=torch.tensor([1, 2]), image=torch.zeros(2, 3, 4, 4))
    with pytest.raises(
        ValueError,
        match=r"input_key='img'.*label: Tensor \(2,\) int64, "
        r"image: Tensor \(2, 3, 4, 4\) float32",
    ):
        extract_input(batch, "img")


def test_explicit_tensor_inputs_and_warnings_are_once(tmp_path):
    inputs = torch.randn(6, 3, 32, 32)  # big enough that no ERF reaches the border
    monitor = ERFMonitor(layers=["net.7"], inputs=inputs, every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ERFWarning)
        _, model = fit(tmp_path, monitor)
    assert torch.equal(monitor.probe_inputs, inputs)
    expected = compute_erf(model, inputs, ["net.7"])["net.7"].metrics()
    for key in ("radius", "sigma_x", "area_ratio@0.5"):
        assert monitor.history.records[-1][key] == pytest.approx(expected[key], rel=1e-9), key


def test_later_probes_reuse_the_first_trace(tmp_path, monkeypatch):
    from erf_callback.engine import compute

    traced, original = [], compute.ReceptiveFieldTracer
    monkeypatch.setattr(compute, "ReceptiveFieldTracer", lambda x: traced.append(1) or original(x))
    monitor = ERFMonitor(layers=LAYERS, every_n_steps=1, num_samples=4, log_images=False)
    _, model = fit(tmp_path, monitor)  # the test module counts its steps on itself
    assert len(monitor.history.records) == 6 * len(LAYERS)
    # One trace for the run, though the first probe runs in another hook than the later ones
    # (Lightning keeps the hook's name on the module, outside the fingerprint).
    assert len(traced) == 1
    expected = compute_erf(model, monitor.probe_inputs, LAYERS, optimize=False)
    for record in monitor.history.records[-len(LAYERS) :]:
        want = expected[record["layer"]].metrics()
        for key in ("trf_x", "radius", "sigma_x"):
            assert record[key] == pytest.approx(want[key], rel=1e-5), key


def test_bf16_true_precision(tmp_path):
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=2, num_samples=8)
    _, model = fit(tmp_path, monitor, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16
    last = monitor.history.records[-1]
    assert last["status"] == "ok"
    # The probe converted the float32 inputs to the bf16 weights: the engine on the bf16 model
    # gives the same map, and a float32 copy of the model one within bf16 rounding.
    bf16 = compute_erf(model, monitor.probe_inputs.bfloat16(), ["net.7"])["net.7"].metrics()
    assert last["radius"] == pytest.approx(bf16["radius"], rel=1e-9)
    f32 = compute_erf(model.float(), monitor.probe_inputs, ["net.7"])["net.7"].metrics()
    assert last["radius"] == pytest.approx(f32["radius"], rel=0.05)


def test_compiled_module_is_probed_without_recompiling(tmp_path):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    model = module_class()()
    model.net = torch.compile(model.net, backend=counting_backend)
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    fit(tmp_path, monitor, model=model)
    assert [r["step"] for r in monitor.history.records] == [0, 1, 2, 3, 4, 5]
    # one graph for training (plus possibly one for the last, smaller shapes); none for probes
    assert 1 <= len(compiles) <= 2
    before = len(compiles)
    compute_erf(model, monitor.probe_inputs, ["net.7"])
    assert len(compiles) == before


@pytest.mark.parametrize(
    ("optimisers", "max_steps", "probed", "interval"),
    [(1, 101, [0, 75, 100, 101], 25), (2, 202, [0, 150, 200, 202], 50)],
)
def test_automatic_schedule_respects_the_overhead_budget(
    tmp_path, monkeypatch, optimisers, max_steps, probed, interval
):
    # Deterministic clock: every training batch takes 1 s, every probe 0.5 s. The budget (2%)
    # holds over the run so far, the init probe and one end probe (kept in reserve) included:
    # the first scheduled probe runs once 3 probes fit in 2% of the training time (75 s),
    # then every 0.5 s / (2% of 1 s) = 25 batches; the end probe still fits. With two
    # optimisers stepped per batch, global_step moves 2 per second and the interval is
    # counted in its steps of 0.5 s (timing each batch as one step put probes twice as
    # close: 4% of the time).
    import erf_callback.callback.core as monitor_module

    clock = {"t": 0.0}
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: clock["t"])

    class Timed(module_class() if optimisers == 1 else two_optimiser_class()):
        def training_step(self, batch, batch_idx):
            clock["t"] += 1.0
            return super().training_step(batch, batch_idx)

    monitor = ERFMonitor(layers=["net.7"], num_samples=8, log_images=False)  # time: schedule only
    original = monitor._probe

    def slow_probe(*args, **kwargs):
        clock["t"] += 0.5
        return original(*args, **kwargs)

    monkeypatch.setattr(monitor, "_probe", slow_probe)
    fit(tmp_path, monitor, model=Timed(), max_steps=max_steps, max_epochs=-1)
    steps = [r["step"] for r in monitor.history.records]
    assert steps == probed
    for i, step in enumerate(steps[1:], start=2):  # probe time so far / training time so far
        assert sum(monitor.probe_seconds[:i]) / (step / optimisers) <= 0.02 + 1e-12
    assert monitor.schedule.auto_interval == interval


def test_a_failing_probe_mid_training_is_skipped_not_fatal(tmp_path):
    class Flaky(module_class()):
        def forward(self, x):
            if self.global_step >= 2:
                raise RuntimeError("out of memory (simulated)")
            return super().forward(x)

    model = Flaky()
    monitor = ERFMonitor(layers=["net.7"], every_n_steps=1, num_samples=8)
    with pytest.warns(ERFWarning, match=r"skipped \(RuntimeError: out of memory"):
        fit(tmp_path, monitor, model=model)
    assert model.training_steps == 5
    assert [r["step"] for r in monitor.history.records] == [0, 1]


def test_module_without_forward_gets_a_clear_error_at_fit_start(tmp_path):
    class NoForward(module_class()):
        forward = module_class().__mro__[1].forward  # LightningModule's NotImplemented stub

    model = NoForward()
    with pytest.raises(ValueError, match="module='<attribute of the network>'"):
        fit(tmp_path, ERFMonitor(layers=["net.7"], num_samples=8), model=model)
    assert model.training_steps == 0
    monitor = ERFMonitor(
        layers=["7"], module="net", every_n_steps=2, num_samples=8, log_images=False
    )
    fit(tmp_path, monitor, model=NoForward())
    assert [r["step"] for r in monitor.history.records] == [0, 2, 4, 5]


def test_a_container_given_as_module_is_named_in_the_error(tmp_path):
    class Blocks(module_class()):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleDict({"stem": self.net[:3], "rest": self.net[3:]})

        def forward(self, x):
            return self.blocks["rest"](self.blocks["stem"](x))

    with pytest.raises(ValueError, match=r"module='blocks'\) probes a ModuleDict, which has no"):
        fit(tmp_path, ERFMonitor(module="blocks", layers=["stem"], num_samples=8), model=Blocks())

    class CallsAContainer(module_class()):  # the model's own bug: its error is its own
        def __init__(self) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleList([self.net])

        def forward(self, x):
            return self.parts(x)

    with pytest.raises(NotImplementedError, match=r'missing the required "forward"'):
        fit(tmp_path, ERFMonitor(layers=["net.7"], num_samples=8), model=CallsAContainer())

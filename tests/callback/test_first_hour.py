"""The first hour of a new user: the errors and printouts they meet first."""

from __future__ import annotations

import importlib.util
import os
import shlex
import types

import pytest
import torch
from torch import nn

from erf_callback import ERFMonitor, compute_erf
from tests.helpers.lit import make_net

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WithModel(nn.Module):  # the usual LightningModule layout: the network in self.model
    def __init__(self) -> None:
        super().__init__()
        self.model = make_net()
        self.loss = nn.CrossEntropyLoss()


def test_wrong_layer_name_suggests_module() -> None:
    monitor = ERFMonitor(layers=["3"])
    with pytest.raises(KeyError, match=r"It exists as 'model\.3'.*module='model'"):
        monitor.setup(types.SimpleNamespace(fast_dev_run=False), WithModel(), "fit")
    # With module= the same name resolves.
    ERFMonitor(layers=["3"], module="model").setup(
        types.SimpleNamespace(fast_dev_run=False), WithModel(), "fit"
    )


def test_names_written_with_the_module_prefix_get_the_names_inside_it() -> None:
    # module='model' and layers=['model.3'] (the name as the LightningModule has it): the
    # message says what to write instead; a prefixed name that is not inside either, nothing.
    monitor = ERFMonitor(layers=["model.3", "model.1"], module="model")
    with pytest.raises(
        KeyError,
        match=r"module='model'\) names layers inside 'model': write "
        r"\['3', '1'\] for \['model\.3', 'model\.1'\]",
    ):
        monitor.setup(types.SimpleNamespace(fast_dev_run=False), WithModel(), "fit")
    monitor = ERFMonitor(layers=["model.99"], module="model")
    with pytest.raises(KeyError) as err:
        monitor.setup(types.SimpleNamespace(fast_dev_run=False), WithModel(), "fit")
    assert "write" not in str(err.value)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
@pytest.mark.parametrize("layers", [None, ["3"]])
def test_a_torchscript_network_fails_at_setup(layers) -> None:
    # Before: with layers named, an AttributeError from the name lookup ("'OrderedModuleDict'
    # object has no attribute 'get'"); without, a RuntimeError from the first batch's search
    # for the deepest layer ("register_forward_hook is not supported on ScriptModules").
    module = WithModel()
    module.model = torch.jit.script(make_net())
    monitor = ERFMonitor(layers=layers, module="model")
    with pytest.raises(TypeError, match=r"the model is a TorchScript module.*eager nn\.Module"):
        monitor.setup(types.SimpleNamespace(fast_dev_run=False), module, "fit")


def test_no_module_hint_when_the_name_is_ambiguous_or_absent() -> None:
    twice = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(1, 1, 1)), "b": nn.Sequential(nn.ReLU())})
    with pytest.raises(KeyError) as err:
        compute_erf(twice, torch.randn(1, 1, 4, 4), ["0"])  # a.0 and b.0: which submodule?
    assert "module=" not in str(err.value)


def test_erf_map_repr_is_one_short_line() -> None:
    m = compute_erf(make_net(), torch.randn(2, 3, 64, 64), ["3"])["3"]
    text = repr(m)
    assert "\n" not in text and len(text) < 250
    assert "layer='3'" in text and "map=(64, 64) float64" in text and "status='ok'" in text
    assert "tensor(" not in text


def test_demo_prints_a_tensorboard_command_that_exists(monkeypatch, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "examples", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.chdir(ROOT)
    assert demo.tensorboard_command("erf_demo_logs") == "make tensorboard"
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "\ntensorboard:" in f.read()
    monkeypatch.chdir(tmp_path)  # elsewhere: an executable path, not a bare `tensorboard`
    program = shlex.split(demo.tensorboard_command("logs"))[0]
    assert os.path.isabs(program) or os.path.exists(program)
    assert os.access(
        program if os.path.isabs(program) else os.path.join(tmp_path, program), os.X_OK
    )


@pytest.mark.parametrize(("n", "batch"), [(6, 8), (10, 4)])
def test_a_dataset_smaller_than_num_samples_is_probed_whole(tmp_path, n, batch) -> None:
    # A first try on a toy dataset: one batch of 6, or 10 samples in batches of 4, and the
    # default num_samples. The probe uses every sample there is and says so once.
    from torch.utils.data import DataLoader

    from erf_callback import ERFWarning
    from tests.helpers.lit import data, make_trainer, module_class

    monitor = ERFMonitor(
        layers=["3"], module="net", inputs="train", num_samples=16, every_n_steps=1
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    with pytest.warns(ERFWarning, match=rf"holds {n} samples < num_samples=16") as caught:
        trainer.fit(module_class()(), DataLoader(data(n), batch_size=batch))
    assert sum("num_samples" in str(w.message) for w in caught) == 1
    assert monitor.probe_inputs.shape[0] == n
    statuses = [r["status"] for r in monitor.history.records]
    assert statuses and set(statuses) == {"ok"}


@pytest.mark.parametrize("source", ["tensor", "loader"])
def test_probe_images_the_model_cannot_take_fail_at_fit_start_saying_so(tmp_path, source) -> None:
    # inputs= with 5 channels for a 3-channel net: torch's own message ("expected input[1, 5,
    # 16, 16] to have 3 channels") named neither the probe nor the inputs= that caused it.
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers.lit import make_trainer, module_class

    images = torch.randn(4, 5, 16, 16)
    inputs = images if source == "tensor" else DataLoader(TensorDataset(images), batch_size=2)
    monitor = ERFMonitor(layers=["net.3"], inputs=inputs, every_n_steps=1)
    model = module_class()()
    where = r"from inputs=\)" if source == "tensor" else r"the first image tensor of the inputs= "
    fix = "inputs= must be a batch it takes" if source == "tensor" else "set input_key= or module="
    with pytest.raises(
        RuntimeError,
        match=r"fit-start probe ran the LightningModule on the probe inputs \(4, 5, 16, 16\) "
        rf"float32 \(({where}).*to have 3 channels.*{fix}",
    ) as err:
        make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert type(err.value.__cause__) is RuntimeError  # torch's error, chained
    assert "compute_erf" not in str(err.value)  # the monitor's account, not the engine's
    assert model.training_steps == 0


def test_probe_images_given_as_numpy_or_a_list_of_images_say_how_to_pass_them(tmp_path) -> None:
    # Two first tries: a NumPy array (refused at construction), and a list of single images,
    # which ERFMonitor reads as an iterable of batches (refused at fit start, with the fix).
    import numpy as np

    from tests.helpers.lit import make_trainer, module_class

    with pytest.raises(TypeError, match=r"torch\.from_numpy"):
        ERFMonitor(layers=["net.7"], inputs=np.zeros((4, 3, 16, 16), dtype=np.float32))
    images = [torch.randn(3, 16, 16) for _ in range(4)]
    monitor = ERFMonitor(layers=["net.7"], inputs=images)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(ValueError, match=r"inputs=torch\.stack\(images\)"):
        trainer.fit(module_class()())
    stacked = ERFMonitor(layers=["net.7"], inputs=torch.stack(images), every_n_steps=1)
    make_trainer(tmp_path / "ok", [stacked], max_steps=2).fit(module_class()())
    assert {r["status"] for r in stacked.history.records} == {"ok"}


@pytest.mark.parametrize("bad", [0, -3, True, 8.0, "8"])
def test_num_samples_must_be_a_positive_int(bad) -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ERFMonitor(num_samples=bad)


def test_num_samples_may_be_a_numpy_int() -> None:
    # Read from a config as np.int64(8): refused before, while every_n_steps took it.
    import numpy as np

    monitor = ERFMonitor(num_samples=np.int64(8), every_n_steps=np.int64(5))
    assert monitor.num_samples == 8 and type(monitor.num_samples) is int


def _grey_classifier():
    """Grey (N, 28, 28) batches; training_step adds the channel axis the network takes."""
    import pytorch_lightning as pl
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Grey(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 3),
            )
            self.training_steps = 0

        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            return F.cross_entropy(self.net(x.unsqueeze(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(16, 28, 28, generator=g), torch.randint(0, 3, (16,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=8)

    return Grey()


@pytest.mark.parametrize("source", ["train", "tensor"])
def test_grey_batches_for_a_network_that_takes_a_channel_axis_say_how_to_add_it(
    tmp_path, source
) -> None:
    # The network takes (N, 1, H, W) and training_step adds the axis; the probe gets the
    # batches' (N, H, W). The error at fit start names the reading the network takes and how
    # to give the monitor its inputs so; done as it says, the run probes.
    from tests.helpers.lit import make_trainer

    images = torch.randn(8, 28, 28)
    kw = {"inputs": images} if source == "tensor" else {}
    monitor = ERFMonitor(layers=["2"], module="net", every_n_steps=1, num_samples=8, **kw)
    model = _grey_classifier()
    fix = (
        r"input_key=lambda batch: batch\[0\]\.unsqueeze\(1\)"
        if source == "train"
        else r"inputs=\.\.\.\) so: inputs\.unsqueeze\(1\)"
    )
    with pytest.raises(ValueError, match=rf"add the channel axis: inputs\.unsqueeze\(1\).*{fix}"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert model.training_steps == 0
    kw = (
        {"inputs": images.unsqueeze(1)}
        if source == "tensor"
        else {"input_key": lambda batch: batch[0].unsqueeze(1)}
    )
    monitor = ERFMonitor(layers=["2"], module="net", every_n_steps=1, num_samples=8, **kw)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert [r["status"] for r in monitor.history.records] == ["ok"] * 3


def test_a_dataset_as_probe_inputs_gives_its_first_samples(tmp_path) -> None:
    # A Dataset yields single samples (C, H, W): read as batches they were one-dimensional
    # signals, and the fit-start probe failed with advice to add a batch dimension.
    from torch.utils.data import Dataset, TensorDataset

    from tests.helpers.lit import make_trainer, module_class

    images = torch.randn(20, 3, 16, 16)

    class Dicts(Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"label": torch.tensor(i % 4), "image": images[i]}

    for dataset, key in ((TensorDataset(images, torch.zeros(20)), None), (Dicts(), "image")):
        monitor = ERFMonitor(
            layers=["net.3"], inputs=dataset, input_key=key, every_n_steps=1, num_samples=8
        )
        make_trainer(tmp_path, [monitor], max_steps=1).fit(module_class()())
        assert torch.equal(monitor.probe_inputs, images[:8])  # in order, collated
        assert [r["status"] for r in monitor.history.records] == ["ok"] * 2

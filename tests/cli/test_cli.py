"""The offline command line: ``erf-callback probe``, ``report``, ``layers`` and their errors."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from erf_callback import ERFTracker, compute_erf
from erf_callback.cli import main
from erf_callback.cli.loading import load_factory, load_inputs
from erf_callback.cli.report import find_run
from erf_callback.render import render_erf_maps
from tests.helpers.nets import stack_closed_form

KERNELS = [3, 3, 5]

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        # uniform 3, 3, 5 stack: the ERF has a closed form
        layers = []
        for k in (3, 3, 5):
            conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
            nn.init.constant_(conv.weight, 1.0)
            layers.append(conv)
        return nn.Sequential(*layers)

    def build_relu():
        torch.manual_seed(0)
        convs = [nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)]
        return nn.Sequential(convs[0], nn.ReLU(), convs[1])

    def build_zero():
        net = build()
        nn.init.zeros_(net[0].weight)
        return net

    def broken():
        raise RuntimeError("no weights here")

    def not_a_model():
        return 42

    class Opaque:
        pass

    CONSTANT = 3
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding ``mymodels.py``, as a user's project would."""
    (tmp_path / "mymodels.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    yield tmp_path
    sys.modules.pop("mymodels", None)


def user_models():
    """The user's module, imported the way the CLI imports it (from the current directory)."""
    load_factory("mymodels:build")
    return sys.modules["mymodels"]


def run_cli(*argv: str) -> int:
    return main(list(argv))


def probe_args(out, *extra: str, factory: str = "mymodels:build") -> list[str]:
    return [
        "probe", factory, "--out", str(out), "--size", "33", "33", "--channels", "1",
        "--num-samples", "3", "--no-progress", *extra,
    ]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("erf-callback: error: ")
    return err


# ---- probe: success ----------------------------------------------------------------------


def test_probe_writes_metrics_json_and_pngs_matching_the_closed_form(workdir, capsys):
    out = workdir / "out"
    assert run_cli(*probe_args(out, "--layers", "1", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    x = torch.zeros(1, 1, 33, 33)
    reference = compute_erf(torch.nn.Conv2d(1, 1, 1), x)["output"].metrics()
    assert set(metrics) == {"1", "2"}
    assert set(metrics["2"]) == set(reference)  # the keys of ERFMap.metrics()
    form = stack_closed_form(KERNELS)[0]
    var, trf = form.variance, form.trf
    # uniform weights: the moment fit reproduces the closed form to rounding (~1e-9 rel)
    assert metrics["2"]["sigma_x"] ** 2 == pytest.approx(var, rel=1e-6)
    assert metrics["2"]["trf_x"] == trf
    assert metrics["1"]["trf_y"] == stack_closed_form(KERNELS[:2])[0].trf
    for layer in ("1", "2"):
        with Image.open(out / f"{layer}_heatmap.png") as img:
            assert img.size[0] >= 256  # upscaled from the 33 x 33 map
        assert (out / f"{layer}_radial_profile.png").is_file()
    # Both layers on one scale, as a notebook draws what compute_erf returns.
    mymodels = user_models()
    x = load_inputs("noise", num_samples=3, channels=1, size=(33, 33))
    with Image.open(out / "all_layers.png") as img:
        both = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(
        both, render_erf_maps(compute_erf(mymodels.build(), x, ["1", "2"]))
    )
    assert "wrote 6 files" in capsys.readouterr().out


def test_probe_heatmap_is_the_annotated_figure_or_the_raw_map(workdir):
    # The default picture is TensorBoard's (title, colour bar, legend: wider than tall, with
    # white margins); --heatmap-style raw is the bare map, square, upscaled from 33 x 33.
    annotated, raw = workdir / "annotated", workdir / "raw"
    assert run_cli(*probe_args(annotated, "--layers", "2")) == 0
    assert run_cli(*probe_args(raw, "--layers", "2", "--heatmap-style", "raw")) == 0
    with Image.open(annotated / "2_heatmap.png") as img:
        fig = np.asarray(img.convert("RGB"))
    with Image.open(raw / "2_heatmap.png") as img:
        bare = np.asarray(img.convert("RGB"))
    assert bare.shape[0] == bare.shape[1] and (bare[0, 0] != 255).any()  # the map to its edge
    assert fig.shape[1] > fig.shape[0] * 0.9 and (fig[0, 0] == 255).all()  # a white margin
    assert fig.shape != bare.shape
    assert not (annotated / "all_layers.png").exists()  # one layer: its heatmap says it all


def test_probe_in_batches_equals_one_compute_erf_call(workdir):
    out = workdir / "out"
    argv = probe_args(out, "--layers", "2", "--batch-size", "2", factory="mymodels:build_relu")
    argv[argv.index("--num-samples") + 1] = "5"
    assert run_cli(*argv) == 0
    mymodels = user_models()
    x = load_inputs("noise", num_samples=5, channels=1, size=(33, 33))
    expected = compute_erf(mymodels.build_relu(), x, ["2"])["2"].metrics()
    got = json.loads((out / "metrics.json").read_text())["2"]
    for key in ("radius", "sigma_x", "gaussian_r2", "area_ratio@0.5"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_nan_metrics_are_null_in_json(workdir):
    out = workdir / "out"
    with pytest.warns(UserWarning, match="zero everywhere"):
        assert run_cli(*probe_args(out, "--layers", "2", factory="mymodels:build_zero")) == 0
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text
    metrics = json.loads(text)["2"]
    assert metrics["radius"] is None
    assert metrics["trf_x"] == stack_closed_form(KERNELS)[0].trf  # architecture-only values survive
    assert not (out / "2_heatmap.png").exists()  # no picture of an empty map


def test_state_dict_checkpoint_is_loaded(workdir):
    mymodels = user_models()
    trained = mymodels.build_relu()
    with torch.no_grad():
        trained[0].weight.mul_(-3.0)
        trained[2].weight[:, :, 0, :] = 5.0  # an off-centre row: the map must change
    torch.save(trained.state_dict(), workdir / "weights.pt")
    out = workdir / "out"
    argv = probe_args(
        out, "--layers", "2", "--checkpoint", "weights.pt", factory="mymodels:build_relu"
    )
    assert run_cli(*argv) == 0
    x = load_inputs("noise", num_samples=3, channels=1, size=(33, 33))
    expected = compute_erf(trained, x, ["2"])["2"].metrics()
    default = compute_erf(mymodels.build_relu(), x, ["2"])["2"].metrics()
    got = json.loads((out / "metrics.json").read_text())["2"]
    assert got["center_offset"] == pytest.approx(expected["center_offset"], rel=1e-5)
    assert got["center_offset"] != pytest.approx(default["center_offset"], rel=1e-3)


def test_lightning_checkpoint_prefix_is_found_and_other_keys_ignored(workdir, capsys):
    mymodels = user_models()
    trained = mymodels.build_relu()
    with torch.no_grad():
        trained[2].weight[:, :, :, 0] = 4.0
    state = {f"net.{k}": v for k, v in trained.state_dict().items()}
    state["criterion.pos_weight"] = torch.ones(3)  # a LightningModule's other parts
    ckpt = {"epoch": 2, "global_step": 40, "state_dict": state, "callbacks": {}}
    torch.save(ckpt, workdir / "last.ckpt")
    out = workdir / "out"
    argv = probe_args(
        out, "--layers", "2", "--checkpoint", "last.ckpt", factory="mymodels:build_relu"
    )
    assert run_cli(*argv) == 0
    assert "key prefix 'net.' removed" in capsys.readouterr().out
    x = load_inputs("noise", num_samples=3, channels=1, size=(33, 33))
    expected = compute_erf(trained, x, ["2"])["2"].metrics()
    got = json.loads((out / "metrics.json").read_text())["2"]
    assert got["sigma_x"] == pytest.approx(expected["sigma_x"], rel=1e-5)


def test_images_from_a_folder(workdir):
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(3)]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    x = load_inputs(str(folder), num_samples=8, channels=1, size=(20, 20), progress=False)
    assert x.shape == (3, 1, 20, 20)  # three images, the text file skipped
    assert torch.equal(x[1, 0], torch.from_numpy(pixels[1]).float() / 255)  # same size: exact
    out = workdir / "out"
    argv = [*probe_args(out, "--layers", "2", "--inputs", str(folder)), "--size", "24", "24"]
    assert run_cli(*argv) == 0
    assert json.loads((out / "metrics.json").read_text())["2"]["radius"] > 0


def test_channels_0_probes_a_model_that_adds_the_channel_axis(workdir):
    # Noise and grey images without a channel axis, (N, H, W): the same maps as the uniform
    # stack inside probed on (N, 1, H, W) (the closed form: the map does not depend on x).
    (workdir / "greymodels.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from mymodels import build

            class Grayscale(nn.Module):  # takes (N, H, W): adds the channel axis itself
                def __init__(self):
                    super().__init__()
                    self.body = build()

                def forward(self, x):
                    return self.body(x.unsqueeze(1))
            """
        )
    )
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(folder / f"{i}.png")
    assert load_inputs(str(folder), num_samples=2, channels=0, size=(24, 24)).shape == (2, 24, 24)
    for inputs in ("noise", str(folder)):
        sys.modules.pop("greymodels", None)  # imported afresh from this test's folder
        out = workdir / f"out-{len(inputs)}"
        argv = probe_args(
            out, "--layers", "body.2", "--inputs", inputs, factory="greymodels:Grayscale"
        )
        argv[argv.index("--channels") + 1] = "0"
        assert run_cli(*[*argv, "--size", "24", "24"]) == 0
        got = json.loads((out / "metrics.json").read_text())["body.2"]
        form = stack_closed_form(KERNELS)[0]  # the uniform 3, 3, 5 stack's closed form
        assert got["sigma_x"] ** 2 == pytest.approx(form.variance, rel=1e-6)
        assert got["trf_x"] == form.trf == 9.0
    sys.modules.pop("greymodels", None)
    # Channels last, written as the last --size value: (N, H, W, 2) for a model that permutes.
    (workdir / "lastmodels.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class ChannelsLast(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 5))

                def forward(self, x):
                    return self.body(x.permute(0, 3, 1, 2))
            """
        )
    )
    out = workdir / "out-last"
    argv = probe_args(out, "--layers", "body.2", factory="lastmodels:ChannelsLast")
    argv[argv.index("--channels") + 1] = "0"
    assert run_cli(*[*argv, "--size", "24", "20", "2"]) == 0
    sys.modules.pop("lastmodels", None)
    got = json.loads((out / "metrics.json").read_text())["body.2"]
    assert (got["trf_y"], got["trf_x"]) == (7.0, 7.0)  # over (H, W), not (W, C)


# ---- probe: errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "problem", "fix"),
    [
        ("mymodels", "is not MODULE:FACTORY", "write it as MODULE:FACTORY"),
        ("nosuchmodule:build", "cannot import module 'nosuchmodule'", "run erf-callback from"),
        ("mymodels:buld", "has no attribute 'buld'", "callables: Opaque, broken, build"),
        ("mymodels:CONSTANT", "is a int, not a callable", "name a function or class"),
        ("mymodels:broken", "broken() failed (RuntimeError: no weights here)", "no arguments"),
        ("mymodels:not_a_model", "returned a int, not a torch.nn.Module", "return the model"),
        ("missing.py:build", "no file 'missing.py'", "check the path"),
    ],
)  # fmt: skip
def test_bad_factory_exits_2_with_one_line(workdir, capsys, factory, problem, fix):
    assert run_cli(*probe_args(workdir / "out", "--layers", "2", factory=factory)) == 2
    err = one_line_error(capsys)
    assert problem in err
    assert fix in err


def test_file_path_factory_works(workdir):
    out = workdir / "out"
    assert run_cli(*probe_args(out, "--layers", "2", factory="mymodels.py:build")) == 0
    assert (
        json.loads((out / "metrics.json").read_text())["2"]["trf_x"]
        == stack_closed_form(KERNELS)[0].trf
    )


def test_unknown_layer_exits_2_naming_close_names(workdir, capsys):
    assert run_cli(*probe_args(workdir / "out", "--layers", "2", "conv9")) == 2
    err = one_line_error(capsys)
    assert "No layer named 'conv9'" in err
    assert "erf-callback layers MODULE:FACTORY" in err
    assert not (workdir / "out" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--checkpoint", "nope.pt"], "checkpoint file not found: nope.pt"),
        (["--inputs", "no_such_folder"], "neither 'noise' nor an existing folder"),
        (
            ["--channels", "3"],
            "probing failed on samples of shape (3, 33, 33) (RuntimeError: Given groups=1",
        ),
        (["--num-samples", "0"], "--num-samples 0 is not positive"),
        (["--channels", "0"], "these of shape (33, 33) have none; pass --channels 1"),
    ],
)
def test_bad_files_and_inputs_exit_2(workdir, capsys, extra, problem):
    assert run_cli(*probe_args(workdir / "out", "--layers", "2"), *extra) == 2
    assert problem in one_line_error(capsys)


def test_checkpoint_that_does_not_fit_names_the_keys(workdir, capsys):
    torch.save({"weight": torch.ones(2)}, workdir / "other.pt")
    assert run_cli(*probe_args(workdir / "out", "--layers", "2", "--checkpoint", "other.pt")) == 2
    err = one_line_error(capsys)
    assert "3 missing keys (e.g. '0.weight')" in err
    assert "--prefix" in err


def test_pickled_objects_need_unsafe_load(workdir, capsys):
    mymodels = user_models()
    torch.save({"state_dict": mymodels.build().state_dict(), "extra": mymodels.Opaque()}, "x.ckpt")
    args = probe_args(workdir / "out", "--layers", "2", "--checkpoint", "x.ckpt")
    assert run_cli(*args) == 2
    assert "--unsafe-load" in one_line_error(capsys)
    assert run_cli(*args, "--unsafe-load") == 0


def test_layers_lists_named_modules(workdir, capsys):
    assert run_cli("layers", "mymodels:build_relu") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["(Sequential)", "0  (Conv2d)", "1  (ReLU)", "2  (Conv2d)"]


def test_python_dash_m_runs_the_same_cli(workdir, capsys, monkeypatch):
    argv = ["erf_callback", "probe", "mymodels:nothing", "--layers", "a", "--out", "o"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("erf_callback", run_name="__main__")
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (
        "erf-callback: error: module 'mymodels' has no attribute 'nothing'; use one of its "
        "callables: Opaque, broken, build, build_relu, build_zero, not_a_model"
    )


# ---- report ------------------------------------------------------------------------------


# The tests that read this run go to one worker (make test: --dist loadgroup), which makes
# it once for the session (4 s; once per worker and module visit before).
_ON_TRACKED_RUN = pytest.mark.xdist_group("tracked_run")


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """A short ERFTracker run with a SummaryWriter: history files and TB events (read-only)."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)
    )
    log_dir = tmp_path / "logs" / "version_0"
    writer = SummaryWriter(str(log_dir))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with ERFTracker(net, ["0", "2"], torch.randn(4, 1, 16, 16), writer, every_n_steps=2) as t:
        for _ in range(4):
            loss = net(torch.randn(4, 1, 16, 16)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t.step()
    writer.close()
    return log_dir


@_ON_TRACKED_RUN
def test_report_from_a_log_folder(tracked_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli("report", str(tracked_run.parent), "--out", str(out)) == 0
    assert "2 layers, 6 records" in capsys.readouterr().out  # steps 0, 2, 4 x two layers
    with Image.open(out / "report.png") as img:
        assert img.size[0] == 1000
        assert img.size[1] > 600  # curves, two evolution grids and the table
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    history = json.loads((tracked_run / "erf_history.json").read_text())
    final = [r for r in history["records"] if r["layer"] == "2"][-1]
    assert f"<td>{final['radius']:.4g}</td>" in page


@_ON_TRACKED_RUN
def test_report_from_tensorboard_events_only_matches_the_history(tracked_run, tmp_path):
    history = json.loads((tracked_run / "erf_history.json").read_text())["records"]
    tracked_run = shutil.copytree(tracked_run, tmp_path / "copy")
    for name in ("erf_history.json", "erf_history.csv"):
        os.remove(tracked_run / name)
    run = find_run(str(tracked_run))
    assert run.layers == ["0", "2"]
    assert set(run.evolution) == {"0", "2"}  # the last evolution image of each layer
    radius = {(r["layer"], r["step"]): r["radius"] for r in run.records}
    for r in history:
        # TensorBoard stores float32
        assert radius[(r["layer"], r["step"])] == pytest.approx(r["radius"], rel=1e-6)
    assert run_cli("report", str(tracked_run), "--out", str(tmp_path / "r")) == 0


@_ON_TRACKED_RUN
def test_report_from_the_csv_file(tracked_run, tmp_path):
    run = find_run(str(tracked_run / "erf_history.csv"))
    assert [r["step"] for r in run.records if r["layer"] == "0"] == [0.0, 2.0, 4.0]
    assert run.maps == {}  # the CSV has no maps: the report shows curves and the table
    assert (
        run_cli("report", str(tracked_run / "erf_history.csv"), "--out", str(tmp_path / "r")) == 0
    )
    assert (tmp_path / "r" / "report.png").is_file()


def test_report_zooms_its_evolution_grids_where_the_history_has_the_input_shape(tmp_path):
    # A 5 px blob growing to 9 px on a 128 px input, kept as 64 px history maps: the report's
    # grid shows the square around what the frames show, in one row, captioned in input
    # pixels. A history without map_shapes (older files) shows the whole maps.
    from erf_callback.callback.history import ERFHistory
    from erf_callback.cli.report import _evolution_image
    from erf_callback.render import figures

    history = ERFHistory()
    yy, xx = np.mgrid[:128, :128]
    for step, sigma in ((0, 1.5), (10, 2.0), (20, 3.0)):
        erf = torch.from_numpy(np.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / (2 * sigma**2)))
        erf[erf < 1e-3] = 0.0
        history.add(step, 0, "conv", "ok", {"radius": 2 * sigma, "center_y": 64.0,
                                            "center_x": 64.0}, erf)  # fmt: skip
    assert history.map_shapes == {"conv": (128, 128)}
    json_path = history.write(str(tmp_path))[1]
    run = find_run(json_path)
    assert run.map_shapes == {"conv": (128, 128)}
    grid = _evolution_image(run, "conv")
    height, width, origins = figures._grid_layout(3, 110, 6)
    assert grid is not None and grid.shape == (height + 22, width, 3)  # one row, a caption

    def lit(img: np.ndarray) -> float:
        tile = img[origins[0][0] : origins[0][0] + 110, origins[0][1] : origins[0][1] + 110]
        return float((tile.astype(int).sum(-1) > 100).mean())

    with open(json_path) as f:
        data = json.load(f)
    del data["map_shapes"]
    with open(json_path, "w") as f:
        json.dump(data, f)
    whole = _evolution_image(find_run(json_path), "conv")
    assert whole is not None and whole.shape == (height, width, 3)
    assert lit(grid) > 10 * lit(whole)
    # Checkpoints written before the shapes were kept still load.
    state = history.state_dict()
    del state["map_shapes"]
    again = ERFHistory()
    again.load_state_dict(state)
    assert again.map_shapes == {} and len(again.maps["conv"]) == 3


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("missing", "no file or folder"),
        ("empty", "no erf_history.json and no TensorBoard event files"),
        ("json", "not an erf-callback history"),
        ("txt", "neither a history file"),
    ],
)
def test_report_errors_exit_2(tmp_path, capsys, setup, problem):
    target = tmp_path / "run"
    if setup == "empty":
        target.mkdir()
    elif setup == "json":
        target = tmp_path / "other.json"
        target.write_text('{"a": 1}')
    elif setup == "txt":
        target = tmp_path / "notes.txt"
        target.write_text("x")
    assert run_cli("report", str(target), "--out", str(tmp_path / "out")) == 2
    assert problem in one_line_error(capsys)


def test_probe_in_batches_keeps_the_constant_channel_sum_zero():
    """Each batch finds the LayerNorm channel sum constant (status zero, or round-off that the
    engine recognises); the batched total must say so too, not become an "ok" noise map."""
    import warnings

    from erf_callback import ERFWarning
    from erf_callback.cli.probe import probe_model

    class ChannelNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    for seed in range(4):
        torch.manual_seed(seed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            maps = probe_model(ChannelNorm(), ["output"], torch.randn(6, 1, 8, 8), batch_size=2,
                               progress=False)  # fmt: skip
        assert maps["output"].status == "zero", seed
        said = [str(w.message) for w in record if issubclass(w.category, ERFWarning)]
        assert len(said) == 1 and "constant" in said[0]


def test_probe_batches_are_split_to_fit_the_memory_budget(monkeypatch):
    # --batch-size is a step of the progress bar: a batch whose activations exceed the memory
    # budget goes through the model in smaller chunks (here one sample at a time), with the
    # same maps as the batch in one pass.
    from erf_callback.cli.probe import probe_model
    from erf_callback.engine import compute

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    x = torch.randn(8, 1, 12, 12, dtype=torch.float64)
    net = net.double()
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    whole = probe_model(net, ["1"], x, batch_size=4, progress=False)["1"].grad
    # The first batch traces its first sample alone; the second reuses the trace: all at once.
    assert calls == [1, 3, 4]
    calls.clear()
    monkeypatch.setattr(compute, "default_budget", lambda device: 1)  # one sample per chunk
    split = probe_model(net, ["1"], x, batch_size=4, progress=False)["1"].grad
    assert calls == [1] * 8
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-15)


def test_a_report_of_a_run_that_diverged_says_where_its_maps_stop(tmp_path):
    # After divergence every probe is "nonfinite": the curve stops at the last map, and the
    # table's "final" metrics are that probe's. The page must say the later probes gave no
    # map, or the run reads as healthy.
    from erf_callback.cli.report import find_run, render_report_html

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)
    )
    writer = SummaryWriter(str(tmp_path / "run"))
    with (
        warnings.catch_warnings(),
        ERFTracker(net, ["0", "2"], torch.randn(4, 1, 16, 16), writer, every_n_steps=2) as t,
    ):
        warnings.simplefilter("ignore")
        for step in range(4):
            if step == 1:
                with torch.no_grad():
                    net[2].weight.fill_(float("nan"))
            t.step()
    writer.close()
    run = find_run(str(tmp_path / "run"))
    assert [r["step"] for r in run.without_map("2")] == [2, 4]
    assert run.final("2")["step"] == 0 and run.last_probe("2") == "nonfinite at step 4"
    assert run.last_probe("0") == "ok"  # the first layer never saw the NaN weights
    page = render_report_html(run, b"")
    assert "<th>last probe</th>" in page and "<td>nonfinite at step 4</td>" in page
    assert run_cli("report", str(tmp_path / "run"), "--out", str(tmp_path / "out")) == 0
    # A healthy run's page has no such column.
    healthy = find_run(str(tmp_path / "run"))
    healthy.records = [r for r in healthy.records if r.get("status", "ok") == "ok"]
    assert "<th>last probe</th>" not in render_report_html(healthy, b"")

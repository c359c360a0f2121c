"""Inputs that used to give a number where they should give an error (issue 7, item 5)."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from erf_callback import ProbeConfig, compute_erf
from erf_callback.engine.validate import (
    ModelForwardError,
    UnbatchedInputError,
    _origin,
    normalize_layers,
)
from tests.helpers.nets import ResNet


def test_unbatched_image_asks_for_the_batch_dimension():
    net = ResNet(width=4)
    image = torch.randn(3, 32, 32)  # one image without its batch dim: read as 3 1-D signals
    with pytest.raises(UnbatchedInputError, match=r"'conv1' \(Conv2d\).*unbatched.*unsqueeze\(0\)"):
        compute_erf(net, image, ["layer2"])
    compute_erf(net, image.unsqueeze(0), ["layer2"])  # the fix it names works


@pytest.mark.parametrize(
    ("first", "torch_says"),
    [
        (nn.BatchNorm2d(3), r"expected 4D input \(got 3D input\)"),
        (nn.GroupNorm(1, 3), r"number of channels in input"),
        (nn.LayerNorm([3, 16, 16]), r"normalized_shape=\[3, 16, 16\]"),
    ],
    ids=["BatchNorm2d", "GroupNorm", "LayerNorm"],
)
def test_a_norm_layer_before_the_first_conv_still_asks_for_the_batch_dimension(first, torch_says):
    # The normalisation fails on the unbatched image before any conv sees it, in torch's own
    # words ("expected 4D input (got 3D input)"), which never said what to do.
    net = nn.Sequential(first, nn.Conv2d(3, 4, 3, padding=1)).eval()
    image = torch.randn(3, 16, 16)
    with pytest.raises(
        UnbatchedInputError,
        match=rf"not take them so \(.*{torch_says}.*add the batch dimension: "
        rf"inputs\.unsqueeze\(0\)",
    ) as err:
        compute_erf(net, image)
    assert err.value.__cause__ is not None  # torch's error, chained
    assert compute_erf(net, image.unsqueeze(0))["output"].status == "ok"


def test_a_1d_model_that_fails_keeps_its_own_error():
    # No 2-D layer: nothing suggests an unbatched image, so torch's error stands, chained.
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv1d(5, 4, 3))
    with pytest.raises(RuntimeError, match=r"expected input.*\(N, C, W\)") as err:
        compute_erf(net, torch.randn(2, 3, 32))
    assert not isinstance(err.value, UnbatchedInputError)
    assert type(err.value.__cause__) is RuntimeError


class _Flatten(nn.Module):
    """A conv and a linear head sized for 16 x 16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


@pytest.mark.parametrize(
    ("net", "x", "torch_says"),
    [
        (nn.Conv2d(3, 4, 3), torch.randn(16, 4, 32, 32), r"expected input\[1, 4, 32, 32\]"),
        (_Flatten(), torch.randn(5, 3, 24, 24), r"mat1 and mat2 shapes cannot be multiplied"),
    ],
    ids=["channels", "size"],
)
def test_inputs_the_model_cannot_take_name_the_inputs(net, x, torch_says):
    # torch's message alone ("expected input[1, 4, 32, 32] to have 3 channels") names a batch
    # of one that the user never made: compute_erf's traced first sample.
    shape = re.escape(str(tuple(x.shape)))
    with pytest.raises(
        ModelForwardError,
        match=rf"failed on compute_erf's inputs of shape {shape} float32: .*{torch_says}.*"
        r"runs the first sample alone, so a shape in that message has batch size 1\. "
        r"Check that the inputs are what the model takes: \(N, C, H, W\)",
    ) as err:
        compute_erf(net, x)
    assert type(err.value.__cause__) is RuntimeError  # torch's own error, chained
    # All samples in one chunk: torch's shape is the inputs', nothing to explain.
    with pytest.raises(ModelForwardError) as err:
        compute_erf(net, x, chunk_size=None)
    assert "batch size" not in str(err.value)


@pytest.mark.parametrize(
    ("message", "origin"),
    [
        ("expected 3-channel images", "model"),
        ("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB", None),
        ("CUDA out of memory. Tried to allocate 2 GiB", None),
    ],
)
def test_running_out_of_memory_is_nobodys_input_error(message, origin):
    def fail() -> None:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError) as err:
        fail()
    assert _origin(err.value) == origin


def test_the_models_own_errors_pass_unchanged():
    # Only torch's complaints get the account of the inputs: the model's code speaks for
    # itself, and may fail for reasons that have nothing to do with the inputs.
    class Checks(nn.Module):
        def __init__(self, error: type[Exception]) -> None:
            super().__init__()
            self.conv, self.error = nn.Conv2d(1, 1, 3), error

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise self.error("expected 3-channel images")

    for error in (ValueError, RuntimeError):
        with pytest.raises(error, match=r"^expected 3-channel images$") as err:
            compute_erf(Checks(error), torch.randn(2, 1, 8, 8))
        assert type(err.value) is error


def test_layer_with_more_spatial_dims_than_the_input_hints_at_the_batch_dimension():
    class Lift(nn.Module):  # no conv to catch it early: the probed output has the wrong rank
        def forward(self, x):
            return x.unsqueeze(0) * 2

    with pytest.raises(UnbatchedInputError, match="add the batch dimension"):
        compute_erf(Lift(), torch.randn(3, 8, 8))


def test_a_1d_model_still_takes_1d_inputs():
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1))
    m = compute_erf(net, torch.randn(5, 2, 32))["output"]
    assert m.grad.shape == (32,) and m.status == "ok"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_name_how_many_samples(bad):
    x = torch.randn(6, 1, 8, 8)
    x[1, 0, 2, 3] = bad
    x[4, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 of 6 samples \(indices \[1, 4\]\)"):
        compute_erf(nn.Conv2d(1, 1, 3), x)


def test_finite_inputs_whose_sums_overflow_are_finite():
    # The per-sample sums that find NaN/Inf overflow here although every value is finite.
    x = torch.full((3, 1, 8, 8), 3e38)
    assert compute_erf(nn.Conv2d(1, 1, 3), x)["output"].status == "ok"  # no ValueError
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 3 samples \(indices \[1\]\)"):
        compute_erf(nn.Conv2d(1, 1, 3), x)


class _RefusesNaN(nn.Module):
    """A model that checks its activations, as some training code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        h = self.conv(x)
        if not bool(torch.isfinite(h).all()):
            raise RuntimeError("activations are not finite")
        return h


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_inputs_raise_whether_checked_before_or_after_the_probe(monkeypatch, deferred):
    # On a GPU the check is read after the probe (reading it first waits for the device): the
    # same error, also when the NaN made the model itself fail first, and the same maps.
    from erf_callback.engine import compute

    monkeypatch.setattr(compute, "_defers_finite_check", lambda inputs: deferred)
    x = torch.randn(6, 1, 8, 8)
    x[2, 0, 1, 1] = float("nan")
    for net in (nn.Conv2d(1, 1, 3), _RefusesNaN()):
        with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 6 samples \(indices \[2\]\)"):
            compute_erf(net, x)
    finite = x[[0, 1, 3, 4, 5]].double()
    net = nn.Conv2d(1, 1, 3).double()
    got = compute_erf(net, finite)["output"]
    monkeypatch.setattr(compute, "_defers_finite_check", lambda inputs: not deferred)
    assert got.status == "ok" and torch.equal(got.grad, compute_erf(net, finite)["output"].grad)


@pytest.mark.parametrize(
    "position", [(3.5, 2), (3.0, 2), ("3", 2), 3, np.array([1.5, 2.0]), {"output": (1, 2.2)}]
)
def test_non_integer_positions_are_refused_not_truncated(position):
    with pytest.raises(ValueError, match="position"):
        compute_erf(nn.Conv2d(1, 1, 3), torch.randn(1, 1, 8, 8), position=position)


def test_integer_like_positions_are_accepted():
    x = torch.randn(1, 1, 8, 8)
    a = compute_erf(nn.Conv2d(1, 1, 1), x, position=np.array([2, 5]))["output"]
    assert a.position == (2, 5)
    b = compute_erf(nn.Conv2d(1, 1, 1), x, position=(np.int64(2), 5))["output"]
    assert b.position == (2, 5)


@pytest.mark.parametrize(
    "channels", [1.5, True, [0, 0], [], [0, 1.0], "0", (2, -2, 2), torch.tensor(True), {0, 1}]
)
def test_bad_channels_say_what_is_allowed(channels):
    with pytest.raises(ValueError, match="channels must be an int or a non-empty sequence"):
        compute_erf(nn.Conv2d(1, 4, 3), torch.randn(1, 1, 8, 8), channels=channels)


def test_good_channels_still_work():
    net, x = nn.Conv2d(1, 4, 3), torch.randn(2, 1, 8, 8)
    one = compute_erf(net, x, channels=np.int64(1))["output"].grad
    two = compute_erf(net, x, channels=[1, 2])["output"].grad
    assert one.shape == two.shape == (8, 8)


@pytest.mark.parametrize("picked", [torch.tensor(2), np.array(2), torch.tensor([2])])
def test_a_channel_picked_by_a_tensor_op_is_that_channel(picked):
    # logits.argmax() gives a 0-d tensor: the channel it holds, not an error.
    net, x = nn.Conv2d(1, 4, 3), torch.randn(2, 1, 8, 8)
    want = compute_erf(net, x, channels=2)["output"].grad
    got = compute_erf(net, x, channels=picked)["output"].grad
    assert torch.equal(got, want)
    other = compute_erf(net, x, channels=1)["output"].grad
    assert not torch.equal(got, other)


@pytest.mark.parametrize("chunk", [2.5, True, 0, -1, "big", 2.0])
def test_bad_chunk_size(chunk):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, 'auto' or None"):
        compute_erf(nn.Conv2d(1, 1, 3), torch.randn(2, 1, 8, 8), chunk_size=chunk)


@pytest.mark.parametrize("budget", [0, 1.5, True, "1GB"])
def test_bad_memory_budget(budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        ProbeConfig(memory_budget=budget)


def test_model_on_the_meta_device_is_refused_up_front():
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        compute_erf(net, torch.randn(1, 1, 8, 8))


class _ScriptedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))

    def forward(self, x):
        return self.block(self.stem(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_a_torchscript_model_is_refused_with_the_way_out():
    # Before: AttributeError "'OrderedModuleDict' object has no attribute 'get'" (scripted
    # and traced models alike); past that, the guard could not restore its buffer tables.
    from erf_callback.engine.layers import deepest_spatial_layer

    x = torch.randn(2, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    for model, where in (
        (torch.jit.script(net), "the model is"),
        (torch.jit.trace(net.eval(), x), "the model is"),
        (_ScriptedBlock(), "submodule 'block' is"),
    ):
        for probe in (
            lambda m=model: compute_erf(m, x),
            lambda m=model: compute_erf(m, x, layers=["output"]),
            lambda m=model: deepest_spatial_layer(m, x),
        ):
            with pytest.raises(TypeError, match=rf"{where} a TorchScript module.*eager nn\.Module"):
                probe()
    # The eager model it was made from is probed as usual.
    assert compute_erf(net, x)["output"].status == "ok"


def test_metrics_none_means_the_default_metric_config():
    from erf_callback import MetricConfig, ProbeConfig

    custom = ProbeConfig(metrics=MetricConfig(radius_factor=1.0))
    assert custom.replace(metrics=None).metrics == MetricConfig()
    assert custom.replace().metrics.radius_factor == 1.0  # nothing given: kept


class _NeedsTwoArguments(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale):
        return self.backbone(x * scale)


class _OptionalArgument(_NeedsTwoArguments):
    def forward(self, x, scale=2.0):  # type: ignore[override]
        return super().forward(x, scale)


def test_a_forward_that_needs_more_than_the_input_names_the_way_out():
    # Before: the forward's own "missing 1 required positional argument: 'scale'", from the
    # middle of the probe (and from the callback's search for the deepest layer).
    from erf_callback.engine.layers import deepest_spatial_layer

    x = torch.randn(2, 3, 8, 8)
    for probe in (
        lambda: compute_erf(_NeedsTwoArguments(), x),
        lambda: deepest_spatial_layer(_NeedsTwoArguments(), x),
    ):
        with pytest.raises(TypeError, match=r"forward\(x, scale\) cannot be called with the input"):
            probe()
    with pytest.raises(TypeError, match=r"its submodules: 'backbone'.*module='<name>'"):
        compute_erf(_NeedsTwoArguments(), x)
    # The way out works, and defaults are no obstacle.
    assert compute_erf(_NeedsTwoArguments().backbone, x)["output"].status == "ok"
    assert compute_erf(_OptionalArgument(), x)["output"].status == "ok"


@pytest.mark.parametrize(
    ("inputs", "hint"),
    [
        ([torch.randn(3, 16, 16), torch.randn(3, 16, 16)], r"torch\.stack\(images\)"),
        (np.zeros((2, 3, 16, 16), dtype=np.float32), r"torch\.from_numpy\(inputs\)"),
        ("images/", r"got str\.$"),
    ],
)
def test_inputs_that_are_not_a_tensor_say_how_to_make_one(inputs, hint):
    net = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(TypeError, match=r"inputs must be a torch\.Tensor .*" + hint):
        compute_erf(net, inputs)


def test_an_exported_module_probes_its_output_and_names_why_its_layers_cannot_be():
    # torch.export's module runs the layers' operations inline: before, the "never called"
    # error suggested a branch not taken.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    exported = torch.export.export(
        net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
    ).module()
    with pytest.raises(ValueError, match=r"never called \['2'\].*torch\.export.*eager model"):
        compute_erf(exported, x, layers=["2"])
    got, want = compute_erf(exported, x)["output"], compute_erf(net, x)["output"]
    assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-9)


def test_a_model_made_under_inference_mode_is_refused_and_left_as_it_was():
    # Before: the guard's restore raised "Setting requires_grad=True on inference tensor
    # outside InferenceMode" half-way, and left the parameters with requires_grad False.
    with torch.inference_mode():
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"7 parameters/buffers made under torch\.inference_mode"):
        compute_erf(net, x)
    assert all(p.requires_grad for p in net.parameters())
    # The way out that the message gives works.
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    assert compute_erf(net, x)["output"].status == "ok"


def test_a_module_given_for_its_name_is_told_the_name():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3)))
    x = torch.randn(2, 3, 16, 16)
    for layers, name in (([net[0]], "'0'"), (net[2][0], "'2.0'"), (["0", net[2]], "'2'")):
        with pytest.raises(TypeError, match=rf"got the module \w+: pass its name, {name}"):
            compute_erf(net, x, layers)
    with pytest.raises(TypeError, match=r"pass its name in model\.named_modules\(\)"):
        compute_erf(net, x, [nn.Conv2d(3, 4, 3)])  # not a part of the model
    # ERFMonitor gets its layers before the model: the message says how to find the name.
    from erf_callback import ERFMonitor

    with pytest.raises(TypeError, match=r"not modules.*model\.named_modules\(\)"):
        ERFMonitor(layers=[net[0]])


def test_a_set_of_layer_names_is_probed_in_sorted_order():
    # A set's order of iteration changes from run to run (string hashing is salted): the maps,
    # the tags and the history columns would too.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    maps = compute_erf(net, torch.randn(2, 3, 16, 16), {"3", "0", "2"})
    assert list(maps) == ["0", "2", "3"]
    assert normalize_layers(frozenset({"b", "a"})) == ["a", "b"]

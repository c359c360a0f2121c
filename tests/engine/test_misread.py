"""Inputs without their batch or channel axis: the error names the reading the model takes.

An unbatched image ``(C, H, W)``, grey images ``(N, H, W)`` for a model that takes ``(N, 1, H,
W)``, raw signals ``(N, L)`` for one that takes ``(N, 1, L)``: compute_erf reads each wrongly
and the model fails. The error must name the fix that works for *this* model (the fix it
names is applied and must give a map), leave the model as it was, and keep the first error
where no other reading fits.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine.validate import ModelForwardError, UnbatchedInputError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _net(dims: int, channels: int, norm_first: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [NORM[dims](channels)] if norm_first else []
    layers += [CONV[dims](channels, 4, 3), nn.ReLU(), CONV[dims](4, 4, 3)]
    return nn.Sequential(*layers).eval()


# (model dims, its input channels, norm first, the inputs' shape, the error, the fix named)
CASES = [
    (2, 3, False, (3, 20, 20), UnbatchedInputError, "inputs.unsqueeze(0)"),
    (2, 3, True, (3, 20, 20), UnbatchedInputError, "inputs.unsqueeze(0)"),
    (2, 1, False, (6, 20, 20), ValueError, "inputs.unsqueeze(1)"),
    (2, 1, True, (6, 20, 20), ValueError, "inputs.unsqueeze(1)"),
    (2, 1, False, (20, 20), UnbatchedInputError, "inputs[None, None]"),
    (1, 3, False, (3, 40), UnbatchedInputError, "inputs.unsqueeze(0)"),
    (1, 1, False, (5, 40), ValueError, "inputs.unsqueeze(1)"),
    (1, 1, True, (5, 40), ValueError, "inputs.unsqueeze(1)"),
    (3, 2, False, (2, 9, 9, 9), UnbatchedInputError, "inputs.unsqueeze(0)"),
    (3, 1, False, (4, 9, 9, 9), ValueError, "inputs.unsqueeze(1)"),
    (3, 1, False, (9, 9, 9), UnbatchedInputError, "inputs[None, None]"),
]


def _apply(fix: str, inputs: torch.Tensor) -> torch.Tensor:
    return {
        "inputs.unsqueeze(0)": inputs.unsqueeze(0),
        "inputs.unsqueeze(1)": inputs.unsqueeze(1),
        "inputs[None, None]": inputs[None, None],
    }[fix]


@pytest.mark.parametrize(("dims", "channels", "norm_first", "shape", "kind", "fix"), CASES)
def test_the_error_names_the_reading_the_model_takes_and_it_works(
    dims, channels, norm_first, shape, kind, fix
):
    torch.manual_seed(0)
    net = _net(dims, channels, norm_first)
    if norm_first:
        net[0].running_mean.uniform_(-1, 1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()  # the checks of the other readings must leave the mode as found, too
    inputs = torch.randn(*shape)
    with pytest.raises(kind) as err:
        compute_erf(net, inputs, "2" if not norm_first else "3")
    message = str(err.value)
    assert type(err.value) is kind
    assert message.startswith(f"compute_erf read inputs of shape {shape} as "), message
    assert f"{fix} (shape {tuple(_apply(fix, inputs).shape)})" in message, message
    assert message.count(" or as ") == 0, message  # one reading fits these models
    assert err.value.__cause__ is not None  # the error of the first reading, chained
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # The fix it names gives a map.
    layer = "2" if not norm_first else "3"
    fixed = compute_erf(net, _apply(fix, inputs), layer)[layer]
    assert fixed.status == "ok" and fixed.grad.dim() == len(_apply(fix, inputs).shape) - 2


def test_inputs_no_reading_fits_keep_the_first_error():
    # Five channels for a 3-channel model: neither one image (5 channels) nor five grey images
    # (1 channel) fit; the layer's own message stands.
    with pytest.raises(UnbatchedInputError, match=r"^layer '0' \(Conv2d\) received an unbatched"):
        compute_erf(_net(2, 3), torch.randn(5, 20, 20))
    # (N, L) signals for a 3-channel 1-D model: torch's words, with the shape as given.
    with pytest.raises(ModelForwardError, match=re.escape("inputs of shape (4, 40) float32")):
        compute_erf(_net(1, 3), torch.randn(4, 40))


def test_models_that_do_not_keep_the_batch_axis_are_not_given_a_reading():
    # A model that adds a batch axis of its own, or keeps two samples, would run on any
    # reading: the readings are tried on three samples, where their outputs give them away.
    class Lift(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(0) * 2

    class KeepsTwo(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:2] * 2

    with pytest.raises(UnbatchedInputError, match=r"^layer 'output' gives an output of shape"):
        compute_erf(Lift(), torch.randn(4, 8, 8), chunk_size=None)
    with pytest.raises(ValueError, match=r"^layer 'output' gives an output of shape"):
        compute_erf(KeepsTwo(), torch.randn(5, 2, 8, 8), chunk_size=None)


def test_correct_inputs_and_configuration_errors_run_no_other_reading(monkeypatch):
    # Only the failures a misread input causes try the other readings: a wrong position is
    # the user's configuration, and correct inputs never pay for the check.
    from erf_callback.engine import misread

    tried: list[object] = []
    monkeypatch.setattr(misread, "_takes", lambda *a: tried.append(a) or False)
    net = _net(2, 3)
    with pytest.raises(ValueError, match="position"):
        compute_erf(net, torch.randn(2, 3, 20, 20), "2", position=(99, 0))
    assert compute_erf(net, torch.randn(2, 3, 20, 20), "2")["2"].status == "ok"
    assert tried == []


def test_a_model_that_writes_into_a_probed_output_is_read_as_in_a_probe():
    # torchvision's blocks write into bn1's output (in-place ReLU): the other readings are
    # tried as a probe runs them, with copies handed on, or the right one would fail there.
    from tests.helpers.nets import ResNet

    net = ResNet(width=4).eval()
    with pytest.raises(UnbatchedInputError, match=r"They fit the model as one image of 3 channels"):
        compute_erf(net, torch.randn(3, 32, 32), ["layer1.0.bn1", "layer2"])

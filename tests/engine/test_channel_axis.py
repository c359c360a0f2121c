"""Inputs in another layout than ``(N, C, *spatial)``, which the model rearranges itself:
without a channel axis (grayscale ``(N, H, W)``, raw audio ``(N, L)``; the model adds it with
``x.unsqueeze(1)``), and channels last (``(N, H, W, C)``; the model permutes). The map is
exactly what probing the model's convolutional part on ``(N, C, *spatial)`` inputs gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine.layers import deepest_spatial_layer
from erf_callback.engine.validate import UnbatchedInputError


class AddsChannel(nn.Module):
    """A network on inputs without a channel axis: ``forward`` adds it, then ``body`` runs."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1))


def grayscale_net() -> AddsChannel:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 5, padding=2),
    )
    with torch.no_grad():
        body[1].running_mean.uniform_(-0.3, 0.3)
        body[1].running_var.uniform_(0.5, 1.5)
    return AddsChannel(body).double()


def audio_net() -> AddsChannel:
    torch.manual_seed(1)
    body = nn.Sequential(
        nn.Conv1d(1, 4, 9, stride=4, padding=4), nn.ReLU(), nn.Conv1d(4, 4, 9, padding=4)
    )
    return AddsChannel(body).double()


@pytest.mark.parametrize(
    ("make", "shape", "layer"),
    [
        (grayscale_net, (6, 28, 30), "body.5"),  # (N, H, W)
        (audio_net, (5, 400), "body.2"),  # (N, L)
        (grayscale_net, (1, 28, 30), "body.3"),  # one image: N = 1
    ],
)
@pytest.mark.parametrize("optimize", [True, False])
def test_the_map_is_the_gradient_per_input_element(make, shape, layer, optimize):
    net = make()
    x = torch.randn(*shape, dtype=torch.float64)
    got = compute_erf(net, x, [layer], channels=[0, 2], optimize=optimize)[layer]
    inner = layer.removeprefix("body.")
    want = compute_erf(net.body, x.unsqueeze(1), [inner], channels=[0, 2])[inner]
    assert got.grad.shape == x.shape[1:]
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    assert (got.trf, got.location, got.position) == (want.trf, want.location, want.position)
    assert got.metrics() == pytest.approx(want.metrics(), rel=1e-9)
    # One sample, by hand: |d unit / d x| per input element (the model in eval mode).
    leaf = x[:1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(unit_of(net.eval(), leaf, layer, got.position), leaf)
    one = compute_erf(net, x[:1], [layer], channels=[0, 2])[layer].grad
    torch.testing.assert_close(one, grad.abs()[0], rtol=1e-12, atol=1e-15)


def unit_of(net: nn.Module, x: torch.Tensor, layer: str, position: tuple[int, ...]) -> torch.Tensor:
    """The probed unit: channels 0 and 2 of ``layer``'s output at ``position``, summed."""
    seen: list[torch.Tensor] = []
    hook = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        net(x)
    finally:
        hook.remove()
    return seen[0][(0, [0, 2], *position)].sum()


def test_a_repeated_probe_starts_without_a_channel_axis_and_reuses_its_trace():
    net = grayscale_net()
    x = torch.randn(8, 28, 28, dtype=torch.float64)
    calls: list[tuple[int, ...]] = []
    net.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    first = compute_erf(net, x, ["body.5"])["body.5"]
    # Read as (N, C, L) first, one traced sample shows the layer's extra axis; then again
    # without the channel axis: traced sample, then the rest in one chunk.
    assert calls == [(1, 28, 28), (1, 28, 28), (7, 28, 28)]
    calls.clear()
    again = compute_erf(net, x, ["body.5"])["body.5"]
    assert calls == [(8, 28, 28)]  # known layout, remembered trace: one chunk
    torch.testing.assert_close(again.grad, first.grad, rtol=1e-12, atol=1e-15)


def test_inputs_with_a_channel_axis_keep_their_reading():
    # (N, C, L) into a 1-D model: channels summed, as always.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(28, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1))
    m = compute_erf(net, torch.randn(3, 28, 20), ["2"])["2"]
    assert m.grad.shape == (20,)


def test_the_default_layer_of_a_network_without_channel_axis():
    net = grayscale_net()
    assert deepest_spatial_layer(net, torch.randn(2, 16, 16, dtype=torch.float64)) == "body"
    assert deepest_spatial_layer(audio_net(), torch.randn(2, 64, dtype=torch.float64)) == "body"


def test_a_model_that_adds_a_batch_axis_is_refused_not_summed_over_samples():
    class Lift(nn.Module):  # takes one unbatched image: its leading axis is its own
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(0) * 2

    with pytest.raises(UnbatchedInputError, match=r"shape \(1, 4, 8, 8\) for a chunk of 4"):
        compute_erf(Lift(), torch.randn(4, 8, 8), chunk_size=None)

    class DropsSamples(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:2] * 2

    with pytest.raises(ValueError, match=r"\(2, 2, 8, 8\) for a chunk of 5 .* keep the batch axis"):
        compute_erf(DropsSamples(), torch.randn(5, 2, 8, 8), chunk_size=None)


def test_one_image_without_batch_and_channel_axes_is_told_to_add_both():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(UnbatchedInputError, match=r"inputs\[None, None\]"):
        compute_erf(net, torch.randn(24, 24))
    assert compute_erf(net, torch.randn(24, 24)[None, None])["output"].status == "ok"


class PermutesChannels(nn.Module):
    """A network on channels-last inputs ``(N, *spatial, C)``: ``forward`` moves them."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.movedim(-1, 1))


@pytest.mark.parametrize(
    ("body", "shape", "layer"),
    [
        (
            nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2)),
            (5, 24, 20, 6),
            "body.2",
        ),  # (N, H, W, C), C = 6
        (nn.Sequential(nn.Conv1d(4, 4, 5, padding=2)), (4, 90, 4), "body.0"),  # (N, L, C)
        (
            nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 3, 3)).double(),
            (2, 9, 10, 11, 2),
            "body.2",
        ),  # (N, D, H, W, C)
    ],
)
def test_channels_last_inputs_are_probed_in_the_models_layout(body, shape, layer):
    torch.manual_seed(3)
    body = body.double()
    net = PermutesChannels(body)
    x = torch.randn(*shape, dtype=torch.float64)
    got = compute_erf(net, x, [layer])[layer]
    inner = layer.removeprefix("body.")
    want = compute_erf(body, x.movedim(-1, 1), [inner])[inner]
    assert got.grad.shape == x.shape[1:-1]
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    assert (got.trf, got.location, got.position) == (want.trf, want.location, want.position)
    # by hand, one sample: |d unit / d x| summed over the last axis
    leaf = x[:1].clone().requires_grad_(True)
    seen: list[torch.Tensor] = []
    hook = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(o))
    net.eval()(leaf)
    hook.remove()
    (grad,) = torch.autograd.grad(seen[0][(0, slice(None), *got.position)].sum(), leaf)
    one = compute_erf(net, x[:1], [layer])[layer].grad
    torch.testing.assert_close(one, grad.abs()[0].sum(-1), rtol=1e-12, atol=1e-15)


def test_a_model_that_takes_its_inputs_as_given_keeps_them_so():
    # A ViT-like path (patchify, flatten to tokens, back to a grid) loses the trace of its
    # spatial axes; read channels last, it does not find them either: (N, C, H, W) stands.
    from erf_callback import tokens_to_grid

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(self.patch(x).flatten(2).transpose(1, 2))

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m = compute_erf(Tokens().double(), x, ["mix"], output_transform=tokens_to_grid((8, 8), 0))
    assert m["mix"].grad.shape == (32, 32)


class Flat(nn.Module):
    """A network on flat inputs ``(N, C * H * W)``: ``forward`` views them as images."""

    def __init__(self, body: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.body, self.shape = body, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, *self.shape))


@pytest.mark.parametrize("chunk_size", ["auto", None])
@pytest.mark.parametrize(
    ("channels", "size"),
    [(1, (28, 28)), (3, (16, 20))],  # flat MNIST (N, 784); flat RGB (N, 960)
)
def test_flat_inputs_are_probed_as_the_model_views_them(channels, size, chunk_size):
    torch.manual_seed(4)
    body = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
    ).double()
    net = Flat(body, (channels, *size))
    x = torch.randn(5, channels * size[0] * size[1], dtype=torch.float64)
    got = compute_erf(net, x, ["body.2"], chunk_size=chunk_size)["body.2"]
    want = compute_erf(body, x.view(-1, channels, *size), ["2"])["2"]
    assert got.grad.shape == size  # one map pixel per input element, row-major as the view
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    assert (got.trf, got.location, got.position) == (want.trf, want.location, want.position)
    assert deepest_spatial_layer(net, x) == "body"


def test_flat_inputs_through_unflatten():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 12, 12)), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3)
    ).double()
    x = torch.randn(4, 144, dtype=torch.float64)
    got = compute_erf(net, x, ["3"])["3"]
    want = compute_erf(net[1:], x.view(-1, 1, 12, 12), ["3"])["3"]
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    assert got.trf == want.trf == (5.0, 5.0)

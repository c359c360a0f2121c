"""compute_erf against its definition, sample by sample, on randomly built networks.

Each network is a random stack of 1-, 2- or 3-D blocks (plain, strided, dilated and grouped
convolutions with and without bias, conv + BatchNorm + activation, residual blocks with an
identity or a 1x1 shortcut, depthwise-separable blocks, max and average pooling, nearest and
linear up-sampling, activations), with non-trivial BatchNorm statistics, left in training
mode half the time. The probe picks a random layer (or the model's output), a random unit, a
random subset of channels, a reduction, a chunk size and ``optimize``. The reference is the
definition in docs/engine.md, one sample at a time, in eval mode: ``u_n`` the sum over the
channels of the layer's output at the unit, and the map ``(1/N) sum_n sum_k |du_n/dx_n[k]|``
(or the ReLU'd ``replknet`` form). Float64 throughout, so that no ReLU or max-pool decision
within rounding of a tie can route a sample differently in the two computations.

The fast path (BatchNorm folded into copies of the convolutions, channels_last) and the
chunking must leave every map as the definition gives it, on any such network.
"""

from __future__ import annotations

import random
import warnings
from typing import Literal

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from erf_callback import compute_erf

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {
    "max": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d},
}
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _conv(d: int, cin: int, cout: int, k: int, **kw: object) -> nn.Module:
    dilation = int(kw.pop("dilation", 1))  # type: ignore[call-overload]
    padding = kw.pop("padding", (k // 2) * dilation)
    return CONV[d](cin, cout, k, padding=padding, dilation=dilation, **kw)  # type: ignore[arg-type]


def _block(rng: random.Random, d: int, c: int) -> tuple[list[nn.Module], int]:
    kind = rng.choice(["conv", "conv_bn", "residual", "pool", "depthwise", "upsample", "act"])
    out = rng.choice([4, 6, 8])
    if kind == "conv":
        k = rng.choice([1, 2, 3, 5])
        groups = 2 if c % 2 == 0 and out % 2 == 0 and rng.random() < 0.3 else 1
        conv = _conv(
            d,
            c,
            out,
            k,
            stride=rng.choice([1, 1, 2]),
            dilation=rng.choice([1, 1, 2]),
            padding=rng.choice([0, 1]) if k > 1 and rng.random() < 0.5 else (k // 2),
            groups=groups,
            bias=rng.random() < 0.7,
        )
        return [conv], out
    if kind == "conv_bn":
        return [_conv(d, c, out, 3, bias=rng.random() < 0.5), NORM[d](out), nn.ReLU()], out
    if kind == "residual":
        body = nn.Sequential(
            _conv(d, c, c, 3, bias=False), NORM[d](c), nn.GELU(), _conv(d, c, c, 3)
        )
        shortcut = nn.Identity() if rng.random() < 0.5 else _conv(d, c, c, 1)
        return [Residual(body, shortcut)], c
    if kind == "pool":
        return [POOL[rng.choice(["max", "avg"])][d](2)], c
    if kind == "depthwise":
        k = rng.choice([3, 5, 7])
        return [_conv(d, c, c, k, groups=c), NORM[d](c), _conv(d, c, out, 1)], out
    if kind == "upsample":
        mode = rng.choice(["nearest", LINEAR_MODE[d]])
        return [nn.Upsample(scale_factor=2, mode=mode)], c
    return [rng.choice([nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.LeakyReLU(0.1)])], c


def random_network(rng: random.Random, d: int) -> tuple[nn.Sequential, int]:
    cin = rng.choice([1, 3])
    layers, c = [], cin
    for _ in range(rng.randint(2, 5)):
        block, c = _block(rng, d, c)
        layers += block
    net = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(n, generator=g, dtype=torch.float64))
    net.train(rng.random() < 0.5)
    return net, cin


def probed_output(net: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The tensor a probe of ``layer`` reads: the module's output (its first call), or the
    model's output for ``"output"``."""
    if layer == "output":
        return net(x)
    seen: list[torch.Tensor] = []
    hook = dict(net.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: seen.append(out)
    )
    try:
        net(x)
    finally:
        hook.remove()
    return seen[0]


def by_definition(
    net: nn.Module,
    x: torch.Tensor,
    layer: str,
    position: tuple[int, ...],
    channels: list[int] | None,
    reduction: str,
) -> torch.Tensor:
    """The map of docs/engine.md's table, one sample at a time, in eval mode."""
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    index = (0, slice(None), *position)
    for sample in x:
        leaf = sample[None].clone().requires_grad_(True)
        unit = probed_output(net, leaf, layer)[index]
        if channels is not None:
            unit = unit[channels]
        if reduction == "replknet":
            unit = F.relu(unit)
        (grad,) = torch.autograd.grad(unit.sum(), leaf)
        total += (grad.abs() if reduction == "abs" else F.relu(grad))[0].sum(0)
    return total / len(x)


@pytest.mark.parametrize("seed", range(4))
def test_random_networks_match_the_per_sample_definition(seed: int) -> None:
    rng = random.Random(seed)
    checked = 0
    while checked < 6:
        d = rng.choice([1, 2, 2, 3])
        net, cin = random_network(rng, d)
        side = {1: rng.randint(24, 64), 2: rng.randint(14, 32), 3: rng.randint(9, 13)}[d]
        shape = [side + rng.randint(-3, 3) for _ in range(d)]
        x = torch.randn(rng.randint(1, 5), cin, *shape, dtype=torch.float64)
        layer = rng.choice([n for n, _ in net.named_children()] + ["output"])
        mode = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = probed_output(net, x[:1], layer).shape
        except RuntimeError:  # a kernel larger than the (padded) input: not a network
            continue
        finally:
            net.train(mode)
        position = tuple(rng.randrange(n) for n in out[2:])
        channels = None
        if rng.random() < 0.7:
            channels = sorted(rng.sample(range(out[1]), rng.randint(1, out[1])))
        reduction: Literal["abs", "replknet"] = rng.choice(["abs", "abs", "replknet"])
        with warnings.catch_warnings(record=True):  # a zero map warns; checked below
            warnings.simplefilter("always")
            maps = compute_erf(
                net,
                x,
                None if layer == "output" else layer,
                position=position,
                channels=channels,
                reduction=reduction,
                chunk_size=rng.choice(["auto", 1, 2, None]),
                optimize=rng.random() < 0.8,
            )
        got = maps[layer].grad
        assert net.training == mode  # the probe ran in eval mode and put the mode back
        net.eval()
        want = by_definition(net, x, layer, position, channels, reduction)
        net.train(mode)
        scale = float(want.abs().max())
        # A unit whose gradient is zero everywhere (a dead ReLU, ReLU'd replknet units) is
        # reported as such, with the zero map.
        assert (maps[layer].status == "zero") == (scale == 0.0), maps[layer].status
        assert torch.allclose(got, want, rtol=0, atol=1e-12 * max(scale, 1e-300)), (
            f"{net}\nlayer {layer!r}, position {position}, channels {channels}, "
            f"{reduction}: max |diff| {float((got - want).abs().max()):.3e} of {scale:.3e}"
        )
        checked += 1

"""Small models in plain torch for the tests and benchmarks (torchvision does not install on
our machines), and the closed form of uniform conv stacks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


IntOrAxes = int | Sequence[int]


def uniform_stack(
    kernels: Sequence[IntOrAxes],
    dilations: Sequence[IntOrAxes] | None = None,
    strides: Sequence[IntOrAxes] | None = None,
    dims: int = 2,
) -> nn.Sequential:
    """Convs with all-one weights, no bias and 'same'-style padding: the ERF has a closed form
    (:func:`stack_closed_form`). Entries are ints or one int per axis (anisotropic kernels)."""
    n = len(kernels)
    layers = []
    for k, d, s in zip(kernels, dilations or [1] * n, strides or [1] * n, strict=True):
        ks, ds = _per_axis(k, 1, dims), _per_axis(d, 1, dims)
        padding = tuple(di * (ki - 1) // 2 for ki, di in zip(ks, ds, strict=True))
        conv = _CONV[dims](1, 1, ks, stride=s, dilation=ds, padding=padding, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        layers.append(conv)
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class AxisForm:
    """Closed form of one axis of a conv stack (REFERENCE.md, "Closed form for tests").

    Attributes:
        start: input coordinate of the first pixel seen by output unit 0 (``-sum p_l j_l``).
        jump: input pixels between neighbouring output units (product of the strides).
        trf: theoretical receptive field width, ``1 + sum (k_l - 1) d_l j_l``.
        variance: ERF variance of a stack with uniform positive weights,
            ``sum (j_l d_l)^2 (k_l^2 - 1) / 12`` (the variance of ``sum j_l d_l U_l``).
    """

    start: float
    jump: float
    trf: float
    variance: float


def _per_axis(value: IntOrAxes | None, default: int, dims: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * dims
    return tuple(value) if isinstance(value, Sequence) else (value,) * dims


def stack_closed_form(
    kernels: Sequence[IntOrAxes],
    dilations: Sequence[IntOrAxes] | None = None,
    strides: Sequence[IntOrAxes] | None = None,
    paddings: Sequence[IntOrAxes] | None = None,
    dims: int | None = None,
) -> list[AxisForm]:
    """Per-axis start, jump, TRF and uniform-weight ERF variance of a stack of convolutions.

    The argument order is that of :func:`uniform_stack`. Each per-layer entry is an int
    (same on every axis) or one int per axis; ``None`` lists mean stride 1, dilation 1,
    padding 0. ``j_l`` is the product of the strides before layer l.

    Example:
        >>> [(a.trf, a.variance) for a in stack_closed_form([3, 3, 3])]  # 3 x (3^2 - 1) / 12
        [(7.0, 2.0)]
        >>> stack_closed_form([7, 3], strides=[2, 2], paddings=[3, 1])[0].start
        -5.0
    """
    n = len(kernels)
    if dims is None:
        tuples = [
            v for v in (*kernels, *(strides or ()), *(dilations or ())) if not isinstance(v, int)
        ]
        dims = len(tuples[0]) if tuples else 1
    ks = [_per_axis(k, 1, dims) for k in kernels]
    ss = [_per_axis(v, 1, dims) for v in (strides or [None] * n)]
    ds = [_per_axis(v, 1, dims) for v in (dilations or [None] * n)]
    ps = [_per_axis(v, 0, dims) for v in (paddings or [None] * n)]
    out = []
    for ax in range(dims):
        start, jump, trf, var = 0.0, 1.0, 1.0, 0.0
        for k, s, d, p in zip(ks, ss, ds, ps, strict=True):
            start -= p[ax] * jump
            trf += (k[ax] - 1) * d[ax] * jump
            var += (jump * d[ax]) ** 2 * (k[ax] ** 2 - 1) / 12
            jump *= s[ax]
        out.append(AxisForm(start, jump, trf, var))
    return out


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """torchvision's projection shortcut (1x1 conv + BN) where the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (in-place residual add, 1x1 strided shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class ResNet(nn.Module):
    """torchvision-style ResNet-18 layout with configurable width."""

    def __init__(self, width: int = 8, blocks=(2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            stage += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.dropout = nn.Dropout(0.2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class KeepsAndWrites(nn.Module):
    """Keeps a reference to a layer's output and writes into it after the next layer ran."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.kept: list[torch.Tensor] = []
        self.a.register_forward_hook(lambda _m, _i, out: self.kept.append(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept.clear()
        y = self.b(self.a(x))
        self.kept[0].mul_(2)
        return y + self.kept[0].sum()


def relu_stack(depth: int, channels: int = 8, kernel: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, channels, kernel, padding=kernel // 2)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2)]
    return nn.Sequential(*layers)


# One layer of conv_net: (out channels, kernel, stride, dilation, activation, BatchNorm after).
ConvSpec = tuple[int, int, int, int, str, bool]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "id": nn.Identity}


def conv_net(spec: Sequence[ConvSpec], in_channels: int = 3) -> nn.Sequential:
    """A plain 2-D conv stack in eval mode, layer by layer as ``spec`` says ('same'-style
    padding; activation "relu", "gelu" or "id"; default init from torch's current RNG)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for out, k, stride, dilation, act, norm in spec:
        pad = dilation * (k - 1) // 2
        layers.append(nn.Conv2d(channels, out, k, stride=stride, dilation=dilation, padding=pad))
        layers.append(_ACTIVATIONS[act]())
        if norm:
            layers.append(nn.BatchNorm2d(out))
        channels = out
    return nn.Sequential(*layers).eval()


def randomize_bn_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine terms, as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return net


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: 1x1 reduce, 3x3 (stride here), 1x1 expand by 4."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


def resnet50(width: int = 64, num_classes: int = 10) -> ResNet:
    """torchvision's ResNet-50 layout (3, 4, 6, 3 bottlenecks; 25M parameters at width 64)."""
    net = ResNet(width=width, num_classes=num_classes)
    cin = width
    for i, n in enumerate((3, 4, 6, 3)):
        w = width * 2**i
        stage = [Bottleneck(cin, w, 1 if i == 0 else 2)]
        stage += [Bottleneck(4 * w, w, 1) for _ in range(n - 1)]
        setattr(net, f"layer{i + 1}", nn.Sequential(*stage))
        cin = 4 * w
    net.fc = nn.Linear(cin, num_classes)
    return net

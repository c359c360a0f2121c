"""Small models in plain torch for the tests (torchvision does not install on our machines)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def uniform_stack(
    kernels: list[int],
    dilations: list[int] | None = None,
    strides: list[int] | None = None,
    dims: int = 2,
) -> nn.Sequential:
    """Convs with all-one weights and no bias: the ERF has a closed form."""
    dilations = dilations or [1] * len(kernels)
    strides = strides or [1] * len(kernels)
    layers = []
    for k, d, s in zip(kernels, dilations, strides, strict=True):
        conv = _CONV[dims](1, 1, k, stride=s, dilation=d, padding=d * (k - 1) // 2, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        layers.append(conv)
    return nn.Sequential(*layers)


def closed_form(kernels, dilations=None, strides=None) -> tuple[float, int]:
    """Per-axis variance and TRF width of a uniform stack (REFERENCE.md)."""
    dilations = dilations or [1] * len(kernels)
    strides = strides or [1] * len(kernels)
    var, trf, jump = 0.0, 1, 1
    for k, d, s in zip(kernels, dilations, strides, strict=True):
        var += (jump * d) ** 2 * (k * k - 1) / 12
        trf += (k - 1) * d * jump
        jump *= s
    return var, trf


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """torchvision's projection shortcut (1x1 conv + BN) where the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
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


def relu_stack(depth: int, channels: int = 8, kernel: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, channels, kernel, padding=kernel // 2)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2)]
    return nn.Sequential(*layers)


def gaussian_map(shape, mean, cov) -> torch.Tensor:
    """A sampled (unnormalised) Gaussian on a grid, float64."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    delta = torch.stack([g - m for g, m in zip(grids, mean, strict=True)], dim=-1)
    prec = torch.linalg.inv(torch.as_tensor(cov, dtype=torch.float64))
    d2 = torch.einsum("...i,ij,...j->...", delta, prec, delta)
    return torch.exp(-0.5 * d2)


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

"""Torchvision models: the ERF of every ResNet stage, and the exact theoretical RF beside it.

Needs ``torchvision`` (``pip install torchvision``); without it the example says so and exits
cleanly. ``--pretrained`` loads torchvision's ImageNet weights (downloaded on first use);
the default is random weights, which need no network.

Known theoretical receptive fields (torchvision ResNet-18, centre unit): 43 px after layer1,
99 after layer2, 211 after layer3, 435 after layer4; the ERF is a fraction of them.

Run:  python examples/torchvision_models.py --model resnet18 --size 224
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

import torch

from erf_callback import compute_erf

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
#: Theoretical RF of the centre unit of torchvision's ResNet-18 stages (square, in pixels).
RESNET18_TRF = {"layer1": 43, "layer2": 99, "layer3": 211, "layer4": 435}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]] | None:
    """Probe the four stages; returns ``{layer: metrics}``, or None without torchvision."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models ResNet name")
    parser.add_argument("--size", type=int, default=224, help="input side (pixels)")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights (download)")
    args = parser.parse_args(argv)
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError:
        print("torchvision is not installed: `pip install torchvision` to run this example.")
        return None

    weights = "DEFAULT" if args.pretrained else None
    torch.manual_seed(0)
    net = getattr(models, args.model)(weights=weights)
    inputs = torch.randn(args.num_samples, 3, args.size, args.size)
    maps = compute_erf(net, inputs, LAYERS)
    result = {name: m.metrics() for name, m in maps.items()}
    print(f"{args.model}, {args.size}x{args.size} noise inputs, {args.num_samples} samples")
    print(f"{'layer':8s} {'TRF':>5s} {'ERF radius':>10s} {'ERF/TRF':>8s} {'border mass':>11s}")
    for name, mt in result.items():
        print(
            f"{name:8s} {mt['trf_x']:5g} {mt['radius']:10.2f} {mt['erf_trf_ratio']:8.3f} "
            f"{mt['border_mass']:11.3f}"
        )
    return result


if __name__ == "__main__":
    main()

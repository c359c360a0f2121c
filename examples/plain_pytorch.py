"""Track the ERF in a plain PyTorch training loop: no Lightning, just ERFTracker + SummaryWriter.

The task needs context: a bright square sits somewhere on a noisy image, and the label says
whether it is in the top or the bottom half. Only the image border tells a convolution where
it is, so the units learn to look far and the ERF grows while the network learns.

Run:  python examples/plain_pytorch.py            (about a minute on a laptop CPU)
Then: tensorboard --logdir erf_plain_logs
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

from erf_callback import ERFTracker

LAYERS = ["features.2", "features.5", "features.8"]


def squares(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one bright 4x4 square; label 1 when it is in the bottom half."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, 1, size, size, generator=g)
    top = torch.randint(0, size - 4, (n,), generator=g)
    left = torch.randint(0, size - 4, (n,), generator=g)
    for i in range(n):
        x[i, 0, top[i] : top[i] + 4, left[i] : left[i] + 4] += 2.0
    return x, (top + 2 >= size // 2).long()


def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Net(nn.Module):
    """Three conv-BN-ReLU stages (the middle one strided), global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*stage(1, 16, 1), *stage(16, 32, 2), *stage(32, 32, 1))
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """Train, tracking the ERF; returns ``{layer: (radius at init, radius at the end)}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="probe every N steps")
    parser.add_argument("--logdir", default="erf_plain_logs")
    parser.add_argument("--num-samples", type=int, default=32, help="probe inputs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    images, labels = squares(4096, seed=0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    writer = SummaryWriter(os.path.join(args.logdir, "squares"))
    # The probe set is fixed: every probe sees the same images, so a change of the ERF is a
    # change of the network.
    probe_inputs = images[: args.num_samples]
    tracker = ERFTracker(net, LAYERS, probe_inputs, writer, every_n_steps=args.every)
    g = torch.Generator().manual_seed(1)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
        tracker.step()  # probes when the schedule says so; logs scalars and images
    tracker.close()  # a last probe, the history files, a flush
    writer.close()

    result: dict[str, tuple[float, float]] = {}
    print("ERF radius (input pixels), initialisation -> end of training:")
    for layer in LAYERS:
        rows = [r for r in tracker.history.records if r["layer"] == layer and r["status"] == "ok"]
        result[layer] = (rows[0]["radius"], rows[-1]["radius"])
        print(f"  {layer:11s} {rows[0]['radius']:6.2f} -> {rows[-1]['radius']:6.2f}")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}; history in {tracker.history_dir}")
    return result


if __name__ == "__main__":
    main()

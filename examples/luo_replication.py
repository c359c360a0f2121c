"""Luo et al. (NeurIPS 2016), reproduced qualitatively: plain vs dilated vs strided vs large-kernel.

For random-weight CNNs of growing depth n it measures the ERF radius and the ERF/TRF ratio:

* the radius grows like sqrt(n) (a log-log slope near 0.5), so ERF/TRF shrinks like 1/sqrt(n);
* dilation and subsampling (stride) enlarge the ERF, and so does a larger kernel;
* training enlarges it: a plain CNN trained on a task that needs context (where is the bright
  square?) has a wider ERF than at initialisation.

It prints a table, writes it as ``luo_table.md`` and draws ``luo_replication.png``.

Run:  python examples/luo_replication.py --out erf_luo      (about a minute on a laptop CPU)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from erf_callback import compute_erf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_pytorch import squares

#: name -> (kernel, dilation, strided first two layers)
VARIANTS = {
    "plain 3x3": (3, 1, False),
    "dilated 3x3 (d=2)": (3, 2, False),
    "strided 3x3 (s=2 twice)": (3, 1, True),
    "large kernel 7x7": (7, 1, False),
}


def cnn(
    depth: int, kernel: int = 3, dilation: int = 1, strided: bool = False, norm: bool = False
) -> nn.Sequential:
    """``depth`` conv (+ BatchNorm) + ReLU layers, 8 channels, same padding.

    ``strided`` puts stride 2 in the first two layers.
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        stride = 2 if strided and i < 2 else 1
        pad = dilation * (kernel - 1) // 2
        layers.append(nn.Conv2d(1 if i == 0 else 8, 8, kernel, stride, pad, dilation))
        layers += [nn.BatchNorm2d(8), nn.ReLU()] if norm else [nn.ReLU()]
    return nn.Sequential(*layers)


def measure(net: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Radius, ERF/TRF and TRF of the last layer's centre unit."""
    last = str(len(net) - 1)
    m = compute_erf(net, inputs, [last])[last]
    metrics = m.metrics()
    return {"radius": metrics["radius"], "erf_trf_ratio": metrics["erf_trf_ratio"],
            "trf": metrics["trf_x"], "map": m.numpy()}  # fmt: skip


def depth_slope(depths: Sequence[int], radii: Sequence[float]) -> float:
    """Least-squares slope of log(radius) against log(depth): 0.5 for radius ~ sqrt(depth)."""
    return float(np.polyfit(np.log(depths), np.log(radii), 1)[0])


def train_grows(steps: int, size: int, num_samples: int) -> dict[str, Any]:
    """Train a plain 8-layer CNN (with BatchNorm, + pooling head) on the squares task; the ERF
    of its last layer before and after."""
    torch.manual_seed(0)
    features = cnn(8, norm=True)
    net = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    images, labels = squares(2048, size=size, seed=0)
    probe = images[:num_samples]
    before = measure(features, probe)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"init": before, "trained": measure(features, probe), "loss": loss.item()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute the table (and the figure); returns ``{"rows", "slopes", "training"}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--size", type=int, default=96, help="input side (pixels)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", default="erf_luo", help="folder for the table and figure")
    args = parser.parse_args(argv)

    inputs = torch.randn(args.num_samples, 1, args.size, args.size, generator=_gen(0))
    rows: list[dict[str, Any]] = []
    for name, (kernel, dilation, strided) in VARIANTS.items():
        for depth in args.depths:
            torch.manual_seed(depth)  # the same random weights for every run of the example
            m = measure(cnn(depth, kernel, dilation, strided), inputs)
            rows.append({"variant": name, "depth": depth, **m})
    slopes = {
        name: depth_slope(args.depths, [r["radius"] for r in rows if r["variant"] == name])
        for name in VARIANTS
    }
    training = train_grows(args.train_steps, 32, args.num_samples)
    table = format_table(rows, slopes, training)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "luo_table.md"), "w") as f:
        f.write(table + "\n")
    save_figure(rows, slopes, training, args.depths, args.out)
    return {"rows": rows, "slopes": slopes, "training": training}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def format_table(rows: list[dict[str, Any]], slopes: dict[str, float], training: dict) -> str:
    lines = [
        "| variant | depth | TRF | ERF radius | ERF/TRF |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['depth']} | {r['trf']:g} | {r['radius']:.2f} | "
            f"{r['erf_trf_ratio']:.3f} |"
        )
    lines.append("")
    lines.append("log-log slope of radius vs depth (sqrt law: 0.5): " + ", ".join(
        f"{k} {v:.2f}" for k, v in slopes.items()
    ))  # fmt: skip
    init, trained = training["init"]["radius"], training["trained"]["radius"]
    lines.append(
        f"training (plain 3x3, depth 8, squares task): radius {init:.2f} -> {trained:.2f} "
        f"(x{trained / init:.2f}), final loss {training['loss']:.3f}"
    )
    return "\n".join(lines)


def save_figure(
    rows: list[dict[str, Any]],
    slopes: dict[str, float],
    training: dict[str, Any],
    depths: Sequence[int],
    directory: str,
) -> str:
    """Radius and ERF/TRF against depth (log-log), and the depth-8 maps of each variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    spec = fig.add_gridspec(2, 6, height_ratios=[1.3, 1])
    ax_r, ax_q = fig.add_subplot(spec[0, :3]), fig.add_subplot(spec[0, 3:])
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        label = f"{name} (slope {slopes[name]:.2f})"
        ax_r.loglog([r["depth"] for r in rs], [r["radius"] for r in rs], "o-", label=label)
        ax_q.loglog([r["depth"] for r in rs], [r["erf_trf_ratio"] for r in rs], "o-", label=name)
    plain = [r["radius"] for r in rows if r["variant"] == "plain 3x3"]
    ref = [plain[0] * math.sqrt(d / depths[0]) for d in depths]
    ax_r.loglog(depths, ref, "k--", lw=1, label="sqrt(depth)")
    ax_r.set(xlabel="depth", ylabel="ERF radius (px)", title="ERF radius grows like sqrt(depth)")
    ax_q.set(xlabel="depth", ylabel="ERF / TRF", title="relative ERF shrinks like 1/sqrt(depth)")
    for ax in (ax_r, ax_q):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    show = max(d for d in depths if d <= 8) if min(depths) <= 8 else depths[0]
    panels = [(f"{n}\n(depth {show})", r["map"]) for n in VARIANTS for r in rows
              if r["variant"] == n and r["depth"] == show]  # fmt: skip
    panels += [
        ("plain, init", training["init"]["map"]),
        ("plain, trained", training["trained"]["map"]),
    ]
    for i, (title, erf) in enumerate(panels):
        ax = fig.add_subplot(spec[1, i])
        ax.imshow(erf, cmap="inferno")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(directory, "luo_replication.png")
    fig.savefig(path)
    print(f"figure: {path}")
    return path


if __name__ == "__main__":
    main()

"""1-D: the causal, one-sided ERF of a temporal convolutional network (dilated causal Conv1d).

The task: the target at time t is ``x[t - 5] + 0.5 * x[t - 12]`` (a delayed mix of the input
sequence). A causal TCN with dilations 1, 2, 4, 8 (kernel 3) has a theoretical receptive
field of 31 steps, all in the past. Before training the ERF is a smooth one-sided bump behind
the probed step; after training its mass sits at lags 5 and 12, the two the target needs.

The ERF's centre is behind the unit: ``center_offset`` (distance of the fitted centre from the
TRF centre) and the lag of the centre from the probed step say by how much.

Run:  python examples/tcn_1d.py --out erf_tcn      (about a minute on a laptop CPU)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from erf_callback import compute_erf

LAGS = (5, 12)
LENGTH = 96


class CausalConv1d(nn.Conv1d):
    """A Conv1d that sees only the present and the past: left padding of (k - 1) * dilation."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int) -> None:
        super().__init__(cin, cout, kernel, dilation=dilation)
        self.left = (kernel - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class TCN(nn.Module):
    """Residual blocks of dilated causal convolutions, dilations 1, 2, 4, 8."""

    def __init__(self, width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, width, 1)
        self.blocks = nn.ModuleList(CausalConv1d(width, width, 3, d) for d in dilations)
        self.out = nn.Conv1d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h)


def sequences(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, 1, LENGTH)`` and targets ``x[t-5] + 0.5 x[t-12]`` (zero before the start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, LENGTH, generator=g)
    y = F.pad(x, (LAGS[0], 0))[..., :LENGTH] + 0.5 * F.pad(x, (LAGS[1], 0))[..., :LENGTH]
    return x, y


def erf_summary(net: nn.Module, inputs: torch.Tensor, step_index: int) -> dict[str, Any]:
    """The ERF of the output at ``step_index``: map, lags, TRF box and centre."""
    m = compute_erf(net, inputs, ["out"], position=(step_index,))["out"]
    metrics = m.metrics()
    erf = m.numpy()
    lo, hi = m.geometry.box(m.position)[0] if m.geometry is not None else (np.nan, np.nan)
    return {
        "map": erf,
        "future_mass": float(erf[step_index + 1 :].sum() / erf.sum()),
        "peak_lag": int(step_index - int(np.argmax(erf))),
        "target_mass": float(sum(erf[step_index - lag] for lag in LAGS) / erf.sum()),
        "centre_lag": float(step_index - m.gaussian.mean[0]),
        "center_offset": metrics["center_offset"],
        "trf": metrics["trf"],
        "trf_box": (float(lo), float(hi)),
        "radius": metrics["radius"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train the TCN; returns the ERF summaries ``{"init": ..., "trained": ...}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="erf_tcn", help="folder for the figure")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = sequences(2048)
    probe_inputs = x[:64]
    t = LENGTH - 20  # a late step: its whole TRF (31 steps back) is inside the sequence
    net = TCN()
    result = {"init": erf_summary(net, probe_inputs, t)}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.mse_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    result["trained"] = erf_summary(net, probe_inputs, t)
    init = result["init"]
    print(f"probed step t = {t}; TRF {init['trf']:g} steps, box {init['trf_box']}")
    for name, r in result.items():
        print(
            f"  {name:8s} mass after t {r['future_mass']:.1e}, at lags {LAGS} "
            f"{r['target_mass']:.2f}, peak at lag {r['peak_lag']:2d}, centre "
            f"{r['centre_lag']:5.2f} steps back, center_offset {r['center_offset']:5.2f}"
        )
    print(f"  final loss {loss.item():.4f} (target lags {LAGS})")
    save_figure(result, t, args.out)
    return result


def save_figure(result: dict[str, dict[str, Any]], t: int, directory: str) -> str:
    """ERF against the lag before and after training, with the TRF and the target's lags."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(directory, exist_ok=True)
    fig = Figure(figsize=(7, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lags = t - np.arange(LENGTH)
    for name, r in result.items():
        ax.plot(lags, r["map"] / r["map"].max(), label=f"{name} (centre {r['centre_lag']:.1f})")
    lo, hi = result["init"]["trf_box"]
    ax.axvspan(t - hi, t - lo, color="green", alpha=0.08, label="theoretical RF")
    for lag in LAGS:
        ax.axvline(lag, color="grey", ls=":", lw=1)
    ax.set_xlim(-8, 40)
    ax.set_xlabel("lag (steps into the past; negative = future)")
    ax.set_ylabel("ERF / max")
    ax.set_title("causal TCN: the ERF lies in the past only", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(directory, "tcn_erf.png")
    fig.savefig(path)
    print(f"figure: {path}")
    return path


if __name__ == "__main__":
    main()

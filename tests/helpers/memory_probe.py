"""Peak resident memory of ``compute_erf`` on a large input (tests only).

Run as ``python -m tests.helpers.memory_probe DIMS SIZE CHANNELS``; prints JSON with the
activation bytes of one sample and the growth of the process's peak resident set (maxrss)
over three probes: 2 samples in chunks of 2, 8 samples in chunks of 2, 8 samples in one chunk.
The peak (VmHWM, reset before the probes) only grows, so each figure is the new high-water
mark above the one before the probes.
A fresh process per input keeps earlier tests' memory out of the figures.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from torch import nn

from erf_callback import compute_erf


def conv_stack(dims: int, channels: int) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(1, channels, 3, padding=1),
        nn.ReLU(),
        conv(channels, channels, 3, padding=1),
        nn.ReLU(),
        conv(channels, channels, 3, padding=1),
    )


def activation_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output of one sample (the rule of thumb's unit)."""
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: sizes.append(o.numel() * o.element_size()))
        for m in net
    ]
    with torch.no_grad():
        net(x[:1])
    for h in hooks:
        h.remove()
    return sum(sizes)


def peak() -> int:
    """The peak resident set since :func:`reset_peak` (VmHWM), in bytes.

    Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec, so a child
    of a large pytest process starts with the parent's peak and shows no growth at all.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak() -> None:
    """Set the peak back to the current resident set (Linux: ``5`` to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(dims: int, size: int, channels: int) -> dict[str, float]:
    torch.set_num_threads(1)
    net = conv_stack(dims, channels)
    small = torch.randn(1, 1, *[size // 8] * dims)
    compute_erf(net, small, ["4"])  # kernels and caches load outside the measurement
    x = torch.randn(8, 1, *[size] * dims)
    reset_peak()
    base = peak()
    compute_erf(net, x[:2], ["4"], chunk_size=2)
    two = peak()
    maps = compute_erf(net, x, ["4"], chunk_size=2)
    eight = peak()
    compute_erf(net, x, ["4"], chunk_size=8)
    one_chunk = peak()
    return {
        "per_sample": activation_bytes(net, x),
        "chunk2_n2": two - base,
        "chunk2_n8": eight - base,
        "chunk8_n8": one_chunk - base,
        "trf": maps["4"].metrics()["trf_x"],
    }


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:4]))))

"""Large inputs and models: memory bounded by chunk_size, every stage from one forward per chunk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erf_callback import compute_erf
from tests.helpers.nets import resnet50

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


@pytest.mark.parametrize(("dims", "size"), [(2, 1024), (3, 80)])
def test_peak_memory_follows_chunk_size_not_num_samples(dims, size):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.memory_probe", str(dims), str(size), "2"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    per = m["per_sample"]  # bytes of every module output of one sample: 40 MiB / 20 MiB here
    assert m["trf"] == 7.0  # three 3x3(x3) convolutions, on the full-size input
    # The documented rule of thumb: peak ~ chunk_size x 3 x per-sample activations (measured
    # 1.6-3.1x on CPU; 3-D convolutions add unfold buffers). Bound: 4x, plus 128 MiB of
    # allocator slack.
    assert m["chunk2_n2"] <= 2 * 4 * per + 128 * MB, m
    assert m["chunk8_n8"] <= 8 * 4 * per + 128 * MB, m
    # Four times the samples in the same chunks: far less growth than four times the chunk
    # (what grows with N is the inputs themselves and their per-chunk copies, not activations).
    grows_with_n = m["chunk2_n8"] - m["chunk2_n2"]
    grows_with_chunk = m["chunk8_n8"] - m["chunk2_n2"]
    assert grows_with_chunk > 4 * per, m  # chunk_size is what costs memory
    assert grows_with_n < grows_with_chunk / 2, m


def test_every_stage_of_a_resnet50_from_one_forward_per_chunk():
    torch.manual_seed(0)
    net = resnet50()
    assert sum(p.numel() for p in net.parameters()) > 23_000_000  # ResNet-50 sized
    stem_calls: list[int] = []
    net.conv1.register_forward_hook(lambda *_: stem_calls.append(1))
    stages = ["layer1", "layer2", "layer3", "layer4"]
    maps = compute_erf(net, torch.randn(4, 3, 64, 64), stages, chunk_size=2)
    # 4 samples: the first alone (traced and measured), then chunks of 2: one forward per
    # chunk for all 4 stages
    assert len(stem_calls) == 3
    # Theoretical receptive fields of torchvision's ResNet-50 (layer3/layer4: 267/427).
    assert [maps[s].metrics()["trf_x"] for s in stages] == [35.0, 91.0, 267.0, 427.0]
    assert all(maps[s].status == "ok" and maps[s].num_samples == 4 for s in stages)

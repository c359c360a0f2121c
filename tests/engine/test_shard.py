"""Sharded probing: shard arithmetic, the reduce hook, and two real gloo processes."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from erf_callback import compute_erf
from erf_callback.engine import clear_trace_cache
from erf_callback.engine.shard import (
    ProbeFailedElsewhereError,
    ShardReducer,
    forwards_needed,
    pack_sums,
    shard_bounds,
    sharded_compute_erf,
    unpack_sums,
)
from tests.helpers import shard_worker
from tests.helpers.nets import relu_stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_cover_everything_and_differ_by_one_at_most(world):
    for n in range(0, 20):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous, disjoint
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_bounds_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(4, 2, 2)


def test_pack_and_unpack_round_trip():
    sums = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(2, 2, 2)}
    packed = pack_sums(sums, 7)
    assert packed.dtype == torch.float64 and packed.numel() == 12 + 8 + 1
    back, count = unpack_sums(packed, sums)
    assert count == 7.0
    assert torch.equal(back["a"], sums["a"]) and torch.allclose(back["b"], sums["b"])
    with pytest.raises(ValueError, match="expected 21"):
        unpack_sums(packed[:-1], sums)


def test_two_shards_through_the_reduce_hook_give_the_whole_set():
    # Two "ranks" in one process: rank 1 records its packed sums, rank 0 adds them.
    net = relu_stack(3).double()
    x = torch.randn(7, 1, 16, 16, dtype=torch.float64)
    whole = compute_erf(net, x, ["2", "4"], chunk_size=2)
    packed: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.clone())
        return t

    compute_erf(net, x[4:], ["2", "4"], chunk_size=2, reduce=record)
    parts = compute_erf(net, x[:4], ["2", "4"], chunk_size=2, reduce=lambda t: t + packed[0])
    for layer in ("2", "4"):
        assert parts[layer].num_samples == 7
        # float64 throughout: only the summation order differs.
        assert torch.allclose(parts[layer].grad, whole[layer].grad, rtol=1e-12, atol=0)


def test_reducer_agrees_on_failures_before_summing():
    calls: list[list[float]] = []

    def other_rank_failed(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.tolist())
        return t + 1  # the other rank reported a failure (1) in the flag all-reduce

    with pytest.raises(ProbeFailedElsewhereError, match="1 other rank"):
        ShardReducer(other_rank_failed)(torch.ones(3, dtype=torch.float64))
    assert calls == [[0.0]]  # the sums were never sent: the other rank is not waiting for them

    seen: list[list[float]] = []
    failing = ShardReducer(lambda t: seen.append(t.tolist()) or t)
    failing.fail()
    failing.fail()  # joins the flag collective once only
    assert seen == [[1.0]]

    zero = ShardReducer(lambda t: t, weight=0.0)
    assert zero(torch.ones(3, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


def test_sharded_compute_erf_tells_the_others_when_it_fails():
    flags: list[float] = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        flags.append(float(t[0]))
        return t

    with pytest.raises(KeyError):
        sharded_compute_erf(
            relu_stack(2), torch.randn(4, 1, 8, 8), ["nope"], rank=1, world_size=2,
            all_reduce=all_reduce,
        )  # fmt: skip
    assert flags == [1.0]


@pytest.mark.parametrize(
    ("n", "chunk", "bn_without_stats"),
    [(10, 4, False), (10, None, False), (3, 8, False), (5, 2, True), (1, 1, False)],
)
def test_forwards_needed_counts_the_engine_forwards(n, chunk, bn_without_stats):
    clear_trace_cache()
    layers: list[nn.Module] = [nn.Conv2d(1, 2, 3, padding=1)]
    if bn_without_stats:
        layers.append(nn.BatchNorm2d(2, track_running_stats=False))
    net = nn.Sequential(*layers, nn.Conv2d(2, 2, 3, padding=1))
    calls = []
    net[0].register_forward_hook(lambda *_: calls.append(1))
    compute_erf(net, torch.randn(n, 1, 8, 8), [str(len(layers))], chunk_size=chunk)
    assert forwards_needed(net, n, chunk) == len(calls)


def test_two_gloo_processes_fsdp2_syncbn_and_a_failing_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.shard_worker", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,  # a hung collective becomes a failure
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        # float32 gradients of chunks grouped differently: ~1e-7 relative.
        return torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))

    for n in (5, 1):
        # The fully sharded model's maps are the unsharded model's maps of all n samples.
        want = compute_erf(shard_worker.conv_stack(), shard_worker.samples(n), shard_worker.LAYERS)
        for rec in ranks:
            for layer in shard_worker.LAYERS:
                grad, count = rec[f"fsdp{n}"][layer]
                assert count == n and close(grad, want[layer].grad)
    want = compute_erf(shard_worker.bn_stack(), shard_worker.samples(7), ["4"])
    for rec in ranks:
        grad, count = rec["syncbn"]["4"]
        assert count == 7 and close(grad, want["4"].grad)
        assert rec["syncbn_state_kept"] and rec["syncbn_training"]  # stats and mode untouched
    assert [r["failure"] for r in ranks] == ["elsewhere", "injected failure on rank 1"]
    want = compute_erf(shard_worker.conv_stack(), shard_worker.samples(4), ["2"])
    assert all(close(r["after_failure"], want["2"].grad) for r in ranks)


def test_lockstep_probes_run_the_counted_forwards_every_time():
    """A repeated probe reuses its trace and skips the traced sample; under lockstep that
    would put a rank that remembers out of step with one that does not: never reused there."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    calls: list[int] = []
    net[0].register_forward_hook(lambda *_: calls.append(1))
    for _ in range(3):
        calls.clear()
        sharded_compute_erf(
            net, torch.randn(8, 1, 8, 8), ["1"], rank=0, world_size=2,
            all_reduce=lambda t: t, lockstep=True, chunk_size=2,
        )  # fmt: skip
        assert len(calls) == forwards_needed(net, 4, 2) == 3

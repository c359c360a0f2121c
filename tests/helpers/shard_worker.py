"""Two gloo processes probing together, outside Lightning (tests only).

Run as ``python -m tests.helpers.shard_worker OUT_DIR``: ranks 0 and 1 run
:func:`sharded_compute_erf` on an FSDP2-sharded conv stack, on a SyncBatchNorm net and with a
forward that fails on rank 1 only, and save what they got to ``OUT_DIR/rank{r}.pt``. The test
compares that with the single-process maps; it runs this in a subprocess with a timeout, so a
hang is a failure.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from erf_callback.engine.shard import (
    ProbeFailedElsewhereError,
    sharded_compute_erf,
    torch_all_reduce,
)

LAYERS = ["2", "4"]


def conv_stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
    )


def bn_stack() -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
    )
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def samples(n: int) -> torch.Tensor:
    return torch.randn(n, 2, 12, 12, generator=torch.Generator().manual_seed(n))


class FailsOnRank1(nn.Module):
    def __init__(self, net: nn.Module, rank: int) -> None:
        super().__init__()
        self.net, self.rank = net, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        return self.net(x)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A CPU mesh named explicitly: FSDP's default mesh takes a CUDA device wherever one exists.
    mesh = init_device_mesh("cpu", (world,))

    reduce = torch_all_reduce()
    common = {"rank": rank, "world_size": world, "all_reduce": reduce}
    result: dict[str, object] = {}

    sharded = conv_stack()
    for i in (0, 2, 4):
        fully_shard(sharded[i], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    # 5 samples in chunks of 2: rank 0 runs 2 forwards, rank 1 one (plus one stand-in);
    # 1 sample: rank 1 has none and probes a stand-in weighted 0.
    for n in (5, 1):
        maps = sharded_compute_erf(
            sharded, samples(n), LAYERS, lockstep=True, chunk_size=2, **common
        )
        result[f"fsdp{n}"] = {k: (m.grad, m.num_samples) for k, m in maps.items()}

    sync = nn.SyncBatchNorm.convert_sync_batchnorm(bn_stack())
    before = {k: v.clone() for k, v in sync.state_dict().items()}
    maps = sharded_compute_erf(sync, samples(7), ["4"], chunk_size=3, **common)
    result["syncbn"] = {k: (m.grad, m.num_samples) for k, m in maps.items()}
    result["syncbn_state_kept"] = all(
        torch.equal(before[k], v) for k, v in sync.state_dict().items()
    )
    result["syncbn_training"] = sync.training

    try:
        sharded_compute_erf(FailsOnRank1(conv_stack(), rank), samples(4), ["net.2"], **common)
        result["failure"] = "none"
    except ProbeFailedElsewhereError:
        result["failure"] = "elsewhere"
    except RuntimeError as err:
        result["failure"] = str(err)
    # The group is still in step after the failed probe: the next one works on both ranks.
    maps = sharded_compute_erf(conv_stack(), samples(4), ["2"], **common)
    result["after_failure"] = maps["2"].grad
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    mp.spawn(worker, args=(2, free_port(), sys.argv[1]), nprocs=2, join=True)

"""How ``ERFMonitor`` shares a probe among the ranks of a Lightning strategy.

Every rank probes its own shard of the probe samples and one all-reduce adds the sums and
counts up (:mod:`erf_callback.engine.shard`), so N ranks make the probe about N times faster
instead of doing N times the work. This module reads the trainer's strategy (by class name,
so it serves both Lightning namespaces) and decides, once at fit start:

* single process: the plain engine, nothing shared;
* DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, multi-node) and DeepSpeed
  ZeRO stages 1-2: each rank runs its shard independently (the probed module is the
  LightningModule, not the DDP wrapper, and in eval mode nothing in its forward communicates);
* FSDP, DeepSpeed ZeRO-3 and ``ModelParallelStrategy`` without tensor parallelism: the forward
  gathers parameters from every rank, so ranks also run the same number of forwards
  (``lockstep``);
* anything else with more than one process (tensor parallelism, XLA, unknown strategies):
  a ``ValueError`` naming the strategy, raised at fit start, rather than a probe that hangs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erf_callback.engine.compute import compute_erf
from erf_callback.engine.config import ProbeConfig
from erf_callback.engine.erf_map import ERFMap
from erf_callback.engine.shard import AllReduce, sharded_compute_erf, torch_all_reduce

__all__ = ["GatherToZero", "ProbeGroup", "probe_group", "run_probe", "torch_gather_to_zero"]

#: Sends one picklable object from every rank to rank 0: rank 0 gets them all, in rank order;
#: the others get None. Every rank must call it.
GatherToZero = Callable[[Any], "list[Any] | None"]

_DATA_PARALLEL = ("DDPStrategy", "DDPSpawnStrategy")
_SHARDED = ("FSDPStrategy",)


@dataclass(frozen=True)
class ProbeGroup:
    """The ranks that share a probe.

    Attributes:
        rank: this process's global rank.
        world_size: the number of processes.
        lockstep: the model's forward communicates (FSDP, ZeRO-3): equal forward counts.
        strategy: the strategy's class name (for messages).
        all_reduce: sums a tensor over all ranks; ``None`` means ``torch.distributed``'s
            default group, built when the first probe runs.
        gather: collects one object per rank on rank 0 (the images each rank rendered);
            ``None`` means ``torch.distributed.gather_object`` on the default group.

    Example:
        >>> ProbeGroup(rank=1, world_size=4, lockstep=False, strategy="DDPStrategy").rank
        1
    """

    rank: int
    world_size: int
    lockstep: bool
    strategy: str
    all_reduce: AllReduce | None = None
    gather: GatherToZero | None = None


def probe_group(trainer: Any) -> ProbeGroup | None:
    """The probe group of ``trainer``'s strategy; ``None`` for a single process.

    Raises:
        ValueError: a multi-process strategy whose probe cannot be shared safely; the message
            names the strategy and the supported ones.

    Example:
        >>> from types import SimpleNamespace
        >>> probe_group(SimpleNamespace(world_size=1, global_rank=0, strategy=None)) is None
        True
    """
    world_size = int(getattr(trainer, "world_size", 1) or 1)
    if world_size <= 1:
        return None
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    kinds = {c.__name__ for c in type(strategy).__mro__}
    rank = int(trainer.global_rank)
    if "DeepSpeedStrategy" in kinds:
        return ProbeGroup(rank, world_size, bool(getattr(strategy, "zero_stage_3", True)), name)
    if "ModelParallelStrategy" in kinds:
        if getattr(strategy, "_tensor_parallel_size", 1) == 1:
            return ProbeGroup(rank, world_size, True, name)
        raise _unsupported(name, "tensor parallelism splits one sample's forward over ranks")
    if kinds & set(_SHARDED):
        return ProbeGroup(rank, world_size, True, name)
    if kinds & set(_DATA_PARALLEL):
        return ProbeGroup(rank, world_size, False, name)
    raise _unsupported(name, "it is not known to keep the ranks' probes in step")


def run_probe(
    net: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str],
    probe: ProbeConfig,
    group: ProbeGroup | None,
) -> dict[str, ERFMap]:
    """Probe ``net`` on ``inputs``: alone, or this rank's shard of them within ``group``.

    Every rank of ``group`` must call this at the same step; all return the same maps.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
        >>> run_probe(net, torch.randn(2, 1, 8, 8), ["0"], ProbeConfig(), None)["0"].num_samples
        2
    """
    if group is None:
        return compute_erf(net, inputs, layers, probe=probe)
    return sharded_compute_erf(
        net,
        inputs,
        layers,
        rank=group.rank,
        world_size=group.world_size,
        all_reduce=group.all_reduce or torch_all_reduce(),
        lockstep=group.lockstep,
        probe=probe,
    )


def torch_gather_to_zero() -> GatherToZero:
    """``torch.distributed.gather_object`` to rank 0 over the default group.

    With NCCL the objects travel through the current CUDA device (Lightning sets one per rank).

    Example:
        >>> callable(torch_gather_to_zero())
        True
    """
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any] | None:
        rank = dist.get_rank()
        out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    return gather


def _unsupported(strategy: str, why: str) -> ValueError:
    return ValueError(
        f"ERFMonitor cannot share its probe under the {strategy} strategy ({why}), and a probe "
        "that some ranks skip would hang the others. Supported with several processes: DDP "
        "(ddp, ddp_spawn, ddp_fork, multi-node), FSDP, DeepSpeed, ModelParallelStrategy "
        "without tensor parallelism. Remove ERFMonitor from this run, or probe a checkpoint "
        "offline with erf_callback.compute_erf."
    )

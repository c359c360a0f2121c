"""Probing with several processes: each rank probes a disjoint shard, sums and counts add up.

The ERF map is a mean over samples of per-sample input gradients, so it splits exactly: every
rank sums the gradients of its own shard of the probe samples, the sums and the sample counts
are added across ranks (one all-reduce), and the mean of the total is the single-process map
of the whole set (up to float64 summation order). :func:`compute_erf` takes the combining step
as its ``reduce`` hook; this module supplies it and the shard arithmetic. It uses
``torch.distributed`` only through a callable it is given (or builds one with
:func:`torch_all_reduce`), so it needs no Lightning and runs under any launcher.

Two rules keep every rank in step, because a collective that one rank skips hangs the others:

* every rank joins the same collectives in the same order: a success flag first (so a probe
  that failed on one rank fails on all, instead of leaving the others waiting), then the
  packed sums;
* with ``lockstep=True`` (FSDP, DeepSpeed ZeRO-3: every forward gathers parameters from all
  ranks) every rank also runs the same number of forwards and backwards: a rank whose shard
  needs fewer chunks runs throw-away one-sample probes first, and a rank with no sample at all
  (fewer samples than ranks) probes one sample whose contribution is multiplied by zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from erf_callback.engine.compute import _mixes_batch_in_eval, compute_erf
from erf_callback.engine.config import DEFAULT, ProbeConfig
from erf_callback.engine.erf_map import ERFMap
from erf_callback.engine.layers import unwrap_model
from erf_callback.engine.trace_cache import clear_trace_cache
from erf_callback.warnings import ERFWarning

__all__ = [
    "LOCKSTEP_CHUNK",
    "ProbeFailedElsewhereError",
    "ShardReducer",
    "forwards_needed",
    "pack_sums",
    "shard_bounds",
    "sharded_compute_erf",
    "torch_all_reduce",
    "unpack_sums",
]

#: Samples per forward under ``lockstep`` when ``chunk_size="auto"``: every rank must run the
#: same forwards, so the chunk cannot be measured per rank.
LOCKSTEP_CHUNK = 8

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class ProbeFailedElsewhereError(RuntimeError):
    """The probe failed on another rank; this rank gives it up too (so no rank waits)."""


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of ``n`` samples that ``rank`` probes: contiguous, disjoint.

    Shard sizes differ by at most one; the first ``n % world_size`` ranks take the extra
    sample. With fewer samples than ranks, the last ranks get empty shards.

    Example:
        >>> [shard_bounds(10, r, 4) for r in range(4)]
        [(0, 3), (3, 6), (6, 8), (8, 10)]
        >>> shard_bounds(1, 1, 2)
        (1, 1)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def forwards_needed(model: nn.Module, n: int, chunk_size: int | None) -> int:
    """How many forward passes :func:`compute_erf` runs on ``n`` samples (``n >= 1``).

    Mirrors the engine's chunking (:class:`~erf_callback.engine.chunking.ChunkPlan`) for a
    probe that traces (no remembered trace, see :mod:`.trace_cache`): all at once for
    ``None``; else the first sample alone, then ``chunk_size`` samples per forward, or one per
    forward when a BatchNorm without running statistics would mix a chunk's samples.

    Example:
        >>> conv = torch.nn.Conv2d(1, 1, 3)
        >>> forwards_needed(conv, 10, 4), forwards_needed(conv, 10, None)
        (4, 1)
    """
    mixes = _mixes_batch_in_eval(unwrap_model(model))
    if chunk_size is None and not mixes:
        return 1
    chunk = 1 if mixes or chunk_size is None else chunk_size
    return 1 + math.ceil((n - 1) / chunk)


def pack_sums(sums: Mapping[str, torch.Tensor], count: float) -> torch.Tensor:
    """One flat float64 tensor: every layer's gradient sum, flattened in order, then the count.

    Example:
        >>> pack_sums({"a": torch.ones(2, 2)}, 3).tolist()
        [1.0, 1.0, 1.0, 1.0, 3.0]
    """
    parts = [s.reshape(-1).to(torch.float64) for s in sums.values()]
    ref = next(iter(sums.values()), torch.zeros(()))
    parts.append(torch.tensor([float(count)], dtype=torch.float64, device=ref.device))
    return torch.cat(parts)


def unpack_sums(
    packed: torch.Tensor, like: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float]:
    """The inverse of :func:`pack_sums`: per-layer tensors shaped as in ``like``, and the count.

    Example:
        >>> sums, n = unpack_sums(torch.arange(5.0), {"a": torch.zeros(2, 2)})
        >>> sums["a"].tolist(), n
        ([[0.0, 1.0], [2.0, 3.0]], 4.0)
    """
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, ref in like.items():
        out[name] = packed[offset : offset + ref.numel()].reshape(ref.shape).to(ref.dtype)
        offset += ref.numel()
    if packed.numel() != offset + 1:
        raise ValueError(f"packed sums have {packed.numel()} values; expected {offset + 1}")
    return out, float(packed[offset])


class ShardReducer:
    """The ``reduce`` hook of :func:`compute_erf` for a group of ranks: a sum all-reduce.

    Every rank calls the reducer exactly once per probe, or :meth:`fail` when its probe broke
    before reaching it. Both join the same first collective, a failure count, so a broken
    probe on one rank ends the probe on every rank (:class:`ProbeFailedElsewhereError`) instead of
    leaving the others waiting in the second collective, the sum of the packed gradients.

    Args:
        all_reduce: sums a tensor over the ranks and returns the result (e.g.
            :func:`torch_all_reduce`).
        weight: this rank's contribution is multiplied by it; ``0`` for a rank that probed a
            stand-in sample only to keep in step.

    Example:
        >>> reducer = ShardReducer(lambda t: t * 2)  # a stand-in for two identical ranks
        >>> reducer(torch.tensor([1.0, 3.0])).tolist()
        [2.0, 6.0]
    """

    def __init__(self, all_reduce: AllReduce, *, weight: float = 1.0) -> None:
        self.all_reduce = all_reduce
        self.weight = weight
        self.joined = False

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        failed = self._agree(failed=False, like=packed)
        if failed:
            raise ProbeFailedElsewhereError(
                f"the ERF probe failed on {failed} other rank(s); see their error. Every rank "
                "gives this probe up, so none waits for the others."
            )
        return self.all_reduce(packed * self.weight if self.weight != 1.0 else packed.clone())

    def fail(self) -> None:
        """Tell the other ranks this rank's probe broke (a no-op once the reducer was called)."""
        if not self.joined:
            self._agree(failed=True, like=torch.zeros(()))

    def _agree(self, *, failed: bool, like: torch.Tensor) -> int:
        self.joined = True
        flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=like.device)
        return round(float(self.all_reduce(flag)[0])) - int(failed)


def torch_all_reduce(group: Any = None) -> AllReduce:
    """An all-reduce (sum) over ``torch.distributed``'s ``group`` (default: all ranks).

    The tensor travels on the device the backend needs (CUDA for NCCL, CPU for gloo) and
    comes back on its own device.
    """
    import torch.distributed as dist

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        buf = t.detach().to(device=device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        return buf.to(t.device)

    return all_reduce


def sharded_compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    *,
    rank: int,
    world_size: int,
    all_reduce: AllReduce,
    lockstep: bool = False,
    probe: ProbeConfig | None = None,
    **kwargs: Any,
) -> dict[str, ERFMap]:
    """:func:`compute_erf` over ``inputs`` with the work split among ``world_size`` ranks.

    Every rank calls this with the same ``inputs`` (or, for a per-rank probe set, its own set
    of the same length), the same layers and options. Rank ``r`` probes
    ``inputs[slice(*shard_bounds(N, r, world_size))]``; the sums and counts are all-reduced,
    so every rank returns the maps of the union of the shards: for identical ``inputs``, the
    single-process maps of ``inputs``.

    Args:
        model: the probed module (on FSDP / ZeRO-3, the sharded module itself).
        inputs: ``(N, C, *spatial)``.
        layers: as in :func:`compute_erf`.
        rank: this process's rank in the group.
        world_size: the number of ranks in the group.
        all_reduce: sums a tensor over the group (e.g. :func:`torch_all_reduce`).
        lockstep: every rank must run the same number of forwards and backwards (the model's
            forward itself communicates: FSDP, DeepSpeed ZeRO-3).
        probe: as in :func:`compute_erf`; ``kwargs`` are its other keyword arguments.

    Returns:
        ``{layer: ERFMap}``, identical on every rank.

    Raises:
        ProbeFailedElsewhereError: the probe failed on another rank.
        Exception: whatever :func:`compute_erf` raised on this rank (after telling the others).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
        >>> x = torch.randn(4, 1, 8, 8)
        >>> maps = sharded_compute_erf(net, x, ["0"], rank=0, world_size=1, all_reduce=lambda t: t)
        >>> maps["0"].num_samples
        4
    """
    cfg = (probe or ProbeConfig()).replace(chunk_size=kwargs.pop("chunk_size", DEFAULT))
    # Every forward of a sharded model needs all ranks, so all must chunk alike; a chunk
    # measured against each rank's free memory could differ between ranks.
    fixed_chunk = LOCKSTEP_CHUNK if isinstance(cfg.chunk_size, str) else cfg.chunk_size
    chunk_size = fixed_chunk if lockstep else cfg.chunk_size
    n = inputs.shape[0]
    lo, hi = shard_bounds(n, rank, world_size)
    reducer = ShardReducer(all_reduce, weight=1.0 if hi > lo else 0.0)
    # A rank without samples still probes one (weighted 0): it must join every collective.
    local = inputs[lo:hi] if hi > lo else inputs[:1]
    try:
        if lockstep:
            most = forwards_needed(model, shard_bounds(n, 0, world_size)[1], fixed_chunk)
            for _ in range(most - forwards_needed(model, local.shape[0], fixed_chunk)):
                clear_trace_cache(unwrap_model(model))
                with warnings.catch_warnings():  # a throw-away probe: its maps are not used
                    warnings.simplefilter("ignore", ERFWarning)
                    compute_erf(model, inputs[:1], layers, probe=cfg, **kwargs)
            # forwards_needed counts a traced first sample; a remembered trace (which one rank
            # may have and another not) would skip it and put the ranks out of step.
            clear_trace_cache(unwrap_model(model))
        return compute_erf(
            model, local, layers, probe=cfg, chunk_size=chunk_size, reduce=reducer, **kwargs
        )
    except BaseException:
        reducer.fail()
        raise

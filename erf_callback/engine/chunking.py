"""How many samples go through one forward/backward: the chunk plan and its memory budget.

Peak memory of a probe is the autograd graph of one chunk: the activations that the
truncated forward saves for the backward, times the chunk's length. With
``chunk_size="auto"`` the first chunk is a single sample whose saved activations are
measured (``torch.autograd.graph.saved_tensors_hooks``); the rest of the samples then go in
chunks that fit the memory budget (a probe that reuses a remembered trace reuses its
measurement: ``plan.measured(..., start=0)``). On CPU, large chunks are not faster once their
activations leave the caches and every chunk faults in fresh pages, so the default budget is
small; on CUDA it is half of the memory the caching allocator could still hand out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erf_callback.engine.config import AUTO, ChunkSize

__all__ = [
    "CPU_BUDGET",
    "CUDA_BUDGET_FRACTION",
    "ChunkPlan",
    "SavedBytesMeter",
    "default_budget",
    "out_of_memory_error",
]

#: Default ``memory_budget`` on CPU: saved activations per chunk, in bytes.
CPU_BUDGET = 64 * 2**20
#: Default ``memory_budget`` on CUDA, as a fraction of the memory still available to torch.
CUDA_BUDGET_FRACTION = 0.5


def default_budget(device: torch.device) -> int:
    """The memory budget of a chunk's saved activations when ``memory_budget`` is None.

    Example:
        >>> default_budget(torch.device("cpu")) <= CPU_BUDGET
        True
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # One query of the allocator: memory_reserved() and memory_allocated() each flatten
        # its whole statistics tree in Python (~0.15 ms apiece, at every probe).
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        cached = _current(stats, "reserved_bytes") - _current(stats, "allocated_bytes")
        return max(1, int(CUDA_BUDGET_FRACTION * (free + cached)))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: no cap
        return CPU_BUDGET
    return max(1, min(CPU_BUDGET, available // 4))


def _current(stats: dict[str, Any], key: str) -> int:
    """``stats[key]["all"]["current"]`` of the caching allocator's statistics (0 if absent)."""
    return int(stats.get(key, {}).get("all", {}).get("current", 0))


@dataclass
class ChunkPlan:
    """The chunk lengths of one probe; ``"auto"`` plans grow after the first sample is measured.

    Example:
        >>> plan = ChunkPlan.create("auto", n=10, budget=100)
        >>> plan.size(0)
        1
        >>> plan.measured(per_sample_bytes=30)   # 3 samples fit; 9 left go as 3 + 3 + 3
        >>> [plan.size(s) for s in (1, 4, 7)]
        [3, 3, 3]
    """

    n: int
    chunk: int
    auto: bool
    budget: int | None

    @classmethod
    def create(
        cls, chunk_size: ChunkSize | None, n: int, budget: int | None, one_at_a_time: bool = False
    ) -> ChunkPlan:
        """``one_at_a_time``: samples would mix (BatchNorm without running stats): chunk 1."""
        if one_at_a_time:
            return cls(n, 1, False, budget)
        if chunk_size is None:
            return cls(n, n, False, budget)
        if chunk_size == AUTO:
            return cls(n, 1, True, budget)
        return cls(n, min(int(chunk_size), n), False, budget)

    def size(self, start: int) -> int:
        """Length of the chunk that begins at sample ``start``."""
        return min(self.chunk, self.n - start)

    def measured(self, per_sample_bytes: float, start: int = 1) -> None:
        """Set the chunk from one sample's activation bytes (``"auto"`` plans only)."""
        if not self.auto or self.budget is None:
            return
        left = self.n - start
        if left <= 0:
            return
        cap = max(1, min(left, int(self.budget // max(per_sample_bytes, 1.0))))
        # Equal chunks: 33 samples with room for 32 go as 17 + 16, not 32 + 1.
        self.chunk = math.ceil(left / math.ceil(left / cap))

    def shrink(self, failed: int) -> bool:
        """After an out-of-memory error on a chunk of ``failed`` samples: halve, if allowed."""
        if not self.auto or failed <= 1:
            return False
        self.chunk = max(1, failed // 2)
        return True


def out_of_memory_error(
    plan: ChunkPlan, failed: int, device: torch.device
) -> torch.OutOfMemoryError:
    """The error raised when no chunk length fits: says what was tried and what to do."""
    if plan.auto:
        what = f"even one sample at a time ran out of memory on {device}"
        fix = (
            "Probe smaller inputs, a shallower layer, or move the model to a device with more "
            "memory (or free memory held elsewhere, e.g. torch.cuda.empty_cache())."
        )
    else:
        what = f"a chunk of {failed} samples ran out of memory on {device}"
        fix = (
            "Pass chunk_size='auto' (the default: sized from free memory, halved on "
            "out-of-memory errors) or a smaller chunk_size."
        )
    return torch.OutOfMemoryError(f"compute_erf: {what}. {fix}")


class SavedBytesMeter:
    """Bytes of the tensors a forward saves for its backward, parameters and buffers excluded.

    Example:
        >>> conv = torch.nn.Conv2d(1, 4, 3)
        >>> meter = SavedBytesMeter(conv)
        >>> x = torch.randn(2, 1, 8, 8, requires_grad=True)
        >>> with meter:
        ...     _ = torch.relu(conv(x))
        >>> meter.nbytes >= 2 * 4 * 6 * 6 * 4   # at least the ReLU's output
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._storages: dict[int, int] = {}
        self._exclude: set[int] = set()
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = _storage_ptr(t)
        if ptr is None:  # no plain storage (a DTensor, a freed FSDP buffer): its own size
            self._storages[id(t)] = t.numel() * t.element_size()
        elif ptr not in self._exclude:
            # A view (e.g. the chunk sliced from all inputs) counts for its own size only.
            own = min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
            self._storages[ptr] = max(own, self._storages.get(ptr, 0))
        # An alias without autograd history: returning ``t`` itself would make every tensor
        # saved by its own grad_fn (a ReLU's output) a reference cycle that is never freed.
        return t.detach()

    def __enter__(self) -> SavedBytesMeter:
        ptrs = (_storage_ptr(t) for t in (*self._model.parameters(), *self._model.buffers()))
        self._exclude = {p for p in ptrs if p is not None}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        # The hooks object holds self._pack (and so self and the model): dropping it breaks
        # that cycle, so the model is freed when its user lets go of it, not at the next gc.
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(*exc)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or None where it has none to give.

    FSDP frees the unsharded parameters' storage between forwards, and DTensors wrap theirs.
    """
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None

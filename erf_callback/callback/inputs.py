"""Where the probe inputs come from: a captured training batch, seeded noise, a tensor, a loader.

The probe set is fixed once (and checkpointed), so every probe of a run sees the same images
and the change of the ERF over training is a change of the model, not of the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from erf_callback.engine.guard import preserved_rng

__all__ = [
    "InputKey",
    "InputSource",
    "describe_batch",
    "extract_input",
    "first_batch_tensor",
    "gather_inputs",
    "noise_like",
    "reuses_workers",
]

InputSource = Literal["train", "noise"] | torch.Tensor | Iterable[Any] | Dataset[Any]
InputKey = int | str | Callable[[Any], torch.Tensor] | None


def extract_input(batch: Any, input_key: InputKey) -> torch.Tensor:
    """The model input of one batch: ``batch[input_key]`` (for a batch that is an object, such
    as a dataclass, a name is its attribute), ``input_key(batch)`` or, without ``input_key``,
    the first image-like tensor (see :func:`first_batch_tensor`).

    Example:
        >>> import torch
        >>> extract_input({"image": torch.zeros(2, 3, 4, 4)}, "image").shape
        torch.Size([2, 3, 4, 4])
        >>> extract_input((torch.tensor([1, 2]), torch.zeros(2, 3, 4, 4)), None).shape
        torch.Size([2, 3, 4, 4])
    """
    if input_key is None:
        return first_batch_tensor(batch)
    try:
        x = input_key(batch) if callable(input_key) else _item(batch, input_key)
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"ERFMonitor(input_key={input_key!r}) cannot take the input from a batch of type "
            f"{type(batch).__name__}: {err}. The batch holds {describe_batch(batch)}. Pass "
            "input_key= as an index, a dict key, a field name or a callable batch -> tensor."
        ) from err
    # Chosen by the user, an (N, L) tensor may be raw signals that the model gives a channel
    # axis itself (compute_erf takes those); the search below passes over such vectors.
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, *_SPATIAL_RANKS):
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"ERFMonitor(input_key={input_key!r}) picks {found}, not an input batch "
            f"(N, C, *spatial) with 1-3 spatial dimensions. The batch holds "
            f"{describe_batch(batch)}; set input_key= to the image tensor's index or key."
        )
    return x


def _item(batch: Any, key: int | str) -> Any:
    """``batch[key]``, or, for a name and a batch whose parts are named attributes (a named
    tuple, a dataclass, any object that is no container), that attribute."""
    named = _named_tuple_fields(batch) is not None or not isinstance(
        batch, (Mapping, list, tuple, str, bytes, torch.Tensor)
    )
    if isinstance(key, str) and named:
        field = getattr(batch, key, _MISSING)
        if field is not _MISSING:
            return field
    return batch[key]


_MISSING = object()


def _named_tuple_fields(batch: Any) -> tuple[str, ...] | None:
    """The field names of a named tuple; None for anything else."""
    fields = getattr(type(batch), "_fields", None) if isinstance(batch, tuple) else None
    return tuple(fields) if fields is not None else None


# (N, C, L), (N, C, H, W), (N, C, D, H, W)
_SPATIAL_RANKS = (3, 4, 5)


def first_batch_tensor(batch: Any) -> torch.Tensor:
    """The input in a batch: the first floating-point tensor of rank 3-5 ``(N, C, *spatial)``
    (labels, masks given as integers, and per-sample vectors are passed over), else the
    first integer tensor of rank 4-5 (uint8 images). Tuples, lists, dict values and the
    fields of dataclasses are searched depth-first, in order.

    Raises:
        ValueError: nothing fits; the message lists what the batch holds.

    Example:
        >>> import torch
        >>> batch = {"label": torch.tensor([3, 1]), "image": torch.rand(2, 3, 8, 8)}
        >>> first_batch_tensor(batch).shape
        torch.Size([2, 3, 8, 8])
    """
    tensors = list(_tensors(batch, ""))
    for _, t in tensors:
        if t.is_floating_point() and t.dim() in _SPATIAL_RANKS:
            return t
    for _, t in tensors:
        if not t.is_floating_point() and not t.is_complex() and t.dim() in (4, 5):
            return t
    raise ValueError(
        f"ERFMonitor found no input in the batch: it takes the first floating-point tensor "
        f"(N, C, *spatial) with 1-3 spatial dimensions, and the batch holds "
        f"{describe_batch(batch)}. Pass input_key= (an index, a dict key, a field name, or a "
        "callable batch -> tensor), e.g. input_key='image' or input_key=1."
    )


def describe_batch(batch: Any) -> str:
    """What a batch holds, one entry per leaf: ``[1]: Tensor (16, 3, 8, 8) float32``.

    Example:
        >>> import torch
        >>> describe_batch({"label": torch.tensor([1, 2]), "name": "a"})
        "['label']: Tensor (2,) int64, ['name']: str"
    """
    leaves = list(_leaves(batch, ""))
    if not leaves:
        return f"nothing ({type(batch).__name__})"
    shown = [
        f"{path or 'batch'}: Tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        if isinstance(v, torch.Tensor)
        else f"{path or 'batch'}: {type(v).__name__}"
        for path, v in leaves[:12]
    ]
    more = f", ... ({len(leaves) - 12} more)" if len(leaves) > 12 else ""
    return ", ".join(shown) + more


def _leaves(batch: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif (names := _named_tuple_fields(batch)) is not None:
        for name, value in zip(names, batch, strict=False):
            yield from _leaves(value, f"{path}.{name}" if path else name)
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from _leaves(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from _leaves(getattr(batch, f.name), f"{path}.{f.name}" if path else f.name)
    else:
        yield path, batch


def _tensors(batch: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for p, v in _leaves(batch, path):
        if isinstance(v, torch.Tensor):
            yield p, v


def gather_inputs(
    source: Iterable[Any] | Dataset[Any], input_key: InputKey, need: int, skip: int = 0
) -> torch.Tensor:
    """Up to ``need`` samples (CPU copies) from a tensor, an iterable of batches or a dataset.

    A ``Dataset`` yields single samples, not batches: its first ``need`` are collated as
    ``DataLoader(dataset, batch_size=need)`` would (in order).

    Iterating a loader draws a shuffle seed from the global RNG; the RNG streams are given
    back, so the training loop's own iterator sees exactly the stream it would have seen.
    Fewer than ``need`` come back when the source runs out; with ``skip`` (batches the caller
    already has), none at all is an empty batch. Raises when a source with nothing to skip
    yields nothing.
    """
    if isinstance(source, torch.Tensor):
        return source[:need].detach().to("cpu", copy=True)
    if isinstance(source, Dataset):
        source = DataLoader(source, batch_size=need)
    parts: list[torch.Tensor] = []
    with preserved_rng():
        for i, batch in enumerate(source):
            if i < skip:
                continue
            parts.append(extract_input(batch, input_key).detach().to("cpu", copy=True))
            if sum(p.shape[0] for p in parts) >= need:
                break
    if not parts:
        if skip:
            return torch.empty(0)
        raise ValueError("ERFMonitor: the inputs iterable yielded no batches.")
    return torch.cat(parts)[:need]


def noise_like(sample: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """Standard Gaussian noise of ``sample``'s per-sample shape, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_samples, *sample.shape[1:]), generator=gen, dtype=torch.float32)


def reuses_workers(loader: Any) -> bool:
    """True for a loader with persistent workers: a second iterator would disturb them."""
    return bool(getattr(loader, "persistent_workers", False)) and (
        getattr(loader, "num_workers", 0) > 0
    )

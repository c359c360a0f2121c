"""Where the probe inputs come from: a captured training batch, seeded noise, a tensor, a loader.

The probe set is fixed once (and checkpointed), so every probe of a run sees the same images
and the change of the ERF over training is a change of the model, not of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from erf_callback.engine.guard import preserved_rng

__all__ = [
    "InputKey",
    "InputSource",
    "extract_input",
    "first_batch_tensor",
    "gather_inputs",
    "noise_like",
    "reuses_workers",
]

InputSource = Literal["train", "noise"] | torch.Tensor | Iterable[Any]
InputKey = int | str | Callable[[Any], torch.Tensor] | None


def extract_input(batch: Any, input_key: InputKey) -> torch.Tensor:
    """The model input of one batch: ``batch[input_key]``, ``input_key(batch)`` or the first tensor.

    Example:
        >>> import torch
        >>> extract_input({"image": torch.zeros(2, 3, 4, 4)}, "image").shape
        torch.Size([2, 3, 4, 4])
    """
    try:
        if callable(input_key):
            x = input_key(batch)
        elif input_key is not None:
            x = batch[input_key]
        else:
            x = first_batch_tensor(batch)
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"ERFMonitor(input_key={input_key!r}) cannot take the input from a batch of type "
            f"{type(batch).__name__}: {err}. Pass input_key as an index, a dict key or a "
            "callable batch -> tensor."
        ) from err
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"ERFMonitor: the batch's input is {type(x).__name__}, not a tensor; set "
            "input_key to pick the image tensor."
        )
    return x


def first_batch_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a batch, searching tuples, lists and dict values depth-first."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, Mapping):
        for item in items:
            try:
                return first_batch_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"no tensor in a batch of type {type(batch).__name__}")


def gather_inputs(
    source: Iterable[Any], input_key: InputKey, need: int, skip: int = 0
) -> torch.Tensor:
    """``need`` samples (CPU copies) from a tensor or an iterable of batches.

    Iterating a loader draws a shuffle seed from the global RNG; the RNG streams are given
    back, so the training loop's own iterator sees exactly the stream it would have seen.
    """
    if isinstance(source, torch.Tensor):
        return source[:need].detach().to("cpu", copy=True)
    parts: list[torch.Tensor] = []
    with preserved_rng():
        for i, batch in enumerate(source):
            if i < skip:
                continue
            parts.append(extract_input(batch, input_key).detach().to("cpu", copy=True))
            if sum(p.shape[0] for p in parts) >= need:
                break
    if not parts:
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

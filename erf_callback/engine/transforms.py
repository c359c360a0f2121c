"""Turning a layer's raw output into the ``(N, C, *spatial)`` tensor whose unit is probed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["OutputTransform", "apply_transform", "first_output_tensor", "tokens_to_grid"]

OutputTransform = Callable[[Any], torch.Tensor]


def tokens_to_grid(
    grid_size: Sequence[int] | None = None, num_prefix_tokens: int = 1
) -> OutputTransform:
    """An ``output_transform`` for transformer blocks that output tokens ``(N, T, C)``.

    Drops ``num_prefix_tokens`` leading tokens (class/register tokens) and reshapes the rest to
    ``(N, C, *grid_size)``; without ``grid_size`` the grid is square.

    Raises:
        ValueError: ``num_prefix_tokens`` is not an int >= 0 or ``grid_size`` not 1-3
            positive ints (at once); the layer's tokens are not ``(N, T, C)``, are fewer than
            the prefix, or do not fill the grid (when the model runs).

    Example:
        >>> import torch
        >>> tokens_to_grid(num_prefix_tokens=1)(torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise ValueError(f"num_prefix_tokens must be an int >= 0; got {num_prefix_tokens!r}")
    if num_prefix_tokens < 0:
        raise ValueError(
            f"num_prefix_tokens must be >= 0 (the class/register tokens before the patch "
            f"tokens); got {num_prefix_tokens}"
        )
    if grid_size is not None:
        grid_size = tuple(grid_size)
        if not 1 <= len(grid_size) <= 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid_size
        ):
            raise ValueError(
                f"grid_size must be 1-3 positive ints, e.g. (14, 14); got {grid_size!r}"
            )

    def transform(output: Any) -> torch.Tensor:
        tokens = first_output_tensor(output)
        if tokens.dim() != 3:
            raise ValueError(f"tokens_to_grid expects (N, T, C) tokens; got {tuple(tokens.shape)}")
        if tokens.shape[1] <= num_prefix_tokens:
            raise ValueError(
                f"the layer outputs {tokens.shape[1]} tokens, no more than "
                f"num_prefix_tokens={num_prefix_tokens}: no patch tokens are left; pass the "
                "model's number of class/register tokens."
            )
        tokens = tokens[:, num_prefix_tokens:]
        count = tokens.shape[1]
        size = grid_size if grid_size is not None else (math.isqrt(count),) * 2
        if math.prod(size) != count:
            raise ValueError(
                f"{count} tokens (after dropping {num_prefix_tokens}) do not form a grid of "
                f"{size}; pass grid_size=(h, w) or the right num_prefix_tokens."
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)

    return transform


def first_output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise ValueError(
        f"the layer returned {type(output).__name__}, not a tensor; pass "
        "output_transform=lambda out: ... that returns an (N, C, *spatial) tensor."
    )


def apply_transform(name: str, output: Any, transform: OutputTransform | None) -> torch.Tensor:
    if transform is not None:
        out = transform(output)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"output_transform for {name!r} returned {type(out).__name__}")
        return out
    try:
        return first_output_tensor(output)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None

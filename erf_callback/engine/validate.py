"""Checks of ``compute_erf``'s arguments and of the probed layers' outputs.

Every check raises before any gradient is taken, with a message that names the problem and
the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from erf_callback.engine.config import OUTPUT

__all__ = ["check_inputs", "check_output", "normalize_layers", "per_layer"]


def normalize_layers(layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return [OUTPUT]
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is empty; pass layer names or None for the model output.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings; got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    return names


def check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, C, *spatial); got {type(inputs)}")
    if inputs.dim() not in (3, 4, 5):
        hint = " Add the batch dim: inputs.unsqueeze(0)." if inputs.dim() in (2, 3) else ""
        raise ValueError(
            f"inputs must be (N, C, *spatial) with 1-3 spatial dims; got shape "
            f"{tuple(inputs.shape)}.{hint}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs has no samples (N == 0).")
    if not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be floating point to take gradients; got {inputs.dtype}. "
            "Convert them, e.g. inputs.float() / 255."
        )
    return inputs


def per_layer(value: Any, names: list[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise KeyError(f"{what} names layers that are not probed: {sorted(unknown)}")
        return {n: value.get(n) for n in names}
    return dict.fromkeys(names, value)


def check_output(
    name: str, out: torch.Tensor, spatial_dims: int, position: Sequence[int] | None
) -> tuple[int, ...]:
    if out.dim() != spatial_dims + 2:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(out.shape)}, but an ERF needs "
            f"(N, C, *spatial) with {spatial_dims} spatial dims like the input. Probe a layer "
            "with a spatial output (a conv/pool/block), or pass output_transform (e.g. "
            "tokens_to_grid() for transformer tokens)."
        )
    spatial = tuple(out.shape[2:])
    if position is None:
        return tuple(s // 2 for s in spatial)
    pos = tuple(int(p) for p in position)
    if len(pos) != spatial_dims or any(not 0 <= p < s for p, s in zip(pos, spatial, strict=False)):
        raise ValueError(
            f"position {tuple(position)} is outside layer {name!r}'s output grid {spatial}; "
            f"use indices 0 <= p < size per axis (the centre is {tuple(s // 2 for s in spatial)})."
        )
    return pos

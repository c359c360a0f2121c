"""``compute_erf``: the effective receptive field of chosen layers, batched and truncated.

The ERF of a unit is the gradient of that unit with respect to the input pixels (Luo et al.,
NeurIPS 2016). Samples are independent in eval mode, so the gradient of the *sum* of the unit
over a batch gives every sample's gradient in one backward pass. The forward stops at the
deepest probed layer, all layers come from one forward, weight gradients are never computed,
and samples are processed in chunks so peak memory stays bounded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from erf_callback.engine.config import (
    DEFAULT,
    OUTPUT,
    Channels,
    Default,
    Position,
    ProbeConfig,
    Reduction,
    Transforms,
)
from erf_callback.engine.erf_map import ERFMap, Status
from erf_callback.engine.guard import probe_context
from erf_callback.engine.layers import (
    model_device_dtype,
    original_forwards,
    resolve_layers,
    unwrap_model,
)
from erf_callback.engine.transforms import OutputTransform, apply_transform
from erf_callback.engine.validate import check_inputs, check_output, normalize_layers, per_layer
from erf_callback.fit.metrics import MetricConfig
from erf_callback.trf import ReceptiveFieldTracer, RFGeometry
from erf_callback.warnings import ERFWarning

__all__ = ["compute_erf", "map_status"]


class _LayerMeta(NamedTuple):
    output_shape: tuple[int, ...]
    position: tuple[int, ...]
    geometry: RFGeometry | None


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from a forward hook once every probed layer has produced its output."""


def compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    *,
    probe: ProbeConfig | None = None,
    position: Position | Default | None = DEFAULT,
    channels: Channels | Default | None = DEFAULT,
    reduction: Reduction | Default = DEFAULT,
    output_transform: Transforms | Default | None = DEFAULT,
    chunk_size: int | Default | None = DEFAULT,
    config: MetricConfig | Default | None = DEFAULT,
) -> dict[str, ERFMap]:
    """Measure the effective receptive field of layers of ``model`` on ``inputs``.

    Args:
        model: any ``nn.Module``; ``torch.compile`` and DDP wrappers are unwrapped (the original
            module is probed, so nothing is recompiled). Its state is left exactly as found.
        inputs: ``(N, C, *spatial)`` with 1, 2 or 3 spatial dims. Cast to the model's dtype and
            moved to its device.
        layers: names as in ``model.named_modules()``; ``None`` probes the model output (key
            ``"output"``).
        probe: every probe option in one :class:`ProbeConfig`; the keyword arguments below
            override its fields.
        position: the probed unit's index in the layer's output grid (default: the centre,
            ``size // 2`` per axis). A mapping gives one position per layer.
        channels: output channels summed into the probed unit (default: all).
        reduction: how the input gradient is reduced over input channels: ``"abs"`` (sum of
            absolute values) or ``"replknet"`` (unit = sum of ReLU of channels; map = sum of
            ReLU of the gradient, as in RepLKNet's erf/visualize_erf.py).
        output_transform: turns a layer's raw output (tuple, dict, ViT tokens) into a tensor
            ``(N, C, *spatial)``; one callable for all layers or a mapping per layer. Default:
            the tensor itself, or the first tensor of a tuple/list. See :func:`tokens_to_grid`.
        chunk_size: samples per forward/backward; bounds peak memory. ``None``: all at once.
        config: metric choices (radius factor, energy fraction, fit method, ...); the same as
            ``ProbeConfig.metrics``.

    Returns:
        ``{layer_name: ERFMap}`` in the order of ``layers``.

    Raises:
        KeyError: an unknown layer name (the message lists the closest real names).
        ValueError: bad input rank or dtype, a layer without spatial output, a position outside
            the output, a layer the forward never reaches.

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
        >>> maps = compute_erf(net, torch.randn(8, 1, 32, 32), layers=["2"])
        >>> maps["2"].grad.shape, maps["2"].metrics()["trf_x"]
        (torch.Size([32, 32]), 7.0)
    """
    cfg = (probe or ProbeConfig()).replace(
        position=position,
        channels=channels,
        reduction=reduction,
        output_transform=output_transform,
        chunk_size=chunk_size,
        metrics=MetricConfig() if config is None else config,
    )
    net = unwrap_model(model)
    names = normalize_layers(layers)
    modules = resolve_layers(net, names)
    x_all = check_inputs(inputs)
    sums, meta = _accumulate(net, x_all, names, modules, cfg)
    return _assemble(sums, meta, names, x_all, cfg)


def _accumulate(
    net: nn.Module,
    x_all: torch.Tensor,
    names: list[str],
    modules: dict[str, nn.Module | None],
    cfg: ProbeConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, _LayerMeta]]:
    """Sum every probed unit's reduced input gradient over all samples, chunk by chunk."""
    spatial_dims = x_all.dim() - 2
    transforms = per_layer(cfg.output_transform, names, "output_transform")
    positions = per_layer(cfg.position, names, "position")
    device, dtype = model_device_dtype(net, x_all)
    n = x_all.shape[0]
    chunk = n if cfg.chunk_size is None else min(cfg.chunk_size, n)
    if _mixes_batch_in_eval(net):
        # BatchNorm without running statistics normalises with batch statistics even in eval
        # mode, so samples of one chunk would leak into each other's gradients.
        chunk = 1

    sums: dict[str, torch.Tensor] = {}
    meta: dict[str, _LayerMeta] = {}
    with probe_context(net, [device]), original_forwards(net):
        for start in range(0, n, chunk):
            x = x_all[start : start + chunk].to(device=device, dtype=dtype).detach()
            x.requires_grad_(True)
            tracer = ReceptiveFieldTracer(x) if start == 0 else None
            with tracer if tracer is not None else nullcontext():
                outputs = _forward_capture(net, x, names, modules, transforms)
            grads = []
            for i, name in enumerate(names):
                out = outputs[name]
                if start == 0:
                    pos = check_output(name, out, spatial_dims, positions[name])
                    meta[name] = _LayerMeta(tuple(out.shape[1:]), pos, _safe_geometry(tracer, out))
                unit = _select_unit(out, meta[name].position, cfg.channels)
                if cfg.reduction == "replknet":
                    unit = torch.relu(unit)
                if not unit.requires_grad:
                    raise ValueError(
                        f"layer {name!r}'s output is not connected to the input by autograd "
                        "(computed under no_grad, detached, or by a fused inference kernel); "
                        "probe a layer whose output is differentiable w.r.t. the input."
                    )
                (g,) = torch.autograd.grad(
                    unit.sum(), x, retain_graph=i < len(names) - 1, allow_unused=True
                )
                grads.append(torch.zeros_like(x) if g is None else g)
            del outputs
            for name, g in zip(names, grads, strict=True):
                g = torch.relu(g) if cfg.reduction == "replknet" else g.abs()
                part = g.sum(dim=(0, 1), dtype=torch.float64)
                sums[name] = part if name not in sums else sums[name] + part
    return sums, meta


def _assemble(
    sums: dict[str, torch.Tensor],
    meta: dict[str, _LayerMeta],
    names: list[str],
    x_all: torch.Tensor,
    cfg: ProbeConfig,
) -> dict[str, ERFMap]:
    """Turn the gradient sums into :class:`ERFMap` s: mean, status, location of the unit."""
    n = x_all.shape[0]
    in_shape = tuple(x_all.shape[2:])
    result: dict[str, ERFMap] = {}
    for name in names:
        out_shape, pos, geo = meta[name]
        grad = (sums[name] / n).cpu()
        status = map_status(grad, name)
        location = (
            geo.center(pos)
            if geo is not None
            else tuple(
                (p + 0.5) * i / o - 0.5
                for p, i, o in zip(pos, in_shape, out_shape[1:], strict=True)
            )
        )
        result[name] = ERFMap(
            grad=grad,
            layer=name,
            position=pos,
            output_shape=out_shape,
            location=tuple(float(v) for v in location),
            geometry=geo,
            num_samples=n,
            reduction=cfg.reduction,
            status=status,
            config=cfg.metrics,
        )
    return result


def map_status(grad: torch.Tensor, name: str) -> Status:
    """``"ok"``, or ``"nonfinite"`` / ``"zero"`` with an :class:`ERFWarning` saying why."""
    if not bool(torch.isfinite(grad).all()):
        warnings.warn(
            f"compute_erf: the gradient of {name!r} contains NaN/Inf; its metrics are NaN. "
            "Check the model for overflow (or probe in float32).",
            ERFWarning,
            stacklevel=3,
        )
        return "nonfinite"
    if not bool(grad.any()):
        warnings.warn(
            f"compute_erf: the gradient of {name!r} is zero everywhere; its metrics are NaN. "
            "Causes: dead ReLUs, a unit that does not depend on the input, or a sum over "
            "channels that is constant (after LayerNorm/GroupNorm it always is): pick "
            "channels=[...] or reduction='replknet'.",
            ERFWarning,
            stacklevel=3,
        )
        return "zero"
    return "ok"


# --------------------------------------------------------------------------------------------


def _forward_capture(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str],
    modules: dict[str, nn.Module | None],
    transforms: dict[str, OutputTransform | None],
) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    hooked = [n for n in names if modules[n] is not None]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if name in captured:  # a module called twice: its first call is probed
                return
            captured[name] = apply_transform(name, output, transforms[name])
            if len(captured) == len(names):
                raise _StopForward

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in hooked]  # type: ignore[union-attr]
    try:
        output = model(x)
    except _StopForward:
        output = None
    finally:
        for h in handles:
            h.remove()
    if OUTPUT in names and modules[OUTPUT] is None and output is not None:
        captured[OUTPUT] = apply_transform(OUTPUT, output, transforms[OUTPUT])
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(
            f"The model's forward never called {missing}: they exist but are not used on this "
            "path (e.g. a branch not taken, or a module only used in training_step). Probe "
            "modules that forward() runs."
        )
    return captured


def _select_unit(
    out: torch.Tensor, pos: tuple[int, ...], channels: int | Sequence[int] | None
) -> torch.Tensor:
    index: tuple[slice | int, ...] = (slice(None), slice(None), *pos)
    unit = out[index]
    if channels is None:
        return unit
    idx = [channels] if isinstance(channels, int) else list(channels)
    bad = [c for c in idx if not -unit.shape[1] <= c < unit.shape[1]]
    if bad or not idx:
        raise ValueError(
            f"channels {idx} are not valid for an output with {unit.shape[1]} channels."
        )
    return unit[:, idx]


def _safe_geometry(tracer: ReceptiveFieldTracer | None, out: torch.Tensor) -> RFGeometry | None:
    if tracer is None:
        return None
    try:
        return tracer.geometry(out)
    except Exception:  # a tracer bug must never cost the user their probe
        return None


def _mixes_batch_in_eval(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
        for m in model.modules()
    )

"""``compute_erf``: the effective receptive field of chosen layers, batched and truncated.

The ERF of a unit is the gradient of that unit with respect to the input pixels (Luo et al.,
NeurIPS 2016). Samples are independent in eval mode, so the gradient of the *sum* of the unit
over a batch gives every sample's gradient in one backward pass. The forward stops at the
deepest probed layer, all layers come from one forward, weight gradients are never computed,
and samples are processed in chunks so peak memory stays bounded.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

from erf_callback.erf_map import ERFMap
from erf_callback.guard import probe_context
from erf_callback.metrics import MetricConfig
from erf_callback.receptive_field import ReceptiveFieldTracer, RFGeometry
from erf_callback.warnings import ERFWarning

OUTPUT = "output"
Reduction = Literal["abs", "replknet"]
OutputTransform = Callable[[Any], torch.Tensor]

_WRAPPER_PARTS = ("_orig_mod", "module")


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from a forward hook once every probed layer has produced its output."""


def compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    *,
    position: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    channels: int | Sequence[int] | None = None,
    reduction: Reduction = "abs",
    output_transform: OutputTransform | Mapping[str, OutputTransform] | None = None,
    chunk_size: int | None = 32,
    config: MetricConfig | None = None,
) -> dict[str, ERFMap]:
    """Measure the effective receptive field of layers of ``model`` on ``inputs``.

    Args:
        model: any ``nn.Module``; ``torch.compile`` and DDP wrappers are unwrapped (the original
            module is probed, so nothing is recompiled). Its state is left exactly as found.
        inputs: ``(N, C, *spatial)`` with 1, 2 or 3 spatial dims. Cast to the model's dtype and
            moved to its device.
        layers: names as in ``model.named_modules()``; ``None`` probes the model output (key
            ``"output"``).
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
        config: metric choices (radius factor, energy fraction, fit method, ...).

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
    if reduction not in ("abs", "replknet"):
        raise ValueError(f"reduction must be 'abs' or 'replknet'; got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size}")
    net = unwrap_model(model)
    names = _normalize_layers(layers)
    modules = resolve_layers(net, names)
    x_all = _check_inputs(inputs)
    spatial_dims = x_all.dim() - 2
    transforms = _per_layer(output_transform, names, "output_transform")
    positions = _per_layer(position, names, "position")
    config = config or MetricConfig()

    device, dtype = model_device_dtype(net, x_all)
    n = x_all.shape[0]
    chunk = n if chunk_size is None else min(chunk_size, n)
    if _mixes_batch_in_eval(net):
        # BatchNorm without running statistics normalises with batch statistics even in eval
        # mode, so samples of one chunk would leak into each other's gradients.
        chunk = 1

    sums: dict[str, torch.Tensor] = {}
    meta: dict[str, tuple[tuple[int, ...], tuple[int, ...], RFGeometry | None]] = {}
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
                    pos = _check_output(name, out, spatial_dims, positions[name])
                    geo = _safe_geometry(tracer, out)
                    meta[name] = (tuple(out.shape[1:]), pos, geo)
                pos = meta[name][1]
                unit = _select_unit(out, pos, channels)
                if reduction == "replknet":
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
                g = torch.relu(g) if reduction == "replknet" else g.abs()
                part = g.sum(dim=(0, 1), dtype=torch.float64)
                sums[name] = part if name not in sums else sums[name] + part

    result: dict[str, ERFMap] = {}
    in_shape = tuple(x_all.shape[2:])
    for name in names:
        out_shape, pos, geo = meta[name]
        grad = (sums[name] / n).cpu()
        status = "ok"
        if not bool(torch.isfinite(grad).all()):
            status = "nonfinite"
            warnings.warn(
                f"compute_erf: the gradient of {name!r} contains NaN/Inf; its metrics are NaN. "
                "Check the model for overflow (or probe in float32).",
                ERFWarning,
                stacklevel=2,
            )
        elif not bool(grad.any()):
            status = "zero"
            warnings.warn(
                f"compute_erf: the gradient of {name!r} is zero everywhere; its metrics are NaN. "
                "Causes: dead ReLUs, a unit that does not depend on the input, or a sum over "
                "channels that is constant (after LayerNorm/GroupNorm it always is): pick "
                "channels=[...] or reduction='replknet'.",
                ERFWarning,
                stacklevel=2,
            )
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
            reduction=reduction,
            status=status,  # type: ignore[arg-type]
            config=config,
        )
    return result


def tokens_to_grid(
    grid_size: Sequence[int] | None = None, num_prefix_tokens: int = 1
) -> OutputTransform:
    """An ``output_transform`` for transformer blocks that output tokens ``(N, T, C)``.

    Drops ``num_prefix_tokens`` leading tokens (class/register tokens) and reshapes the rest to
    ``(N, C, *grid_size)``; without ``grid_size`` the grid is square.

    Example:
        >>> import torch
        >>> tokens_to_grid(num_prefix_tokens=1)(torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def transform(output: Any) -> torch.Tensor:
        tokens = _first_tensor(output)
        if tokens.dim() != 3:
            raise ValueError(f"tokens_to_grid expects (N, T, C) tokens; got {tuple(tokens.shape)}")
        tokens = tokens[:, num_prefix_tokens:]
        count = tokens.shape[1]
        size = tuple(grid_size) if grid_size is not None else (math.isqrt(count),) * 2
        if math.prod(size) != count:
            raise ValueError(
                f"{count} tokens (after dropping {num_prefix_tokens}) do not form a grid of "
                f"{size}; pass grid_size=(h, w) or the right num_prefix_tokens."
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)

    return transform


def model_device_dtype(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating dtype ``model`` computes (its first parameter or buffer).

    A model without tensors, or with only integer ones, falls back to ``inputs``' device and
    dtype. A ``bf16-true`` model gives bfloat16: probe inputs are cast to it.
    """
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else inputs.device
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else inputs.dtype
    return device, dtype


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters are probed: unwraps ``torch.compile`` and DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ == "DistributedDataParallel":
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module | None]:
    """Map layer names to modules (``"output"`` to None); a bad name gets a helpful KeyError."""
    table = {_strip_wrappers(n): m for n, m in model.named_modules()}
    out: dict[str, nn.Module | None] = {}
    for name in names:
        key = _strip_wrappers(name)
        if key in table and key != "":
            out[name] = table[key]
        elif name == OUTPUT:
            out[name] = None
        else:
            raise KeyError(_unknown_layer_message(name, [k for k in table if k]))
    return out


def deepest_spatial_layer(
    model: nn.Module, inputs: torch.Tensor, output_transform: OutputTransform | None = None
) -> str:
    """The submodule whose forward finishes last with a spatial output (more than one position).

    This is the default probed layer of :class:`ERFMonitor`: in a ResNet it is ``"layer4"``,
    in a VGG the ``"features"`` block; the classifier head and global pooling are skipped.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> deepest_spatial_layer(net, torch.randn(1, 1, 8, 8))
        '1'
    """
    net = unwrap_model(model)
    x = _check_inputs(inputs)[:1]
    finished: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            try:
                out = _apply_transform(name, output, output_transform)
            except Exception:
                return
            if out.dim() == x.dim() and math.prod(out.shape[2:]) > 1:
                finished.append(name)

        return hook

    names = {n: _strip_wrappers(n) for n, _ in net.named_modules()}
    handles = [
        m.register_forward_hook(make_hook(names[n])) for n, m in net.named_modules() if names[n]
    ]
    device, dtype = model_device_dtype(net, x)
    try:
        with probe_context(net), original_forwards(net), torch.no_grad():
            net(x.to(device, dtype))
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise ValueError(
            "No submodule of the model has a spatial output (N, C, *spatial); name the layers "
            "to probe explicitly (with output_transform for token outputs)."
        )
    return finished[-1]


def spatial_layer_names(model: nn.Module) -> list[str]:
    """Names of the convolution and pooling modules, the usual candidates for probing."""
    kinds = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
    return [n for n, m in unwrap_model(model).named_modules() if n and isinstance(m, kinds)]


# --------------------------------------------------------------------------------------------


def _normalize_layers(layers: str | Sequence[str] | None) -> list[str]:
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


def _strip_wrappers(name: str) -> str:
    """Drop the ``_orig_mod`` / ``module`` segments that compile and DDP wrappers add."""
    parts = name.split(".")
    while parts and parts[0] in _WRAPPER_PARTS:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


@contextmanager
def original_forwards(model: nn.Module) -> Iterator[None]:
    """Route compiled modules to their original forward for the duration of a probe.

    Eval mode and inputs that require grad would make a compiled module recompile (and a
    probe is not worth a recompile). ``torch.compile``'d submodules get their instance
    ``forward`` pointed at ``_orig_mod.__call__`` (hooks still fire); a module compiled by
    Lightning (``_compiler_ctx``) gets its ``original_forward`` back.
    """
    saved: list[tuple[nn.Module, bool, Any]] = []
    for m in model.modules():
        inner = getattr(m, "_orig_mod", None)
        ctx = getattr(m, "_compiler_ctx", None)
        if isinstance(inner, nn.Module):
            replacement = inner.__call__
        elif isinstance(ctx, dict) and callable(ctx.get("original_forward")):
            replacement = ctx["original_forward"]
        else:
            continue
        saved.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
        m.forward = replacement  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, had_own, own in reversed(saved):
            if had_own:
                m.forward = own  # type: ignore[method-assign]
            else:
                del m.forward


def _unknown_layer_message(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    close += [c for c in candidates if name and name in c and c not in close][: 5 - len(close)]
    hint = (
        f" Closest names: {', '.join(repr(c) for c in close)}."
        if close
        else f" Top-level names: {', '.join(repr(c) for c in candidates if '.' not in c)[:400]}."
    )
    return (
        f"No layer named {name!r} in the model.{hint} Names are those of "
        "model.named_modules(); use 'output' (or layers=None) for the model output."
    )


def _check_inputs(inputs: Any) -> torch.Tensor:
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


def _per_layer(value: Any, names: list[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise KeyError(f"{what} names layers that are not probed: {sorted(unknown)}")
        return {n: value.get(n) for n in names}
    return dict.fromkeys(names, value)


def _first_tensor(output: Any) -> torch.Tensor:
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
            captured[name] = _apply_transform(name, output, transforms[name])
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
        captured[OUTPUT] = _apply_transform(OUTPUT, output, transforms[OUTPUT])
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(
            f"The model's forward never called {missing}: they exist but are not used on this "
            "path (e.g. a branch not taken, or a module only used in training_step). Probe "
            "modules that forward() runs."
        )
    return captured


def _apply_transform(name: str, output: Any, transform: OutputTransform | None) -> torch.Tensor:
    if transform is not None:
        out = transform(output)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"output_transform for {name!r} returned {type(out).__name__}")
        return out
    try:
        return _first_tensor(output)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None


def _check_output(
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


def _select_unit(
    out: torch.Tensor, pos: tuple[int, ...], channels: int | Sequence[int] | None
) -> torch.Tensor:
    unit = out[(slice(None), slice(None), *pos)]
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

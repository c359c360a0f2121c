"""Finding the layers to probe: names, wrappers, the default layer, the model's device.

``torch.compile`` and DDP wrap a model and prefix its submodule names (``_orig_mod.``,
``module.``); everything here sees through them, so users name layers as in their own code.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from erf_callback.engine.config import OUTPUT
from erf_callback.engine.guard import probe_context
from erf_callback.engine.transforms import OutputTransform, apply_transform
from erf_callback.engine.validate import check_inputs, check_model

__all__ = [
    "OUTPUT",
    "deepest_spatial_layer",
    "model_device_dtype",
    "original_forwards",
    "resolve_layers",
    "unwrap_model",
]

_WRAPPER_PARTS = ("_orig_mod", "module")


def model_device_dtype(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating dtype ``model`` computes (its first parameter or buffer).

    A model without tensors, or with only integer ones, falls back to ``inputs``' device and
    dtype. A ``bf16-true`` model gives bfloat16: probe inputs are cast to it.
    """
    ref: torch.Tensor | None = next(iter(model.parameters()), None)
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
    found = {name: _walk(model, name) for name in names}
    if all(m is not None or name == OUTPUT for name, m in found.items()):
        return found
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


def _walk(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule at the dotted path ``name`` (``torch.compile`` / DDP wrapper segments
    optional, as in :func:`resolve_layers`' table), or None; no walk of the whole model."""
    if not name:
        return None
    module = model
    for part in _strip_wrappers(name).split("."):
        child = module._modules.get(part)
        while child is None and isinstance(module._modules.get("_orig_mod"), nn.Module):
            module = module._modules["_orig_mod"]  # type: ignore[assignment]
            child = module._modules.get(part)
        if child is None:
            return None
        module = child
    return module


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
    check_model(net)
    x = check_inputs(inputs)[:1]
    finished: list[str] = []
    # Outputs of one more spatial axis than (N, C, *spatial) reads the inputs with: the inputs
    # have no channel axis (grayscale (N, H, W), raw audio (N, L)) and the model adds one,
    # as compute_erf finds out for itself; used when no output fits the usual reading.
    without_channels: list[str] = []
    # Else outputs of another rank (1-3 spatial axes): the model reshapes its inputs (flat
    # images (N, 784) viewed as (N, 1, 28, 28)).
    reshaped: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            try:
                out = apply_transform(name, output, output_transform)
            except Exception:
                return
            if math.prod(out.shape[2:]) <= 1 or not 3 <= out.dim() <= 5:
                return
            if out.dim() == x.dim():
                finished.append(name)
            elif out.dim() == x.dim() + 1:
                without_channels.append(name)
            else:
                reshaped.append(name)

        return hook

    names = {n: _strip_wrappers(n) for n, _ in net.named_modules()}
    handles = [
        m.register_forward_hook(make_hook(names[n])) for n, m in net.named_modules() if names[n]
    ]
    device, dtype = model_device_dtype(net, x)
    try:
        with probe_context(net), original_forwards(net), torch.no_grad():
            net(x.to(device, dtype, copy=True))  # the forward may write into its input
    finally:
        for h in handles:
            h.remove()
    finished = finished or without_channels or reshaped
    if not finished:
        raise ValueError(
            "No submodule of the model has a spatial output (N, C, *spatial); name the layers "
            "to probe explicitly (with output_transform for token outputs)."
        )
    return finished[-1]


def _strip_wrappers(name: str) -> str:
    """Drop the ``_orig_mod`` / ``module`` segments that compile and DDP wrappers add."""
    parts = name.split(".")
    while parts and parts[0] in _WRAPPER_PARTS:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


@contextmanager
def original_forwards(
    model: nn.Module, modules: Iterable[nn.Module] | None = None
) -> Iterator[None]:
    """Route compiled modules to their original forward for the duration of a probe.

    Eval mode and inputs that require grad would make a compiled module recompile (and a
    probe is not worth a recompile). ``torch.compile``'d submodules get their instance
    ``forward`` pointed at ``_orig_mod.__call__`` (hooks still fire); a module compiled by
    Lightning (``_compiler_ctx``) gets its ``original_forward`` back.
    """
    saved: list[tuple[nn.Module, bool, Any]] = []
    for m in model.modules() if modules is None else modules:
        # Read from the instance's dicts: getattr with a default goes through
        # Module.__getattr__ and a caught AttributeError per module (~0.3 ms per probe of a
        # ResNet). torch.compile registers _orig_mod as a submodule; Lightning's context is a
        # plain attribute.
        own = m.__dict__
        inner = m._modules.get("_orig_mod", own.get("_orig_mod"))
        ctx = own.get("_compiler_ctx")
        if isinstance(inner, nn.Module):
            replacement = inner.__call__
        elif isinstance(ctx, dict) and callable(ctx.get("original_forward")):
            replacement = ctx["original_forward"]
        else:
            continue
        saved.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
        m.forward = replacement
    try:
        yield
    finally:
        for m, had_own, own in reversed(saved):
            if had_own:
                m.forward = own
            else:
                del m.forward


def _submodule_hint(name: str, candidates: list[str]) -> str:
    """``module=`` advice when ``name`` exists under exactly one submodule (``model.layer2``)."""
    parents = sorted({c[: -len(name) - 1] for c in candidates if c.endswith("." + name)})
    if len(parents) != 1:
        return ""
    return (
        f" It exists as {parents[0] + '.' + name!r}: the network lives in a submodule, so pass "
        f"module={parents[0]!r} (ERFMonitor) or probe that submodule, and keep {name!r}."
    )


def _unknown_layer_message(name: str, candidates: list[str]) -> str:
    """The KeyError text for an unknown layer name: close names, and ``module=`` if it helps.

    Example:
        >>> print(_unknown_layer_message("layer2", ["model", "model.layer1", "model.layer2"]))
        ... # doctest: +NORMALIZE_WHITESPACE
        No layer named 'layer2' in the model. It exists as 'model.layer2': the network lives
        in a submodule, so pass module='model' (ERFMonitor) or probe that submodule, and keep
        'layer2'. Closest names: 'model.layer2', 'model.layer1'. Names are those of
        model.named_modules(); use 'output' (or layers=None) for the model output.
    """
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    close += [c for c in candidates if name and name in c and c not in close][: 5 - len(close)]
    hint = (
        f" Closest names: {', '.join(repr(c) for c in close)}."
        if close
        else f" Top-level names: {', '.join(repr(c) for c in candidates if '.' not in c)[:400]}."
    )
    return (
        f"No layer named {name!r} in the model.{_submodule_hint(name, candidates)}{hint} "
        "Names are those of "
        "model.named_modules(); use 'output' (or layers=None) for the model output."
    )

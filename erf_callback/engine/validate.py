"""Checks of ``compute_erf``'s arguments and of the probed layers' outputs.

Every check raises before any gradient is taken, with a message that names the problem and
the fix.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from erf_callback.engine.config import OUTPUT

__all__ = [
    "NO_AXES_HINT",
    "UNBATCHED_HINT",
    "ModelForwardError",
    "UnbatchedInputError",
    "check_eager",
    "check_finite",
    "check_inputs",
    "check_model",
    "check_output",
    "is_numpy",
    "model_forward_context",
    "nonfinite_samples",
    "normalize_layers",
    "per_layer",
    "torch_error",
    "unbatched_guard",
    "uninitialised",
]


class UnbatchedInputError(ValueError):
    """The inputs look like an image without its batch dimension (a model layer received its
    unbatched form, or a probed layer has one more axis than the inputs)."""


class ModelForwardError(RuntimeError):
    """A torch function in the model's forward raised a ``RuntimeError`` on the inputs
    compute_erf gave it (a wrong channel count, size or dtype). The message says which inputs
    and how they were run; the original error is the ``__cause__``."""


UNBATCHED_HINT = (
    "If inputs is one unbatched image, add the batch dimension: inputs.unsqueeze(0) "
    "(compute_erf expects (N, C, *spatial))."
)
# The same for inputs of two axes, read as 1-D signals without a channel axis.
NO_AXES_HINT = (
    "If inputs is one image of shape (H, W), add the batch and channel axes: inputs[None, "
    "None] (compute_erf expects (N, C, *spatial), or (N, *spatial) for a model that adds the "
    "channel axis itself)."
)


def normalize_layers(
    layers: str | Sequence[str] | None,
    none_means: str = "the model output",
    model: nn.Module | None = None,
) -> list[str]:
    """The layer names as a list (``None``: the model output), checked; ``none_means`` is what
    ``layers=None`` selects for the caller, named in the messages. A set is taken in sorted
    order (its own order changes from run to run). ``model``, where known, lets the message
    for a module given in place of its name say that name."""
    if layers is None:
        return [OUTPUT]
    names: list[Any]
    if isinstance(layers, str):
        names = [layers]
    elif isinstance(layers, nn.Module):
        names = [layers]  # refused below, with its name
    elif isinstance(layers, (set, frozenset)):
        names = sorted(layers, key=str)
    elif isinstance(layers, Iterable) and not isinstance(layers, (bytes, Mapping)):
        names = list(layers)
    else:
        raise TypeError(
            f"layers must be a layer name, a sequence of names or None ({none_means}); got "
            f"{layers!r}. Names are those of model.named_modules(), e.g. layers=['layer3']."
        )
    if not names:
        raise ValueError(f"layers is empty; pass layer names, or None to probe {none_means}.")
    for name in names:
        if isinstance(name, nn.Module):
            raise TypeError(_module_for_name(name, model))
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings; got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    return names


def _module_for_name(module: nn.Module, model: nn.Module | None) -> str:
    """The message for a module given where its name belongs."""
    found = [n for n, m in model.named_modules() if m is module and n] if model is not None else []
    fix = (
        f"pass its name, {found[0]!r}"
        if found
        else "pass its name in model.named_modules() (e.g. 'layer3' for model.layer3)"
    )
    return f"layers takes layer names, not modules; got the module {type(module).__name__}: {fix}."


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a NumPy array (or scalar), without importing NumPy: a probe's
    inputs must be a tensor, and an array passed instead deserves the conversion as a hint.

    Example:
        >>> is_numpy(torch.zeros(1)), is_numpy([1.0])
        (False, False)
    """
    return type(value).__module__ == "numpy"


def check_inputs(inputs: Any, finite: bool = True) -> torch.Tensor:
    """``inputs`` if they are a dense floating ``(N, C, *spatial)`` tensor with data; else a
    clear error. ``finite=False`` leaves the NaN/Inf check to the caller
    (:func:`nonfinite_samples` and :func:`check_finite`: on a GPU, reading its result waits
    for the device, so ``compute_erf`` reads it after the probe)."""
    if not isinstance(inputs, torch.Tensor):
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], torch.Tensor):
            hint = " Stack the images into one batch: torch.stack(images)."
        elif is_numpy(inputs):
            hint = " Convert it: torch.from_numpy(inputs) (images as (N, C, H, W))."
        else:
            hint = ""
        raise TypeError(
            f"inputs must be a torch.Tensor (N, C, *spatial); got {type(inputs).__name__}.{hint}"
        )
    if inputs.layout != torch.strided:
        raise ValueError(
            f"inputs must be a dense tensor; got layout {inputs.layout}. Pass inputs.to_dense()."
        )
    if inputs.dim() not in (2, 3, 4, 5):
        hint = " Add the batch dim: inputs.unsqueeze(0)." if inputs.dim() == 1 else ""
        raise ValueError(
            f"inputs must be (N, C, *spatial) with 1-3 spatial dims (or (N, *spatial) for a "
            f"model that adds the channel axis itself); got shape {tuple(inputs.shape)}.{hint}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs has no samples (N == 0).")
    if 0 in inputs.shape[1:]:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} have an empty channel or spatial axis; each "
            "sample needs at least one channel and one pixel along every spatial axis."
        )
    if not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be floating point to take gradients; got {inputs.dtype}. Convert "
            "them as the model's training data reaches it: inputs.float() if the model scales "
            "integer images itself, else as the data pipeline does (e.g. inputs.float() / 255, "
            "then its normalisation)."
        )
    if inputs.device.type == "meta":
        raise ValueError("inputs are on the meta device (no data); pass real tensors.")
    if finite:
        check_finite(inputs)
    return inputs


def nonfinite_samples(inputs: torch.Tensor) -> torch.Tensor:
    """Per sample, whether it may hold a NaN or an Inf (a bool tensor on the inputs' device;
    nothing is read back, so nothing waits for a GPU).

    A NaN or Inf makes its sample's sum non-finite, so a sum per sample finds them in one
    pass (no input-sized temporary: 18x faster than ``isfinite`` on a CPU batch of 64 images
    at 224x224). A sum can also overflow where every value is finite: :func:`check_finite`
    confirms value by value before it calls a sample bad.
    """
    x = inputs.detach().flatten(1)
    if x.device.type == "mps":  # no float64 there: the plain check
        return ~torch.isfinite(x).all(dim=1)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ~torch.isfinite(x.sum(dim=1, dtype=dtype))


def check_finite(inputs: torch.Tensor, bad: torch.Tensor | None = None) -> None:
    """Raise a ``ValueError`` naming the samples of ``inputs`` with NaN or Inf, if any
    (``bad``: their :func:`nonfinite_samples`, where already computed)."""
    bad = nonfinite_samples(inputs) if bad is None else bad
    if not bool(bad.any()):
        return
    bad = ~torch.isfinite(inputs.detach()).flatten(1).all(dim=1)  # a sum may have overflowed
    count = int(bad.sum())
    if count:
        first = bad.nonzero()[:5, 0].tolist()
        raise ValueError(
            f"inputs contain NaN or Inf in {count} of {inputs.shape[0]} samples (indices "
            f"{first}{', ...' if count > 5 else ''}); an ERF of such inputs is meaningless. Pass "
            "finite inputs: drop or repair those samples (e.g. torch.nan_to_num)."
        )


def check_model(model: Any, modules: Sequence[nn.Module] | None = None) -> None:
    """Refuse models that cannot be probed, before any forward (e.g. on the meta device).

    ``modules``: ``list(model.modules())`` where the caller has it already (every probe walks
    the model several times; each walk of a ResNet costs ~0.05 ms)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module; got {type(model).__name__}. Wrap a function in "
            "a module whose layers are submodules (their names are what layers= selects)."
        )
    everything = list(model.modules()) if modules is None else modules
    check_eager(model, everything)
    _check_forward_takes_the_input(model)
    # The names are built only when there is something to report (every probe runs this).
    if not any(_unusable(m) for m in everything):
        return
    named = [*model.named_parameters(), *model.named_buffers()]
    lazy = uninitialised(model)
    if lazy:
        raise ValueError(
            f"the model has {len(lazy)} uninitialised parameters/buffers of lazy modules (e.g. "
            f"{lazy[0]!r}): their shapes are not known yet. Run the model once on a batch "
            "(model(x)), as its first training step would, then probe; a probe does not "
            "initialise them, as that would change the model."
        )
    frozen = [n for n, t in named if t.is_inference()]
    if frozen:
        raise ValueError(
            f"the model has {len(frozen)} parameters/buffers made under torch.inference_mode "
            f"(e.g. {frozen[0]!r}): autograd cannot take gradients through inference tensors. "
            "Build or load the model outside inference_mode (torch.no_grad() is fine), or give "
            "it ordinary copies outside inference_mode: model.load_state_dict({k: v.clone() "
            "for k, v in model.state_dict().items()}, assign=True)."
        )
    meta = [n for n, t in named if t.is_meta]
    if meta:
        raise ValueError(
            f"the model has {len(meta)} parameters/buffers on the meta device (e.g. {meta[0]!r}): "
            "they hold no values, so there is no gradient to measure. Materialise the model "
            "first, e.g. model.to_empty(device='cpu') followed by load_state_dict(...)."
        )


def uninitialised(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers that lazy modules have not initialised yet
    (their shapes come from the first forward).

    Example:
        >>> uninitialised(nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU()))
        ['0.weight', '0.bias']
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if is_lazy(t)]


def check_eager(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> None:
    """Raise a TypeError for a model that is, or holds, a TorchScript module: its compiled
    graph calls no Python forward hooks (how a layer's output is caught) and keeps its
    tensors in tables that the probe's guard cannot snapshot and restore.

    The one check of :func:`check_model` that the callback also makes at setup, where lazy or
    meta tensors may still be materialised before the first batch.

    Example:
        >>> check_eager(nn.Conv2d(1, 1, 3))  # an eager module passes
    """
    if not any(isinstance(m, torch.jit.ScriptModule) for m in modules or model.modules()):
        return
    where = next(name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule))
    what = "the model is" if where == "" else f"submodule {where!r} is"
    raise TypeError(
        f"{what} a TorchScript module (torch.jit.script / torch.jit.trace): its compiled graph "
        "runs without the Python forward hooks a probe needs, so it cannot be probed. Probe "
        "the eager nn.Module it was made from (for a file saved with torch.jit.save: build "
        "the model's class and load its state_dict); torch.compile'd models can be probed."
    )


def _check_forward_takes_the_input(model: nn.Module) -> None:
    """Refuse a model whose ``forward`` cannot be called with the input tensor alone (a probe
    calls ``model(inputs)``), naming the way out, instead of the forward's own TypeError."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature: let it speak
        return
    try:
        signature.bind(None)
    except TypeError:
        children = [name for name, _ in model.named_children()][:5]
        hint = f" (its submodules: {', '.join(map(repr, children))})" if children else ""
        raise TypeError(
            f"{type(model).__name__}.forward{signature} cannot be called with the input tensor "
            "alone, and a probe calls model(inputs). Probe a submodule that takes the image "
            f"alone{hint}: compute_erf(model.<name>, ...) or ERFMonitor(module='<name>'); or "
            "wrap the model in an nn.Module whose forward(x) supplies the other arguments."
        ) from None


def _unusable(module: nn.Module) -> bool:
    """Whether the module's own parameters or buffers hold a meta, an inference-mode or an
    uninitialised (lazy) tensor (most modules have neither table filled: those are skipped
    at once)."""
    for table in (module._parameters, module._buffers):
        if table and any(
            t is not None and (is_lazy(t) or t.is_meta or t.is_inference()) for t in table.values()
        ):
            return True
    return False


@contextmanager
def unbatched_guard(
    model: nn.Module, spatial_dims: int, hint: str = UNBATCHED_HINT
) -> Iterator[None]:
    """Raise when a conv or pooling layer is called on an unbatched input during the forward.

    ``Conv2d`` accepts an unbatched ``(C, H, W)``; so an image passed without its batch
    dimension is read by compute_erf as ``C`` one-dimensional samples and by the model as one
    unbatched image, and a meaningless map would come out. Any ``*Nd`` conv/pool module that
    receives ``N + 1`` dims (its unbatched form) reveals it.
    """

    def make_hook(name: str, dims: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if x.dim() == dims + 1:
                raise UnbatchedInputError(
                    f"layer {name!r} ({type(module).__name__}) received an unbatched input of "
                    f"shape {tuple(x.shape)}: compute_erf read the inputs as {spatial_dims}-D "
                    f"signals but the model works on {dims}-D ones. {hint}"
                )
            if x.dim() > dims + 2:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) works on {dims}-D signals but "
                    f"received an input of shape {tuple(x.shape)}: compute_erf read the inputs "
                    f"as {spatial_dims}-D signals. Pass inputs of shape (N, C, {_axes(dims)}) "
                    "for this model."
                )

        return hook

    handles = []
    wider: tuple[str, nn.Module, int] | None = None  # a layer of more dims than the inputs
    for name, module in model.named_modules():
        dims = _module_spatial_dims(module)
        if dims is not None and dims != spatial_dims:
            handles.append(module.register_forward_pre_hook(make_hook(name, dims)))
            if dims > spatial_dims and wider is None:
                wider = (name, module, dims)
    try:
        yield
    except (RuntimeError, ValueError) as err:
        # A layer before the first conv/pool may fail on the unbatched form first (a
        # BatchNorm2d, a GroupNorm or LayerNorm over (C, H, W)), in torch's own words.
        if wider is None or _origin(err) not in ("model", "torch"):
            raise
        name, module, dims = wider
        raise UnbatchedInputError(
            f"the model's forward failed on the inputs read as {spatial_dims}-D signals, and "
            f"the model works on {dims}-D ones (e.g. layer {name!r}, {type(module).__name__}): "
            f"{str(err).rstrip('.')}. {hint}"
        ) from err
    finally:
        for h in handles:
            h.remove()


@contextmanager
def model_forward_context(x_all: torch.Tensor, chunk: int, spatial_dims: int) -> Iterator[None]:
    """Re-raise a ``RuntimeError`` that torch raises in the forward inside as a
    :class:`ModelForwardError` that names the inputs (``x_all``, run ``chunk`` samples at a
    time) and what shape the model must take; torch's own message names neither, and shows
    the chunk's batch size, not the inputs'."""
    try:
        yield
    except RuntimeError as err:
        # Only torch's own complaints: the model's code says what it wants in its own words
        # (and may fail for reasons that have nothing to do with the inputs).
        if type(err) is not RuntimeError or _origin(err) != "torch":
            raise
        shape = f"{tuple(x_all.shape)} {str(x_all.dtype).removeprefix('torch.')}"
        alone = (
            f" compute_erf runs the first {'sample' if chunk == 1 else f'{chunk} samples'} "
            f"alone, so a shape in that message has batch size {chunk}."
            if chunk != x_all.shape[0]
            else ""
        )
        raise ModelForwardError(
            f"the model's forward failed on compute_erf's inputs of shape {shape}: "
            f"{str(err).rstrip().rstrip('.')}.{alone} Check that the inputs are what the model "
            f"takes: (N, C, {_axes(spatial_dims)}) with its input channels, size and dtype."
        ) from err


def _origin(err: BaseException) -> str | None:
    """Who raised ``err``, a ``RuntimeError`` or ``ValueError`` of the forward: ``"torch"``
    (a torch function, in C or in its Python code), ``"model"`` (the model's own code, or
    any other library), ``"package"`` (erf-callback); None for other errors and for running
    out of memory. The innermost frame tells, once the pass-through calls of the package's
    ``__torch_function__`` modes are set aside (a torch function raising in C shows its
    caller's frame last)."""
    # Running out of memory (CUDA's "out of memory", the CPU allocator's "not enough memory")
    # says nothing of the inputs or the model.
    text = str(err).lower()
    if type(err) not in (RuntimeError, ValueError) or any(t in text for t in _MEMORY_WORDS):
        return None
    frames = traceback.extract_tb(err.__traceback__)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    in_c = False
    while (
        frames
        and frames[-1].name == "__torch_function__"
        and (frames[-1].line or "").replace(" ", "").endswith("func(*args,**kwargs)")
        and os.path.abspath(frames[-1].filename).startswith(package)
    ):
        frames.pop()
        in_c = True
    if not frames:
        return None
    where = os.path.abspath(frames[-1].filename)
    if in_c or where.startswith(_TORCH_DIR):
        return "torch"
    return "package" if where.startswith(package) else "model"


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_MEMORY_WORDS = ("out of memory", "not enough memory")


def torch_error(err: BaseException) -> BaseException:
    """torch's own error inside a :class:`ModelForwardError`; any other error itself (for
    callers that give their own account of the inputs, in place of compute_erf's)."""
    if isinstance(err, ModelForwardError) and err.__cause__ is not None:
        return err.__cause__
    return err


def _axes(dims: int) -> str:
    return ", ".join(("D", "H", "W")[3 - dims :])


def _module_spatial_dims(module: nn.Module) -> int | None:
    """Spatial dims of an ``*Nd`` conv or pooling module (``Conv2d`` -> 2); None for others."""
    conv_or_pool = (
        nn.modules.conv._ConvNd,
        nn.modules.pooling._MaxPoolNd,
        nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd,
        nn.modules.pooling._AdaptiveMaxPoolNd,
    )
    if not isinstance(module, conv_or_pool):
        return None
    suffix = type(module).__name__[-2:]
    return {"1d": 1, "2d": 2, "3d": 3}.get(suffix)


def per_layer(value: Any, names: list[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise KeyError(f"{what} names layers that are not probed: {sorted(unknown)}")
        return {n: value.get(n) for n in names}
    return dict.fromkeys(names, value)


def check_output(
    name: str,
    shape: Sequence[int],
    spatial_dims: int,
    position: Sequence[int] | None,
    transformed: bool = False,
) -> tuple[int, ...]:
    """The probed unit's position in a layer output of ``shape`` (N, C, *spatial);
    ``transformed``: the shape is what the layer's ``output_transform`` returned."""
    if len(shape) != spatial_dims + 2:
        unbatched = len(shape) > spatial_dims + 2
        need = f"(N, C, *spatial) with {spatial_dims} spatial dims like the input"
        if transformed:
            message = (
                f"the output_transform of layer {name!r} returns shape {_batched(shape)}, but "
                f"an ERF needs {need}. Make it return the layer's output as "
                f"(N, C, {_axes(spatial_dims)})."
            )
        else:
            message = (
                f"layer {name!r} outputs shape {_batched(shape)}, but an ERF needs {need}. Probe "
                "a layer with a spatial output (a conv/pool/block), or pass output_transform "
                "(e.g. tokens_to_grid() for transformer tokens)."
            )
        if unbatched:
            message += " " + UNBATCHED_HINT
        raise (UnbatchedInputError if unbatched else ValueError)(message)
    spatial = tuple(shape[2:])
    if position is None:
        return tuple(s // 2 for s in spatial)
    pos = tuple(int(p) for p in position)
    if len(pos) != spatial_dims:
        count = f"{len(pos)} index" if len(pos) == 1 else f"{len(pos)} indices"
        raise ValueError(
            f"position {tuple(position)} has {count}, but layer {name!r}'s output has "
            f"{spatial_dims} spatial axes {spatial}: give one index per axis (the centre is "
            f"{tuple(s // 2 for s in spatial)})."
        )
    if any(not 0 <= p < s for p, s in zip(pos, spatial, strict=True)):
        raise ValueError(
            f"position {tuple(position)} is outside layer {name!r}'s output grid {spatial}; "
            f"use indices 0 <= p < size per axis (the centre is {tuple(s // 2 for s in spatial)})."
        )
    return pos


def _batched(shape: Sequence[int]) -> str:
    """A layer's output shape with its batch axis as ``N`` (the probe's first chunk may hold
    fewer samples than the caller passed): ``(N, 10)``."""
    dims = ["N", *(str(int(n)) for n in shape[1:])] if len(shape) else []
    return f"({', '.join(dims)})"

"""Running the probed model faster without touching it: conv shadows for the later chunks.

Two rewrites that change no result and leave no trace on the model:

* **BatchNorm folding.** An eval-mode ``BatchNorm`` is an affine map per channel, so a
  convolution followed by it equals one convolution with scaled weights and a new bias. A
  pair is folded only when the first chunk's forward showed that the BatchNorm's input *is* the
  convolution's output (same autograd node, no in-place change between them), that nothing
  else consumes that output on the way to the probed layers (nor reads its values outside
  autograd, see :class:`ForwardRecorder`), that neither module was called
  twice or carries hooks, and that the convolution's own output is not probed. The later
  chunks check that their forward calls each folded pair the same way (see
  :class:`FoldDivergedError`): a model that branches on the data may not.
* **channels_last** (2-D convolutions on CPU, and on CUDA where tensor cores run the dtype):
  the input and ``channels_last`` copies of the conv weights make oneDNN's and cuDNN's faster
  kernels run end to end.

The model is never modified. For the duration of a chunk the reached convolutions get an
instance ``forward`` that calls ``conv._conv_forward`` with the shadow weights, and folded
BatchNorms an identity ``forward``; both are removed afterwards (the instance ``__dict__`` is
left as found). Extra memory: one copy of the weights of the reached convolutions; when
that copy does not fit (an out-of-memory error), the probe runs the model as written.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from erf_callback.engine.guard import plain_attributes

__all__ = ["FastPath", "FoldDivergedError", "ForwardRecorder", "Recipe"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
_Norm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d


class ForwardRecorder(TorchFunctionMode):
    """Records, during one forward, who feeds whom among convolutions and BatchNorms.

    Module hooks see each conv's output and each BatchNorm's input; as a
    :class:`~torch.overrides.TorchFunctionMode` it also sees every torch call that reads a
    conv's output. A use that autograd does not record (a mask ``y > 0``, ``y.detach()``, a
    computation under ``no_grad``) would see the folded values if the pair were folded, so a
    conv whose output is read anywhere but inside its BatchNorm (shape and dtype queries
    aside) is not a candidate.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
        >>> x = torch.randn(1, 1, 8, 8, requires_grad=True)
        >>> with ForwardRecorder(net) as rec:
        ...     out = net(x)
        >>> [type(c).__name__ for c, _ in rec.candidate_pairs()]
        ['Conv2d']
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = model
        self.calls: dict[nn.Module, int] = {}
        self._conv_out: dict[nn.Module, Any] = {}  # conv -> grad_fn of its output
        self._norm_in: dict[nn.Module, Any] = {}  # norm -> grad_fn of its input
        self._handles: list[Any] = []
        # id(conv output) -> (weak reference, conv): the outputs whose readers are watched
        self._outputs: dict[int, tuple[weakref.ref[torch.Tensor], nn.Module]] = {}
        self._readers: dict[nn.Module, set[nn.Module | None]] = {}  # None: outside any norm
        self._norms: list[nn.Module] = []  # the BatchNorms whose forward is running

    def __enter__(self) -> ForwardRecorder:
        for m in self._model.modules():
            if type(m) in _CONVS or type(m) in _NORMS:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()  # holds no activation past the forward

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if self._outputs and not _reads_metadata_only(func):
            reader = self._norms[-1] if self._norms else None
            for a in (*args, *kwargs.values()) if kwargs else args:
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    e = self._outputs.get(id(t))
                    if e is not None and e[0]() is t:
                        self._readers.setdefault(e[1], set()).add(reader)
        return func(*args, **kwargs)

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls[module] = self.calls.get(module, 0) + 1
        if type(module) in _NORMS:
            self._norms.append(module)
            if args and isinstance(args[0], torch.Tensor):
                self._norm_in[module] = args[0].grad_fn

    def _post(self, module: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        if type(module) in _NORMS:
            if self._norms and self._norms[-1] is module:
                self._norms.pop()
        elif isinstance(out, torch.Tensor):
            self._conv_out[module] = out.grad_fn
            self._outputs[id(out)] = (weakref.ref(out), module)

    def candidate_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, norm) pairs, each called once, where the norm's input is the conv's output
        and nothing but that norm read the output."""
        by_node = {
            node: conv
            for conv, node in self._conv_out.items()
            if node is not None and self.calls.get(conv) == 1
        }
        pairs = []
        for norm, node in self._norm_in.items():
            conv = by_node.get(node)
            if (
                conv is not None
                and self.calls.get(norm) == 1
                and self._readers.get(conv, {norm}) == {norm}
            ):
                pairs.append((conv, norm))
        return pairs

    def conv_nodes(self) -> dict[nn.Module, Any]:
        return dict(self._conv_out)


# Tensor attributes and methods that read no values (a fold changes values, not these).
_METADATA = frozenset(
    {
        "shape", "dtype", "device", "requires_grad", "grad_fn", "ndim", "layout", "is_cuda",
        "is_leaf", "names", "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "output_nr",
        "_version", "dim", "ndimension", "size", "stride", "numel", "nelement", "__len__",
        "is_contiguous", "is_floating_point", "is_complex", "element_size", "storage_offset",
        "get_device", "data_ptr", "has_names", "__hash__",
    }
)  # fmt: skip


def _reads_metadata_only(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property: its name is the descriptor's
        name = getattr(getattr(func, "__self__", None), "__name__", None)
    return name in _METADATA


class Recipe(NamedTuple):
    """A fast path by module names: reached convolutions, (conv, BatchNorm) folds, layout."""

    convs: tuple[str, ...]
    folds: tuple[tuple[str, str], ...]
    channels_last: bool


class FastPath:
    """Shadow forwards for the reached convolutions (and folded BatchNorms).

    Build it with :meth:`plan` after the first chunk; enter :meth:`active` around later ones.
    """

    def __init__(
        self,
        forwards: dict[nn.Module, Callable[..., Any]],
        channels_last: bool,
        folded: int,
        recipe: Recipe | None = None,
        pending: dict[nn.Module, tuple[torch.Tensor, Any]] | None = None,
    ) -> None:
        self._forwards = forwards
        self.channels_last = channels_last
        self.folded = folded
        #: What :meth:`build` needs to make this fast path again for the same model (module
        #: names, so a remembered recipe holds no module alive); None once disabled.
        self.recipe = recipe
        #: Folded convs whose output this chunk has not yet reached their BatchNorm (see
        #: :func:`_folded_conv_forward`); shared with the shadow forwards.
        self._pending = pending if pending is not None else {}

    @classmethod
    def disabled(cls) -> FastPath:
        return cls({}, False, 0)

    @property
    def enabled(self) -> bool:
        return bool(self._forwards) or self.channels_last

    def disable(self) -> None:
        """Run the model as written from now on (the model rejected a rewrite)."""
        self._forwards, self.channels_last, self.folded, self.recipe = {}, False, 0, None

    @classmethod
    def plan(
        cls,
        model: nn.Module,
        recorder: ForwardRecorder,
        outputs: Sequence[torch.Tensor],
        probed: Sequence[nn.Module],
        channels_last: bool,
    ) -> FastPath:
        """Decide from the recorded forward which rewrites are safe, and build them."""
        consumers = _count_consumers(outputs)
        roots = {o.grad_fn for o in outputs if o.grad_fn is not None}
        hooked_globally = bool(
            nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        )
        conv_nodes = recorder.conv_nodes()
        folds: dict[nn.Module, nn.Module] = {}
        for conv, norm in recorder.candidate_pairs():
            node = conv_nodes[conv]
            if (
                hooked_globally
                or conv in probed
                or node in roots
                or consumers.get(node, 0) != 1
                or _has_hooks(conv)
                or _has_hooks(norm)
                or not isinstance(conv, _CONVS)
                or not isinstance(norm, _NORMS)
                or not _foldable(conv, norm)
            ):
                continue
            folds[conv] = norm
        names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        recipe = Recipe(
            tuple(names[c] for c in conv_nodes if c in names),
            tuple((names[c], names[m]) for c, m in folds.items() if c in names and m in names),
            channels_last,
        )
        return cls.build(model, recipe)

    @classmethod
    def build(cls, model: nn.Module, recipe: Recipe) -> FastPath:
        """The shadow forwards of ``recipe`` with fresh copies of the weights as they are now."""
        modules = {name: _submodule(model, name) for name in recipe.convs}
        folds = {_submodule(model, c): _submodule(model, n) for c, n in recipe.folds}
        shadowed: list[tuple[_Conv, _Norm | None, bool]] = []
        pre_hooked_globally = bool(nn.modules.module._global_forward_pre_hooks)
        for conv in (modules[c] for c in recipe.convs):
            # A hooked conv runs as written: a forward pre-hook may make its weight at each
            # call (pruning's weight_orig * mask, the old weight_norm and spectral_norm), and a
            # copy taken before the forward would be the previous call's weight.
            if _has_hooks(conv) or pre_hooked_globally or not isinstance(conv, _CONVS):
                continue
            norm = folds.get(conv)
            layout = recipe.channels_last and type(conv) is nn.Conv2d
            if norm is None and not layout:
                continue
            if norm is not None and not isinstance(norm, _NORMS):
                continue
            shadowed.append((conv, norm, layout))
        try:
            weights = _shadow_weights(shadowed)
        except torch.OutOfMemoryError:
            # No room for the copies of the weights (a nearly full GPU): this probe runs the
            # model as written, and the recipe stays for the next one.
            return cls({}, False, 0, recipe)
        forwards: dict[nn.Module, Callable[..., Any]] = {}
        pending: dict[nn.Module, tuple[torch.Tensor, Any]] = {}
        folded = 0
        for (conv, norm, _), (weight, bias) in zip(shadowed, weights, strict=True):
            if norm is None:
                forwards[conv] = functools.partial(_shadow_conv_forward, conv, weight, bias)
                continue
            forwards[conv] = functools.partial(_folded_conv_forward, pending, conv, weight, bias)
            forwards[norm] = functools.partial(_folded_norm_forward, pending, conv)
            folded += 1
        return cls(forwards, recipe.channels_last, folded, recipe, pending)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Install the shadow forwards; the modules' ``__dict__`` is restored afterwards."""
        installed = []
        self._pending.clear()
        try:
            for module, forward in self._forwards.items():
                # build() shadows only modules without an instance forward.
                if plain_attributes(module):
                    module.__dict__["forward"] = forward
                else:
                    module.forward = forward
                installed.append(module)
            yield
        finally:
            self._pending.clear()  # a chunk that failed half-way must not keep its outputs
            for module in installed:
                if plain_attributes(module):
                    module.__dict__.pop("forward", None)
                else:
                    del module.forward

    def check_settled(self) -> None:
        """Raise :class:`FoldDivergedError` when a folded convolution's output never reached its
        BatchNorm in the forward just run (call inside :meth:`active`, after the forward)."""
        if self._pending:
            raise FoldDivergedError("a folded convolution's output did not reach its BatchNorm")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule at the exact dotted path ``name`` (a name from ``named_modules``): a
    lookup per segment instead of a walk of the whole model."""
    module = model
    for part in name.split(".") if name else ():
        module = module._modules[part]  # type: ignore[assignment]
    return module


def _count_consumers(outputs: Sequence[torch.Tensor]) -> dict[Any, int]:
    """How many autograd edges point at each node of the graph that leads to ``outputs``."""
    counts: dict[Any, int] = {}
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts[nxt] = counts.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _foldable(conv: _Conv, norm: _Norm) -> bool:
    return (
        not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == conv.out_channels
        and conv.weight.is_floating_point()
    )


def _shadow_weights(
    shadowed: Sequence[tuple[_Conv, _Norm | None, bool]],
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Copies of each conv's weight and bias, with its BatchNorm (if any) folded in.

    ``shadowed`` holds ``(conv, norm or None, channels_last)``. The per-channel scale and shift
    are computed in float64 and the weights scaled in their own dtype, in one pass that also
    writes the memory format: one rounding of each product, as a float64 product rounded back
    would have but for the scale's own rounding (~6e-8), at a third of the cost. The fold runs
    at every probe on every reached convolution, so the per-channel arithmetic of all folds is
    done at once on their concatenated statistics (:func:`_fold_affines`): a few kernels
    instead of ~15 per pair, which on a GPU is launch time the probe waited for.
    """
    affines = _fold_affines([(conv, norm) for conv, norm, _ in shadowed if norm is not None])
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    with torch.no_grad():
        for conv, norm, channels_last in shadowed:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            weight = conv.weight
            if norm is not None:  # the product under no_grad tracks no gradient: no detach
                scale, bias = affines[conv]  # shaped (C, 1, ...) by _fold_affines
                folded = torch.empty_like(weight, memory_format=memory_format)
                torch.mul(weight, scale, out=folded)
                out.append((folded, bias))
                continue
            weight = weight.detach()
            if channels_last:
                weight = weight.contiguous(memory_format=memory_format)
            out.append((weight, None if conv.bias is None else conv.bias.detach()))
    return out


def _fold_affines(
    pairs: Sequence[tuple[_Conv, _Norm]],
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per conv: the folded weight scale (shaped ``(C, 1, ...)`` to broadcast over the
    weight) and bias, in the conv weight's dtype.

    For a BatchNorm ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` after a conv with bias
    ``b``: ``scale = gamma / sqrt(var + eps)``, ``bias = b * scale + beta - mean * scale``.
    Computed on the concatenated statistics of all pairs on one device with one weight dtype;
    elementwise, so each channel's value is bitwise what one pair alone gives. A missing
    ``gamma`` multiplies by 1 and a missing ``beta`` adds -0.0, both exact identities.
    """
    groups: dict[tuple[torch.device, torch.dtype, int], list[tuple[_Conv, _Norm]]] = {}
    for conv, norm in pairs:
        w = conv.weight
        groups.setdefault((w.device, w.dtype, w.dim()), []).append((conv, norm))
    out: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for (device, dtype, dims), group in groups.items():
            norms = [norm for _, norm in group]
            sizes = [norm.num_features for norm in norms]
            # The four statistics of every BatchNorm in one concatenation (one kernel, not
            # four): var, mean, gamma, beta rows; a missing gamma is 1 and a missing beta -0.0,
            # so the products and sums below are exact identities for them.
            stats = torch.cat(
                [_tensor(norm, name, fill, device) for name, fill in _STATISTICS for norm in norms]
            ).to(torch.float64)
            var, mean, gamma, beta = stats.view(len(_STATISTICS), -1).unbind(0)
            eps = {norm.eps for norm in norms}  # one value in practice: a scalar add
            if len(eps) == 1:
                var = var + eps.pop()
            else:
                var = var + _concat([norm.eps for norm in norms], sizes, device)
            scale = torch.rsqrt(var)
            shift = -mean * scale
            scale = scale * gamma
            shift = shift * gamma + beta
            with_bias = shift
            if any(conv.bias is not None for conv, _ in group):
                conv_bias = _concat([_or(conv.bias, 0.0) for conv, _ in group], sizes, device)
                with_bias = conv_bias * scale + shift
            # Each conv's scale shaped to broadcast over its weight, (C, 1, 1, 1): one view of
            # the whole instead of one per conv.
            shaped = scale.to(dtype).view((-1,) + (1,) * (dims - 1))
            scales, shifts = shaped.split(sizes), shift.to(dtype).split(sizes)
            biased = shifts if with_bias is shift else with_bias.to(dtype).split(sizes)
            for i, (conv, _) in enumerate(group):
                out[conv] = (scales[i], shifts[i] if conv.bias is None else biased[i])
    return out


# A BatchNorm's statistics in the order _fold_affines reads them, with the value that stands
# in for a missing one (None: required).
_STATISTICS = (("running_var", None), ("running_mean", None), ("weight", 1.0), ("bias", -0.0))


def _tensor(norm: _Norm, name: str, fill: float | None, device: torch.device) -> torch.Tensor:
    """``norm``'s parameter or buffer ``name``, or ``fill`` in its place (float64, per channel).

    Read from the parameter and buffer tables: ``Module.__getattr__`` costs ~0.5 us a lookup,
    ~60 per fold of a ResNet."""
    table = norm._buffers if name.startswith("running") else norm._parameters
    value = table[name] if name in table else getattr(norm, name, None)
    if value is not None:
        return value
    if fill is None:  # _foldable admits only BatchNorms with running statistics
        raise ValueError("cannot fold a BatchNorm without running statistics")
    return torch.full((norm.num_features,), fill, dtype=torch.float64, device=device)


def _or(t: torch.Tensor | None, fill: float) -> torch.Tensor | float:
    return fill if t is None else t


def _concat(
    values: Sequence[torch.Tensor | float | None], sizes: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Per-channel vectors (a float fills its segment) concatenated, in float64.

    Called under ``torch.no_grad()``: the result tracks no gradient without a ``detach`` per
    part (an op each, ~60 in a ResNet's fold).
    """
    parts = []
    for v, k in zip(values, sizes, strict=True):
        if v is None:  # _foldable admits only BatchNorms with running statistics
            raise ValueError("cannot fold a BatchNorm without running statistics")
        if isinstance(v, torch.Tensor):
            parts.append(v)
        else:
            parts.append(torch.full((k,), v, dtype=torch.float64, device=device))
    return torch.cat(parts).to(torch.float64)


class FoldDivergedError(RuntimeError):
    """A chunk's forward did not call a folded (conv, BatchNorm) pair as the traced one did.

    The folds are planned from the first chunk's forward. A model whose code branches on the
    data (``if x.mean() > 0: y = self.bn(y)``) can take another path in a later chunk, where the
    folded conv's output would be used without its BatchNorm, or the BatchNorm applied to
    something else. The shadow forwards check each call against the plan (the BatchNorm gets
    exactly the output of its conv's latest call, with no in-place change in between, and every
    such output reaches its BatchNorm) and raise this; the caller runs the chunk as written.
    """


def _shadow_conv_forward(
    conv: _Conv, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    return conv._conv_forward(x, weight, bias)


def _folded_conv_forward(
    pending: dict[nn.Module, tuple[torch.Tensor, Any]],
    conv: _Conv,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
) -> torch.Tensor:
    if conv in pending:  # called again before its BatchNorm: not the traced path
        raise FoldDivergedError(f"folded convolution {type(conv).__name__} called twice")
    out = conv._conv_forward(x, weight, bias)
    # The autograd node stands for "this output, unchanged": an in-place op replaces it.
    pending[conv] = (out, out.grad_fn)
    return out


def _folded_norm_forward(
    pending: dict[nn.Module, tuple[torch.Tensor, Any]], conv: _Conv, x: torch.Tensor
) -> torch.Tensor:
    out, node = pending.pop(conv, (None, None))
    # As the plan asked of the traced forward: the input is the conv's output (its autograd
    # node; the object itself where there is none), not changed in place since.
    if out is None or (x.grad_fn is not node if node is not None else x is not out):
        raise FoldDivergedError("a folded BatchNorm's input is not its convolution's output")
    return x

"""Rules for sliding-window ops: conv, pooling, adaptive pooling, pad, interpolate, pixel shuffle.

Each op maps to one :func:`~erf_callback.trf.geometry.window` per trailing spatial dim,
``(offset, step, span, exact)``: output ``i`` reads inputs ``[i*step + offset, ... + span]``.
Exact for conv (any padding, dilation, stride), pooling, divisible adaptive pooling, padding,
``pixel_unshuffle`` and ``Tensor.unfold``; marked non-exact for strided transposed conv (the
contributing inputs are periodic, not affine), uneven adaptive bins, ``pixel_shuffle`` and most
interpolation (see :func:`interpolate_rule`), whose windows hold every input any output reads
(:func:`hull_window`), so a TRF composed from them is never too small.

Example:
    >>> adaptive_window(8, 4)  # bins [0, 2), [2, 4), ...: a k=2 s=2 window
    (0, 2, 1, True)
    >>> adaptive_window(5, 3)  # bins [0, 2), [1, 4), [3, 5): held by [o*5/3 - 2/3, ... + 2]
    (-0.6666666666666667, 1.6666666666666667, 2.0, False)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch

from erf_callback.trf.geometry import DimRF, TensorRF, build, contract, reduced, window
from erf_callback.trf.rules.base import (
    OpCall,
    RuleHandler,
    RuleResult,
    TraceState,
    UnhandledError,
    input_rec,
    ntuple,
    other_extras,
)

__all__ = [
    "RULES",
    "Window",
    "adaptive_pool_rule",
    "adaptive_window",
    "conv_rule",
    "hull_window",
    "interpolate_rule",
    "pad_rule",
    "pixel_shuffle_rule",
    "pool_rule",
    "spatial_windows",
    "tensor_unfold_rule",
]

Window: TypeAlias = tuple[float, float, float, bool]
"""``(offset, step, span, exact)`` of one sliding window, in input units of the dim."""


def spatial_windows(
    tr: TraceState, op: OpCall, nd: int, windows: Sequence[Window], mix_channels: bool = True
) -> TensorRF:
    """Apply one sliding-window transform per trailing spatial dim (conv, pool, pad...).

    Args:
        tr: the tracer's records.
        op: the call (input first).
        nd: number of trailing spatial dims.
        windows: one window per spatial dim.
        mix_channels: the dim before the spatial ones (channels) is summed over (conv).
    """
    x, rec = input_rec(tr, op)
    if op.out.ndim != x.ndim or x.ndim < nd:
        raise UnhandledError
    dims = list(rec.dims)
    extra = other_extras(tr, op, x)
    base = x.ndim - nd
    for i, (off, step, span, exact) in enumerate(windows):
        dm = dims[base + i]
        if dm is not None:
            dims[base + i] = (dm[0], window(dm[1], off, step, span, exact))
    if mix_channels and base >= 1:
        contract(dims, extra, base - 1, x.shape[base - 1])
    return build(dims, extra, op.out.shape)


_CONV_RE = re.compile(r"conv(_transpose)?([123])d")


def conv_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``conv{1,2,3}d``, ``conv_transpose{1,2,3}d`` and ``convolution``."""
    name = op.func.__name__.lstrip("_")
    w = op.arg(1, "weight")
    nd = w.ndim - 2
    if name == "convolution":
        transposed = bool(op.arg(6, "transposed", False))
        stride, padding, dilation = (
            op.arg(i, n, dflt)
            for i, n, dflt in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
        )
    else:
        match = _CONV_RE.fullmatch(name)
        if match is None:
            raise UnhandledError
        transposed = match.group(1) is not None
        stride = op.arg(3, "stride", 1)
        padding = op.arg(4, "padding", 0)
        dilation = op.arg(7 if transposed else 5, "dilation", 1)
    ks = tuple(int(k) for k in w.shape[2:])
    st, dl = ntuple(stride, nd), ntuple(dilation, nd)
    pd: tuple[Any, ...]
    if padding == "valid":
        pd = (0,) * nd
    elif padding == "same":
        # PyTorch pads d*(k-1) in total, the smaller half on the left.
        pd = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl, strict=True))
    else:
        pd = ntuple(padding, nd)
    windows: list[Window] = []
    for k, s, p, d in zip(ks, st, pd, dl, strict=True):
        span = (k - 1) * d
        if transposed:
            # out o = i*s - p + t*d: input i feeds o for i in [(o+p-span)/s, (o+p)/s].
            windows.append(((p - span) / s, 1 / s, span / s, s == 1))
        else:
            windows.append((-p, s, span, True))
    return spatial_windows(tr, op, nd, windows)


_POOL_RE = re.compile(r"(max|avg|lp)_pool([123])d(?:_with_indices)?")


def pool_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``max/avg/lp_pool{1,2,3}d`` (incl. ``return_indices`` and dilation)."""
    match = _POOL_RE.fullmatch(op.func.__name__.lstrip("_"))
    if match is None:
        raise UnhandledError
    kind, nd = match.group(1), int(match.group(2))
    if kind == "lp":  # lp_pool(input, norm_type, kernel_size, stride, ceil_mode)
        ks = op.arg(2, "kernel_size")
        stride = op.arg(3, "stride")
        padding, dilation = 0, 1
    else:
        ks = op.arg(1, "kernel_size")
        stride = op.arg(2, "stride")
        padding = op.arg(3, "padding", 0)
        dilation = op.arg(4, "dilation", 1) if kind == "max" else 1
    ks = ntuple(ks, nd)
    # stride=None (F.*) or [] (torch.* builtins) means "same as kernel_size".
    st = (
        ks
        if stride is None or (isinstance(stride, (list, tuple)) and not stride)
        else (ntuple(stride, nd))
    )
    windows = [
        (-p, s, (k - 1) * d, True)
        for k, s, p, d in zip(ks, st, ntuple(padding, nd), ntuple(dilation, nd), strict=True)
    ]
    res = spatial_windows(tr, op, nd, windows, mix_channels=False)
    return [res] * len(op.outs)


def adaptive_window(n: int, m: int) -> Window:
    """Window of adaptive pooling from ``n`` to ``m`` units (PyTorch's floor/ceil bins).

    Uneven bins (``n % m != 0``) start at ``floor(o n / m)`` and end at ``ceil((o + 1) n /
    m)``: not affine in ``o``, so the window is the narrowest one of step ``n / m`` that holds
    every bin (a bin is up to a pixel narrower than it, never wider).
    """
    if n % m == 0:
        k = n // m
        return (0, k, k - 1, True)
    o = torch.arange(m, dtype=torch.int64)
    first, last = (o * n) // m, -((-(o + 1) * n) // m) - 1
    return (*hull_window(n / m, o, first, last), False)


def hull_window(
    step: float, outputs: torch.Tensor, first: torch.Tensor, last: torch.Tensor
) -> tuple[float, float, float]:
    """``(offset, step, span)`` of the narrowest window of ``step`` that holds input indices
    ``first[k]..last[k]`` for output ``outputs[k]``, every ``k``.

    For ops whose inputs per output are not affine in the output index (a floor, a ceil:
    up-sampling, pixel shuffle, uneven bins): any such window holds every input an output
    reads, so the TRF composed from it never misses a dependency; it is wider by less than
    an input pixel than the widest output's inputs.

    Example:
        >>> o = torch.arange(4)
        >>> hull_window(0.5, o, o // 2, o // 2)  # nearest x2 up-sampling: o reads o // 2
        (-0.5, 0.5, 0.5)
    """
    position = outputs.to(torch.float64) * step
    offset = float((first.to(torch.float64) - position).min())
    top = float((last.to(torch.float64) - position).max())
    return offset, step, top - offset


_ND_RE = re.compile(r"([123])d")


def adaptive_pool_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``adaptive_{avg,max}_pool{1,2,3}d``: exact when the bins are even or global."""
    match = _ND_RE.search(op.func.__name__)
    if match is None:
        raise UnhandledError
    nd = int(match.group(1))
    x, rec = input_rec(tr, op)
    o = op.outs[0]
    dims: list[DimRF | None] = list(rec.dims)
    base = x.ndim - nd
    for i in range(nd):
        n, m = int(x.shape[base + i]), int(o.shape[base + i])
        dm = dims[base + i]
        if dm is None or m == 0:
            continue
        if m == 1:  # global pooling
            dims[base + i] = (dm[0], reduced(dm[1], n))
        else:
            dims[base + i] = (dm[0], window(dm[1], *adaptive_window(n, m)))
    res = build(dims, other_extras(tr, op, x), o.shape)
    return [res] * len(op.outs)


def pad_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``F.pad`` in any mode: the TRF ignores where border padding takes its values from."""
    x = op.arg(0, "input")
    pad = [int(p) for p in op.arg(1, "pad")]
    nd = len(pad) // 2
    # pad lists (left, right) pairs starting from the LAST dim.
    windows = [(-pad[2 * (nd - 1 - i)], 1, 0, True) for i in range(nd)]
    if x.ndim < nd:
        raise UnhandledError
    return spatial_windows(tr, op, nd, windows, mix_channels=False)


_TAPS = {"nearest": 1, "nearest-exact": 1, "linear": 2, "bilinear": 2, "trilinear": 2, "bicubic": 4}


def interpolate_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``interpolate``/``upsample``: ``jump *= in/out``, the window spans the kernel's taps.

    Taps are 1 (nearest), 2 (linear) or 4 (cubic) around PyTorch's source index. Exact only
    for nearest down-sampling by an integer factor and linear/cubic down-sampling by an even
    integer without ``align_corners``; otherwise which pixels an output reads is not affine in
    its index, and the window is the narrowest that holds them for every output
    (:func:`_sampled_window`). Antialiased down-sampling keeps a window centred on the source
    coordinate, widened by the filter's stretched support.
    """
    name = op.func.__name__
    x, _ = input_rec(tr, op)
    nd = x.ndim - 2
    scale = op.arg(2, "scale_factor")
    if name == "upsample_nearest":
        mode, align, recompute, antialias = "nearest", None, None, False
    elif name == "upsample_bilinear":
        mode, align, recompute, antialias = "bilinear", True, None, False
    else:
        mode = op.arg(3, "mode", "nearest")
        align = op.arg(4, "align_corners")
        recompute = op.arg(5, "recompute_scale_factor")
        antialias = bool(op.arg(6, "antialias", False))
    scales: tuple[Any, ...] = ntuple(scale, nd) if scale is not None else (None,) * nd
    windows: list[Window] = []
    for i in range(nd):
        n, m = int(x.shape[2 + i]), int(op.out.shape[2 + i])
        if mode == "area":
            windows.append(adaptive_window(n, m) if m else (0, 1, 0, False))
            continue
        taps = _TAPS.get(mode)
        if taps is None:
            raise UnhandledError
        # PyTorch samples with 1/scale_factor when given (and not recomputed), else in/out.
        r: float = 1 / scales[i] if scales[i] is not None and not recompute else n / max(m, 1)
        integer_step = r >= 1 and float(r).is_integer()
        if not antialias and not integer_step:
            # Up-sampling and fractional steps read floor(source) and its neighbours, which
            # the affine source a + o*r does not hold: the window that holds what every
            # output reads, from PyTorch's own index arithmetic.
            corners = bool(align) and not mode.startswith("nearest")
            scale = ((n - 1) / (m - 1) if m > 1 else 0.0) if corners else r
            held = _sampled_window(mode, n, m, scale, corners)
            if held is not None:
                windows.append((*held, False))
                continue
        if mode.startswith("nearest"):
            # src = floor(a + o*r): affine in o, hence exact, when r is an integer. Otherwise
            # centre on the continuous position that floor() rounds ('nearest-exact' rounds
            # (o + 0.5) * r - 0.5 to the nearest pixel).
            exact_mode = mode == "nearest-exact"
            a = 0.5 * r if exact_mode else 0.0
            off = math.floor(a) if integer_step else (a - 0.5 if exact_mode else a)
            exact = integer_step
        else:
            # Continuous source coordinate src = a + o*r; the kernel's taps straddle it, so
            # centring the window on src keeps center() on the sampling position.
            if align:
                r, a = ((n - 1) / (m - 1) if m > 1 else 0.0), 0.0
            else:
                a = 0.5 * r - 0.5
            off = a - (taps - 1) / 2
            # Down-sampling by an even integer without align_corners samples exactly halfway
            # between pixels: every tap has a non-zero weight and the window is affine.
            exact = integer_step and not align and r % 2 == 0
        span: float = taps - 1
        if antialias and r > 1:  # the filter support is stretched by the scale
            off, span, exact = a - (taps * r - 1) / 2, taps * r - 1, False
        windows.append((off, r, span, exact))
    return spatial_windows(tr, op, nd, windows, mix_channels=False)


def _sampled_window(
    mode: str, n: int, m: int, scale: float, align_corners: bool
) -> tuple[float, float, float] | None:
    """``(offset, step, span)`` holding the input pixels each output of ``interpolate``
    reads (``n`` inputs, ``m`` outputs along the dim, sampled every ``scale`` inputs: the
    window's step), from the source indices and taps that
    PyTorch computes (``aten/src/ATen/native/UpSample.h``), in float32 and float64 (its
    arithmetic type follows the dtype), so that rounding cannot move a tap outside the window.
    Outputs whose taps the input's edge clamps are left out (as padding is); None when every
    output is one of them."""
    if m < 1 or n < 1:
        return None
    o = torch.arange(m, dtype=torch.int64)
    firsts, lasts, keeps = [], [], []
    for dtype in (torch.float32, torch.float64):
        of = o.to(dtype)
        if mode.startswith("nearest"):
            if m == 2 * n and mode == "nearest":
                src = o // 2  # PyTorch's exact special case
            else:
                # A float scale; the product in float (CUDA) or double (CPU's nearest-exact).
                single = torch.tensor(scale, dtype=torch.float32).to(dtype)
                shift = 0.5 if mode == "nearest-exact" else 0.0
                src = torch.floor((of + shift) * single)
                src = src.to(torch.int64)
            first, last, keep = src, src, src <= n - 1
        else:
            typed = torch.tensor(scale, dtype=dtype)
            x = typed * of if align_corners else typed * (of + 0.5) - 0.5
            base = torch.floor(x)
            frac = x - base
            base = base.to(torch.int64)
            reach = 1 if _TAPS[mode] == 2 else 2
            behind = 0 if _TAPS[mode] == 2 else 1
            # A tap at weight 0 (the source exactly on a pixel) reads nothing.
            on_pixel = frac == 0
            first = torch.where(on_pixel, base, base - behind)
            last = torch.where(on_pixel, base, base + reach)
            keep = (x >= 0) & (first >= 0) & (last <= n - 1)
        firsts.append(first)
        lasts.append(last)
        keeps.append(keep)
    keep = keeps[0] & keeps[1]
    if not bool(keep.any()):
        return None
    first = torch.minimum(firsts[0], firsts[1])[keep]
    last = torch.maximum(lasts[0], lasts[1])[keep]
    return hull_window(scale, o[keep], first, last)


def pixel_shuffle_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``pixel_unshuffle`` (exact k=s=r window) and ``pixel_shuffle`` (non-exact)."""
    r = int(op.arg(1, "downscale_factor" if "un" in op.func.__name__ else "upscale_factor"))
    windows: list[Window]
    if op.func.__name__ == "pixel_unshuffle":  # an r x r / r space-to-depth: a k=s=r window
        windows = [(0, r, r - 1, True)] * 2
    else:  # depth-to-space: output o reads input floor(o / r), in [o / r - (r - 1) / r, o / r]
        windows = [(-(r - 1) / r, 1 / r, (r - 1) / r, False)] * 2
    return spatial_windows(tr, op, 2, windows)


def tensor_unfold_rule(tr: TraceState, op: OpCall) -> RuleResult:
    """``Tensor.unfold(dimension, size, step)``: a window, plus a new dim for its offsets.

    ``F.unfold`` (im2col) shares the name but moves positions into channels: it is left to
    the fallback rule.
    """
    if getattr(op.func, "__module__", None) == "torch.nn.functional":
        raise UnhandledError
    x, rec = input_rec(tr, op)
    dim = int(op.arg(1, "dimension")) % max(x.ndim, 1)
    size, step = int(op.arg(2, "size")), int(op.arg(3, "step"))
    dims = list(rec.dims)
    dm = dims[dim] if dims else None
    if dm is not None:
        dims[dim] = (dm[0], window(dm[1], 0, step, size - 1))
    return TensorRF((*dims, None), rec.extra)


RULES: Mapping[str, RuleHandler] = {
    **dict.fromkeys(
        (
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_transpose1d",
            "conv_transpose2d",
            "conv_transpose3d",
            "convolution",
        ),
        conv_rule,
    ),
    **dict.fromkeys(
        (
            f"{kind}_pool{n}d{suffix}"
            for kind in ("max", "avg", "lp")
            for n in (1, 2, 3)
            for suffix in ("", "_with_indices")
            if suffix == "" or kind == "max"
        ),
        pool_rule,
    ),
    **dict.fromkeys(
        (
            f"adaptive_{kind}_pool{n}d{suffix}"
            for kind in ("avg", "max")
            for n in (1, 2, 3)
            for suffix in ("", "_with_indices")
        ),
        adaptive_pool_rule,
    ),
    **dict.fromkeys(
        (
            "pad",
            "constant_pad_nd",
            *(f"{m}_pad{n}d" for m in ("reflection", "replication", "circular") for n in (1, 2, 3)),
        ),
        pad_rule,
    ),
    **dict.fromkeys(
        ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"), interpolate_rule
    ),
    **dict.fromkeys(("pixel_unshuffle", "pixel_shuffle"), pixel_shuffle_rule),
    "unfold": tensor_unfold_rule,
}
"""Sliding-window rules by torch function name."""

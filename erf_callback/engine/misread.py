"""Inputs that the model takes in another reading: the batch or the channel axis left out.

``compute_erf`` reads ``inputs`` as ``(N, C, *spatial)``, or ``(N, *spatial)`` for a model
that adds the channel axis itself (see :mod:`erf_callback.engine.layout`). A tensor of one axis
less is then read wrongly: one unbatched image ``(C, H, W)`` as ``C`` one-dimensional
signals, a batch of grey images ``(N, H, W)`` likewise, raw signals ``(N, L)`` for a model
that wants ``(N, 1, L)`` as signals without channels. The model fails on such a reading, and
its failure names neither the cause nor the fix. :func:`misread_inputs_error` tries the
inputs as the user may have meant them (one unbatched sample, a batch without the channel
axis, one sample without both) and names the reading the model takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from erf_callback.engine.guard import probe_context
from erf_callback.engine.layers import model_device_dtype, original_forwards
from erf_callback.engine.validate import (
    ModelForwardError,
    UnbatchedInputError,
    torch_error,
    unbatched_guard,
)

__all__ = ["BATCH_AXIS_DROPPED", "RESHAPE", "misread_inputs_error"]

#: The words of the error for outputs that lose the batch axis (``compute._check_batch``), one
#: of the failures that a misread input causes.
BATCH_AXIS_DROPPED = "the model's forward does not keep the batch axis"

#: The attribute of an error of :func:`misread_inputs_error` that holds the expression giving the
#: reading the model takes (``"inputs.unsqueeze(1)"``), where exactly one does; callers that
#: get the inputs from elsewhere (the callback, from batches) say how to apply it there.
RESHAPE = "reshape"

_WORDS = {1: "signal", 2: "image", 3: "volume"}


class _Reading(NamedTuple):
    how: str  # "add the batch dimension: inputs.unsqueeze(0)"
    shape: tuple[int, ...]  # the inputs' shape so
    trial: torch.Tensor  # what the model is run on to see whether it takes them so
    adds_batch: bool


def _readings(x: torch.Tensor) -> list[_Reading]:
    """The readings of ``x`` with one or two axes more that the model may take."""
    n, rank, out = x.shape[0], x.dim(), []
    if rank + 1 <= 5:
        one = x.unsqueeze(0)
        how = "add the batch dimension: inputs.unsqueeze(0)"
        out.append(_Reading(how, tuple(one.shape), one, True))
        if n > 1:  # else the same tensor as the reading above
            how = "add the channel axis: inputs.unsqueeze(1)"
            out.append(_Reading(how, (n, 1, *x.shape[1:]), x[:3].unsqueeze(1), False))
    if rank + 2 <= 5:
        both = x[None, None]
        how = "add the batch and channel axes: inputs[None, None]"
        out.append(_Reading(how, tuple(both.shape), both, True))
    return out


def _describe(shape: Sequence[int], no_channel: bool, fits: bool = True) -> str:
    """``"a batch of 8 images of 1 channel"``, ``"one signal without a channel axis..."``: a
    reading that ``fits`` the model, else the one compute_erf took."""
    n = shape[0]
    spatial = len(shape) - (1 if no_channel else 2)
    count = "one" if n == 1 else f"a batch of {n}"
    noun = _WORDS[spatial] + ("s" if n != 1 else "")
    if no_channel:
        adds = "the model adds it" if fits else "as for a model that adds it itself"
        return f"{count} {noun} without a channel axis ({adds})"
    c = shape[1]
    return f"{count} {noun} of {c} channel{'s' if c != 1 else ''}"


#: Runs the model on a tensor and returns the probed layers' outputs (as compute_erf sees them).
Capture = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def _takes(net: nn.Module, reading: _Reading, capture: Capture) -> bool | None:
    """Whether the model runs on the reading as a batch of samples, with probed outputs of
    one entry per sample and the reading's spatial rank: None if not; else whether it adds
    the channel axis itself (its outputs have one axis more than the reading)."""
    # One sample first: most readings fail at the first layer, and one sample of the "one
    # unbatched sample" reading is all the inputs. A reading that runs is run again on three
    # samples (repeated where it has fewer), where a model that adds a batch axis of its own
    # or keeps a fixed number of samples shows it.
    first = _outputs_rank(net, reading.trial[:1], capture)
    if first is None:
        return None
    again = _outputs_rank(net, reading.trial[torch.arange(3) % reading.trial.shape[0]], capture)
    if again != first:
        return None
    return first == reading.trial.dim() + 1


def _outputs_rank(net: nn.Module, trial: torch.Tensor, capture: Capture) -> int | None:
    """The rank of the probed outputs of the model run on ``trial``: the trial's, or one more
    where the model adds the channel axis; None where it fails or the outputs differ from
    that (another batch size, other ranks)."""
    device, dtype = model_device_dtype(net, trial)
    x = trial.to(device, dtype, copy=True)
    try:
        with (
            probe_context(net),
            original_forwards(net),
            torch.no_grad(),
            unbatched_guard(net, x.dim() - 2),
        ):
            outputs = capture(x)
    except Exception:
        return None
    ranks = {o.dim() for o in outputs.values()}
    if len(ranks) != 1 or any(o.shape[0] != x.shape[0] for o in outputs.values()):
        return None
    rank = ranks.pop()
    if rank == x.dim() or (rank == x.dim() + 1 and x.dim() - 1 in _WORDS):
        return rank
    return None


def _is_misread(err: BaseException) -> bool:
    """Whether ``err`` is how a model fails on inputs read with the wrong axes."""
    return isinstance(err, (UnbatchedInputError, ModelForwardError)) or (
        type(err) is ValueError and BATCH_AXIS_DROPPED in str(err)
    )


def _cause(err: BaseException) -> str:
    """What went wrong, in a line: torch's own words where ``err`` wraps them, else the part
    of the package's message before its explanation."""
    inner = err.__cause__ if err.__cause__ is not None else torch_error(err)
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    text = lines[0] if inner is not err else lines[0].split(": ")[0]
    return text.rstrip(".")


def misread_inputs_error(
    net: nn.Module,
    inputs: torch.Tensor,
    no_channel: bool,
    err: BaseException,
    capture: Capture,
) -> ValueError | None:
    """The error to raise in place of ``err`` when the model failed on ``inputs`` (as the user
    gave them) read as compute_erf reads them, and takes them in another reading; else None.

    Args:
        net: the probed model.
        inputs: the inputs as given.
        no_channel: they were read as ``(N, *spatial)`` (the model adding the channel axis).
        err: the error of that reading.
        capture: runs the model on a tensor and returns the probed layers' outputs.

    Example:
        >>> net = nn.Conv2d(1, 4, 3)  # takes (N, 1, H, W)
        >>> err = UnbatchedInputError("layer '' (Conv2d) received an unbatched input")
        >>> capture = lambda x: {"output": net(x)}
        >>> misread = misread_inputs_error(net, torch.randn(8, 16, 16), False, err, capture)
        >>> print(str(misread).split(": ")[-1])
        inputs.unsqueeze(1) (shape (8, 1, 16, 16)).
    """
    if not _is_misread(err):
        return None
    fits = [(r, adds) for r in _readings(inputs) if (adds := _takes(net, r, capture)) is not None]
    if not fits:
        return None
    ways = " or as ".join(
        f"{_describe(r.shape, adds)}: {r.how} (shape {r.shape})" for r, adds in fits
    )
    message = (
        f"compute_erf read inputs of shape {tuple(inputs.shape)} as "
        f"{_describe(inputs.shape, no_channel, fits=False)}, and the model does not take them so "
        f"({_cause(err)}). They fit the model as {ways}."
    )
    kind = UnbatchedInputError if all(r.adds_batch for r, _ in fits) else ValueError
    error = kind(message)
    setattr(error, RESHAPE, fits[0][0].how.split(": ")[-1] if len(fits) == 1 else None)
    return error

"""What ``erf-callback probe`` loads: the model factory, a checkpoint, the probe inputs.

Every user mistake becomes a :class:`~erf_callback.cli.errors.CLIError` naming the problem
and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erf_callback.cli.errors import CLIError

__all__ = [
    "IMAGE_EXTENSIONS",
    "build_model",
    "find_prefix",
    "load_checkpoint",
    "load_factory",
    "load_inputs",
    "no_bar",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_FACTORY_FIX = (
    "write it as MODULE:FACTORY, e.g. mymodels:build_net, with mymodels.py (or a package) "
    "importable from the current directory, or as path/to/file.py:build_net"
)


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``"module:factory"`` (or ``"path/to/file.py:factory"``).

    The current directory is searched first, as ``python -m`` would.

    Example:
        >>> load_factory("collections:OrderedDict").__name__
        'OrderedDict'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not MODULE:FACTORY", _FACTORY_FIX)
    module = _import(module_name)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise CLIError(
                f"module {module_name!r} has no attribute {attr!r}",
                f"use one of its callables: {', '.join(names[:12]) or '(none)'}",
            )
        target = getattr(target, part)
    if not callable(target):
        raise CLIError(
            f"{spec!r} is a {type(target).__name__}, not a callable",
            "name a function or class that builds the model with no arguments",
        )
    return target


def _import(module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"no file {module_name!r}", "check the path of the model file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise CLIError(
                f"running {module_name!r} failed ({type(err).__name__}: {err})",
                f"fix the file so that `python {module_name}` runs",
            ) from err
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise CLIError(
                f"cannot import module {module_name!r} (no module named {err.name!r} in "
                f"{cwd} or on sys.path)",
                "run erf-callback from the folder that holds the module, set PYTHONPATH, or "
                "pass path/to/file.py:FACTORY",
            ) from err
        raise CLIError(
            f"importing {module_name!r} failed: it needs the missing module {err.name!r}",
            f"install {err.name!r} or remove that import",
        ) from err
    except Exception as err:
        raise CLIError(
            f"importing {module_name!r} failed ({type(err).__name__}: {err})",
            f"fix the module so that `python -c 'import {module_name}'` works",
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)


def build_model(spec: str) -> nn.Module:
    """Call the factory of ``spec`` with no arguments; the result must be an ``nn.Module``."""
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as err:
        raise CLIError(
            f"calling {spec}() failed ({type(err).__name__}: {err})",
            "the factory must build the model with no arguments (wrap it in a function that "
            "fills in its arguments)",
        ) from err
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module",
            "return the model from the factory",
        )
    return model


def find_prefix(keys: Sequence[str], model_keys: Sequence[str]) -> str:
    """The key prefix (e.g. ``"net."`` of a LightningModule) whose removal fits most keys.

    ``torch.compile``'s ``_orig_mod.`` segments are ignored on both sides; DDP's ``module.``
    is an ordinary prefix. Ties go to the shortest prefix.

    Example:
        >>> find_prefix(["net.conv.weight", "net.conv.bias", "loss.w"], ["conv.weight"])
        'net.'
    """
    wanted = {_plain(k) for k in model_keys}
    votes: dict[str, int] = {}
    for key in keys:
        parts = _plain(key).split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in wanted:
                prefix = "".join(p + "." for p in parts[:i])
                votes[prefix] = votes.get(prefix, 0) + 1
    if not votes:
        return ""
    return min(votes, key=lambda p: (-votes[p], len(p)))


def _plain(key: str) -> str:
    return ".".join(p for p in key.split(".") if p != "_orig_mod")


def load_checkpoint(
    model: nn.Module, path: str, *, weights_only: bool = True, prefix: str | None = None
) -> str:
    """Load a state dict or a Lightning checkpoint into ``model``; returns the prefix used.

    Lightning checkpoints keep the weights under ``"state_dict"`` with the LightningModule's
    attribute names in front (``"net.layer1.0.conv1.weight"``); the prefix is found by
    :func:`find_prefix` unless given.
    """
    if not os.path.isfile(path):
        raise CLIError(
            f"checkpoint file not found: {path}",
            "check the path (relative paths start in the current directory)",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(
            f"{path} cannot be loaded with weights_only=True ({first[:200]})",
            "if you trust the file, pass --unsafe-load (it runs the file's pickled code)",
        ) from err
    except Exception as err:
        raise CLIError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {str(err)[:200]})",
            "pass a file written by torch.save (a state dict) or a Lightning .ckpt",
        ) from err
    state = _state_dict_of(obj, path)
    model_keys = list(model.state_dict())
    used = find_prefix(list(state), model_keys) if prefix is None else prefix
    by_plain = {_plain(k): k for k in model_keys}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        plain = _plain(key)
        if used and not plain.startswith(used):
            continue  # another part of a LightningModule (a loss, an EMA copy, ...)
        name = plain[len(used) :]
        renamed[by_plain.get(name, name)] = value
    _load(model, renamed, path, used)
    return used


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CLIError(
        f"{path} holds a {type(obj).__name__} without tensors, neither a state dict nor a "
        "Lightning checkpoint",
        "save the weights with torch.save(model.state_dict(), path), or pass the .ckpt that "
        "Lightning wrote",
    )


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: str, prefix: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k!r}: {tuple(state[k].shape)} in the "
                f"file, {tuple(own[k].shape)} in the model)"
            )
        raise CLIError(
            f"checkpoint {path} does not fit the model: {', '.join(parts)} (key prefix "
            f"removed: {prefix!r})",
            "make the factory build the checkpointed architecture, or pass --prefix with the "
            "part of the checkpoint's keys before the model's own names",
        )
    model.load_state_dict(state)


def load_inputs(
    source: str,
    *,
    num_samples: int,
    channels: int,
    size: Sequence[int],
    seed: int = 0,
    normalize: str = "none",
    progress: bool | None = None,
) -> torch.Tensor:
    """``(num_samples, channels, *size)`` float32 probe inputs: seeded noise or images.

    ``source`` is ``"noise"`` (standard Gaussian noise from a generator seeded with ``seed``)
    or a folder of images, read with PIL in file-name order, converted to grey (1 channel) or
    RGB (3), resized to ``size`` and scaled to [0, 1] (then ImageNet-normalised with
    ``normalize="imagenet"``). ``channels=0``: ``(num_samples, *size)``, no channel axis (grey
    images), for a model that adds it itself.

    Example:
        >>> load_inputs("noise", num_samples=2, channels=3, size=(8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    if num_samples < 1:
        raise CLIError(f"--num-samples {num_samples} is not positive", "pass e.g. --num-samples 32")
    if not 1 <= len(size) <= 3 or any(s < 1 for s in size):
        raise CLIError(
            f"--size {' '.join(map(str, size))} is not 1-3 positive ints", "e.g. --size 224 224"
        )
    if channels < 0:
        raise CLIError(
            f"--channels {channels} is negative",
            "pass the model's input channels, or 0 for inputs without a channel axis",
        )
    if source == "noise":
        gen = torch.Generator().manual_seed(seed)
        shape = (num_samples, channels, *size) if channels else (num_samples, *size)
        x = torch.randn(shape, generator=gen)
    else:
        x = _read_images(Path(source), num_samples, max(channels, 1), size, progress)
        x = x if channels else x[:, 0]
    if normalize == "imagenet":
        if channels != 3:
            raise CLIError("--normalize imagenet needs 3 channels", "pass --channels 3")
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, *[1] * len(size))
        std = torch.tensor(_IMAGENET_STD).view(1, 3, *[1] * len(size))
        x = (x - mean) / std
    return x


def _read_images(
    folder: Path, num_samples: int, channels: int, size: Sequence[int], progress: bool | None
) -> torch.Tensor:
    from PIL import Image
    from tqdm.auto import tqdm

    if not folder.is_dir():
        raise CLIError(
            f"--inputs {str(folder)!r} is neither 'noise' nor an existing folder",
            "pass --inputs noise, or a folder of images",
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CLIError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}",
            "put images in the folder or pass --inputs noise",
        )
    if len(size) != 2:
        raise CLIError(f"images are 2-D but --size has {len(size)} values", "pass --size H W")
    if channels not in (1, 3):
        raise CLIError(
            f"images are read as grey (1 channel) or RGB (3), not {channels} channels",
            "pass --channels 1 or 3, or probe with --inputs noise",
        )
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in tqdm(files[:num_samples], desc="reading images", disable=no_bar(progress)):
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arrays.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8))
        except OSError as err:
            raise CLIError(
                f"cannot read image {str(path)!r} ({err})", "remove or replace the broken file"
            ) from err
    x = torch.stack(arrays).view(len(arrays), size[0], size[1], channels).permute(0, 3, 1, 2)
    return x.float().div(255.0).contiguous()


def no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress

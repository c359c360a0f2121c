"""``erf-callback probe``: the ERF of a model from a factory, as metrics.json and PNGs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from erf_callback.cli.errors import CLIError
from erf_callback.cli.loading import no_bar
from erf_callback.engine.compute import compute_erf, map_status
from erf_callback.engine.config import Reduction
from erf_callback.engine.erf_map import ERFMap
from erf_callback.engine.layers import resolve_layers
from erf_callback.engine.misread import RESHAPE
from erf_callback.engine.validate import torch_error
from erf_callback.warnings import ERFWarning

__all__ = ["metrics_json", "prepare_out_dir", "probe_model", "write_probe_outputs"]


def probe_model(
    model: nn.Module,
    layers: Sequence[str],
    inputs: torch.Tensor,
    *,
    batch_size: int = 8,
    reduction: Reduction = "abs",
    progress: bool | None = None,
) -> dict[str, ERFMap]:
    """``compute_erf`` over ``inputs`` in batches, with a progress bar; the same maps.

    A batch is one step of the progress bar; ``compute_erf`` splits it further when its
    activations exceed the memory budget (``chunk_size="auto"``), so a large input or model
    never needs ``batch_size`` samples' activations at once.

    Averaging the per-batch means weighted by batch size gives exactly the mean over all
    samples, so the result equals one ``compute_erf`` call (up to summation order).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
        >>> x = torch.randn(5, 1, 12, 12, dtype=torch.float64)
        >>> m = probe_model(net.double(), ["0"], x, batch_size=2, progress=False)["0"]
        >>> torch.allclose(m.grad, compute_erf(net, x, ["0"])["0"].grad), m.num_samples
        (True, 5)
    """
    from tqdm.auto import tqdm

    try:
        resolve_layers(model, list(layers))
    except KeyError as err:
        raise CLIError(
            str(err.args[0]).rstrip("."),
            "run `erf-callback layers MODULE:FACTORY` to list the model's layer names",
        ) from err
    n = inputs.shape[0]
    sums: dict[str, torch.Tensor] = {}
    first: dict[str, ERFMap] = {}
    ok: dict[str, bool] = {}  # some batch gave a map that is not zero
    starts = range(0, n, batch_size)
    with warnings.catch_warnings():
        # Zero/NaN maps are re-checked on the sum below, which warns once per layer.
        warnings.simplefilter("ignore", ERFWarning)
        for start in tqdm(starts, desc="probing", unit="batch", disable=no_bar(progress)):
            chunk = inputs[start : start + batch_size]
            try:
                maps = compute_erf(model, chunk, list(layers), reduction=reduction)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                if getattr(err, RESHAPE, None) == "inputs.unsqueeze(1)":
                    # Samples without a channel axis (--channels 0) for a model that takes one:
                    # the fix is a flag, not the expression compute_erf names.
                    raise CLIError(
                        f"the model takes samples with a channel axis, and these of shape "
                        f"{tuple(chunk.shape[1:])} have none",
                        "pass --channels 1 (or the number of input channels the model takes)",
                    ) from err
                # torch's own words on a model that cannot take the inputs: compute_erf's
                # account names a call that a command-line user never made.
                said = torch_error(err)
                raise CLIError(
                    f"probing failed on samples of shape {tuple(chunk.shape[1:])} "
                    f"({type(said).__name__}: {str(said).splitlines()[0][:300]})",
                    "check --size/--channels against what the model expects, and probe layers "
                    "with a spatial output",
                ) from err
            for name, m in maps.items():
                part = m.grad * chunk.shape[0]
                sums[name] = part if name not in sums else sums[name] + part
                first.setdefault(name, m)
                ok[name] = ok.get(name, False) or m.status != "zero"
    out: dict[str, ERFMap] = {}
    for name in layers:
        grad = sums[name] / n
        # Every batch's map was zero or round-off of a constant channel sum: so is the total.
        status = map_status(grad, name, cancelled=not ok[name])
        out[name] = dataclasses.replace(first[name], grad=grad, num_samples=n, status=status)
    return out


def metrics_json(maps: dict[str, ERFMap]) -> dict[str, dict[str, float | None]]:
    """``{layer: {metric: value}}`` with the keys of ``ERFMap.metrics()``; NaN/Inf -> None."""
    result: dict[str, dict[str, float | None]] = {}
    for name, m in maps.items():
        result[name] = {k: (v if math.isfinite(v) else None) for k, v in m.metrics().items()}
    return result


def write_probe_outputs(
    maps: dict[str, ERFMap],
    out_dir: Path,
    cmap: str = "inferno",
    heatmap_style: Literal["annotated", "raw"] = "annotated",
) -> list[str]:
    """Write ``metrics.json``, ``<layer>_heatmap.png`` and ``<layer>_radial_profile.png``, and
    with two layers or more ``all_layers.png``.

    The heatmap is the callback's TensorBoard picture (``heatmap_style="annotated"``: title
    with the layer, radius, ERF/TRF and R², colour bar, legend of the overlays) or the bare
    map with its overlays (``"raw"``). ``all_layers.png`` draws every layer's annotated heatmap
    side by side on one scale (:func:`~erf_callback.render.render_erf_maps`), so they compare.
    """
    from PIL import Image

    from erf_callback.render import render_erf_maps, render_heatmap, render_radial_profile
    from erf_callback.render.annotated import erf_map_panel, render_heatmap_figure

    written = [str(out_dir / "metrics.json")]
    metrics = metrics_json(maps)
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=False)
    for name, m in maps.items():
        if m.status != "ok":
            continue
        fit = m.gaussian
        box = m.geometry.box(m.position) if m.geometry is not None else None
        mx = metrics[name]
        if heatmap_style == "raw":
            heat = render_heatmap(
                m.numpy(), mean=fit.mean, cov=fit.cov, trf_box=box, location=m.location, cmap=cmap
            )
        else:
            heat = render_heatmap_figure(erf_map_panel(m, metrics=mx, layer=name), cmap=cmap)
        profile = render_radial_profile(
            m.numpy(),
            mean=fit.mean,
            cov=fit.cov,
            floor=max(fit.floor, 0.0),
            radius=_finite(mx["radius"]),
            energy_radius=_finite(mx["energy_radius"]),
            title=name,
        )
        for suffix, img in (("heatmap", heat), ("radial_profile", profile)):
            path = out_dir / f"{name}_{suffix}.png"
            Image.fromarray(img).save(path)
            written.append(str(path))
    drawn = {name: m for name, m in maps.items() if m.status == "ok"}
    if len(drawn) >= 2:  # no "<layer>_" prefix: no layer's own file can have this name
        path = out_dir / "all_layers.png"
        Image.fromarray(render_erf_maps(drawn, cmap=cmap)).save(path)
        written.append(str(path))
    return written


def _finite(v: Any) -> float | None:
    return None if v is None else float(v)


def prepare_out_dir(path: str) -> Path:
    """Create ``path`` (and parents); a file in the way is a user error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {path!r} is a file", "pass a folder (it is created if missing)")
    os.makedirs(out, exist_ok=True)
    return out

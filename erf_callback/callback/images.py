"""The images of one probe: heatmaps, radial profile and evolution grid per layer."""

from __future__ import annotations

import warnings

import numpy as np

from erf_callback.callback.history import ERFHistory
from erf_callback.engine.erf_map import ERFMap
from erf_callback.warnings import ERFWarning

__all__ = ["render_probe_images"]


def render_probe_images(
    maps: dict[str, ERFMap],
    history: ERFHistory,
    tag_prefix: str,
    cmap: str = "inferno",
    metrics: dict[str, dict[str, float]] | None = None,
) -> dict[str, np.ndarray]:
    """``{tag: uint8 HWC image}``: heatmaps (linear, log), radial profile, evolution grid."""
    # Imported here: matplotlib costs ~0.4 s to import, and runs with log_images=False (or
    # ranks other than 0) never render.
    from erf_callback.render import render_evolution, render_heatmap, render_radial_profile

    if metrics is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ERFWarning)
            metrics = {layer: m.metrics() for layer, m in maps.items()}
    images: dict[str, np.ndarray] = {}
    for layer, m in maps.items():
        fit = m.gaussian
        arr = m.numpy()
        box = m.geometry.box(m.position) if m.geometry is not None else None
        tag = f"{tag_prefix}/{layer}"
        for suffix, log_scale in (("heatmap", False), ("heatmap_log", True)):
            images[f"{tag}/{suffix}"] = render_heatmap(
                arr,
                mean=fit.mean,
                cov=fit.cov,
                trf_box=box,
                location=m.location,
                cmap=cmap,
                log_scale=log_scale,
            )
        images[f"{tag}/radial_profile"] = render_radial_profile(
            arr,
            mean=fit.mean,
            cov=fit.cov,
            floor=max(fit.floor, 0.0),
            radius=metrics[layer]["radius"],
            energy_radius=metrics[layer]["energy_radius"],
            title=layer,
        )
        frames = history.maps.get(layer, [])
        if frames:
            images[f"{tag}/evolution"] = render_evolution(
                [f.numpy() for _, f in frames], [f"step {s}" for s, _ in frames], cmap=cmap
            )
    return images

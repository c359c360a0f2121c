"""The images of one probe: what a user sees in TensorBoard's IMAGES tab.

Per layer ``<prefix>/<layer>/...``:

* ``heatmap``, ``heatmap_log``: the map with title (layer, step, radius), colour bar and a
  legend of the overlays (``heatmap_style="annotated"``, the default), or the bare map at
  input resolution with the overlays drawn into its pixels (``"raw"``);
* ``heatmap_init``: the ``heatmap`` of the layer's first probe, written once. TensorBoard
  keeps only 10 images per tag (reservoir sampling, the newest always kept), so the step-0
  image of ``heatmap`` is usually sampled away; a tag with one image keeps it;
* ``init_vs_now``: the initialisation map next to the current one, in every image, so the
  newest one (always kept) shows the comparison with TensorBoard's default settings;
* ``radial_profile`` and ``evolution`` (at most 8 frames, labels readable at the default
  card size).

Once per probe ``<prefix>/all_layers/radius``: radius and growth since init vs step, one
colour per layer with a legend (TensorBoard's own charts colour by run, not by tag); and, with
two layers or more, ``<prefix>/all_layers/heatmaps``: every layer's heatmap side by side on
one scale (each ``heatmap`` is zoomed on its own TRF, so a shallow ERF looks as large there as
a deep one; here their sizes compare).

A layer's first probe writes ``heatmap``, ``heatmap_log``, ``heatmap_init`` and
``radial_profile`` only: ``init_vs_now`` and ``evolution`` would show that one map again, and
the chart would be one dot per layer. They start with the second probe.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import numpy as np

from erf_callback.callback.history import ERFHistory
from erf_callback.engine.erf_map import ERFMap
from erf_callback.warnings import ERFWarning

__all__ = ["HEATMAP_STYLES", "HeatmapStyle", "ProbeImages", "render_probe_images"]

HeatmapStyle = Literal["annotated", "raw"]
HEATMAP_STYLES: tuple[str, ...] = ("annotated", "raw")

_DOT = " \u00b7 "  # a middle dot between the parts of a title

#: Tag (after the prefix) of the all-layers chart.
ALL_LAYERS_TAG = "all_layers/radius"
#: Tag (after the prefix) of every layer's heatmap on one scale.
ALL_HEATMAPS_TAG = "all_layers/heatmaps"


def _geo_mean(values: tuple[float, ...]) -> float:
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return math.inf
    return math.exp(sum(math.log(v) for v in values) / len(values))


class ProbeImages:
    """Renders a probe's images and remembers each layer's first map for ``init_vs_now``.

    Args:
        tag_prefix: first part of every tag.
        cmap: matplotlib colour map.
        heatmap_style: ``"annotated"`` (title, colour bar, legend) or ``"raw"`` (the map at
            input resolution, overlays drawn into the pixels, no text).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from erf_callback import compute_erf
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
        >>> maps = compute_erf(net, torch.randn(2, 1, 16, 16), ["1"])
        >>> h = ERFHistory()
        >>> _ = h.add(0, 0, "1", "ok", {**maps["1"].metrics(), "center_y": 8.0, "center_x": 8.0},
        ...           maps["1"].grad)
        >>> sorted(ProbeImages("erf").render(maps, h, step=0))  # doctest: +NORMALIZE_WHITESPACE
        ['erf/1/heatmap', 'erf/1/heatmap_init', 'erf/1/heatmap_log', 'erf/1/radial_profile']
        >>> _ = h.add(5, 0, "1", "ok", {**maps["1"].metrics(), "center_y": 8.0, "center_x": 8.0},
        ...           maps["1"].grad)
        >>> sorted(ProbeImages("erf").render(maps, h, step=5))  # doctest: +NORMALIZE_WHITESPACE
        ['erf/1/evolution', 'erf/1/heatmap', 'erf/1/heatmap_log', 'erf/1/init_vs_now',
         'erf/1/radial_profile', 'erf/all_layers/radius']
    """

    def __init__(
        self, tag_prefix: str, cmap: str = "inferno", heatmap_style: HeatmapStyle = "annotated"
    ) -> None:
        if heatmap_style not in HEATMAP_STYLES:
            raise ValueError(
                f"heatmap_style must be one of {HEATMAP_STYLES}; got {heatmap_style!r}"
            )
        self.tag_prefix = tag_prefix
        self.cmap = cmap
        self.heatmap_style = heatmap_style
        self._init: dict[str, Any] = {}  # layer -> MapPanel of its first rendered map

    def render(
        self,
        maps: dict[str, ERFMap],
        history: ERFHistory,
        metrics: dict[str, dict[str, float]] | None = None,
        step: int | None = None,
        share: tuple[int, int] = (0, 1),
        every: Mapping[str, ERFMap] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{tag: uint8 HWC image}`` for the valid maps of one probe.

        Args:
            maps: the probe's valid maps.
            history: the run's history, this probe's records included.
            metrics: each layer's metrics (computed from ``maps`` when None).
            step: the probe's step (titles; which probe is a layer's first).
            share: ``(rank, world_size)``: render only every ``world_size``-th image, starting
                at ``rank``, so the ranks of a distributed run split the work. The images are
                numbered in the same order on every rank (they all hold the same maps and
                history), and their union over the ranks is the whole set.
            every: all the probe's maps, those without a valid map too (default ``maps``):
                the radius chart has every layer, and marks the probes that gave no map.
        """
        # Imported here: matplotlib costs ~0.4 s to import, and runs with log_images=False
        # never render.
        from erf_callback.render import render_evolution, render_heatmap, render_radial_profile
        from erf_callback.render.annotated import (
            MapPanel,
            erf_map_panel,
            metric_text,
            render_heatmap_figure,
            render_init_vs_now,
            render_on_one_scale,
            zoom_view,
        )
        from erf_callback.render.charts import render_radius_chart

        if metrics is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ERFWarning)
                metrics = {layer: m.metrics() for layer, m in maps.items()}
        step_text = "" if step is None else f"step {step} · "
        # (tag, how to render it, tags that get the same picture), in a fixed order.
        jobs: list[tuple[str, Callable[[], np.ndarray], tuple[str, ...]]] = []
        side_by_side: list[Any] = []  # per layer: its panel, titled short for a small tile
        for layer, m in maps.items():
            fit = m.gaussian
            arr = m.numpy()
            box = m.geometry.box(m.position) if m.geometry is not None else None
            mx = metrics[layer]
            tag = f"{self.tag_prefix}/{layer}"
            panel = erf_map_panel(m, step=step, metrics=mx, layer=layer)
            short = f"{layer}\nradius {metric_text(mx['radius'], '.1f')} px"
            side_by_side.append(replace(panel, title=short))
            first = history.first(layer)
            is_first = first is None or first["step"] == step
            # heatmap_init is written once, so TensorBoard's sampling (10 images per tag)
            # never drops it.
            init_alias = (f"{tag}/heatmap_init",) if layer not in self._init and is_first else ()
            for suffix, log_scale in (("heatmap", False), ("heatmap_log", True)):
                make: Callable[[], np.ndarray]
                if self.heatmap_style == "raw":
                    make = partial(
                        render_heatmap,
                        arr,
                        mean=fit.mean,
                        cov=fit.cov,
                        trf_box=box,
                        location=m.location,
                        cmap=self.cmap,
                        log_scale=log_scale,
                    )
                else:
                    make = partial(
                        render_heatmap_figure, panel, log_scale=log_scale, cmap=self.cmap
                    )
                jobs.append((f"{tag}/{suffix}", make, init_alias if suffix == "heatmap" else ()))
            init = self._init_panel(layer, panel, history, step)
            radial = partial(
                render_radial_profile,
                arr,
                mean=fit.mean,
                cov=fit.cov,
                floor=max(fit.floor, 0.0),
                radius=mx["radius"],
                energy_radius=mx["energy_radius"],
                title=f"{layer} \u00b7 {step_text}cumulative ERF mass around the fitted centre",
            )
            if is_first:
                # The layer's first map: init_vs_now would be that map twice and evolution one
                # frame of it, both already in `heatmap`. Rendering them costs ~40% of the
                # first probe (the one every run pays, however short).
                jobs.append((f"{tag}/radial_profile", radial, ()))
                continue
            now = MapPanel(
                arr,
                fit.mean,
                fit.cov,
                box,
                m.location,
                title=("now" if step is None else f"now (step {step})")
                + f"\nradius {mx['radius']:.1f} px",
            )
            growth = mx["radius"] / init[1] if init[1] and math.isfinite(init[1]) else math.nan
            make_pair = partial(
                render_init_vs_now,
                init[0],
                now,
                suptitle=f"{layer}: ERF at initialisation vs now (radius \u00d7{growth:.2f})",
                cmap=self.cmap,
            )
            jobs.append((f"{tag}/init_vs_now", make_pair, ()))
            jobs.append((f"{tag}/radial_profile", radial, ()))
            frames = history.maps.get(layer, [])
            if frames:
                # The heatmap's zoom: every frame's gradient lies in the (fixed) TRF it holds.
                # 2-D and 3-D maps (drawn as their last two axes); 1-D strips stay whole.
                view = zoom_view(panel) if arr.ndim >= 2 else None
                make_strip = partial(
                    render_evolution,
                    [f.numpy() for _, f in frames],
                    [f"step {s}" for s, _ in frames],
                    cmap=self.cmap,
                    view=view,
                    input_shape=None if view is None else (arr.shape[-2], arr.shape[-1]),
                )
                jobs.append((f"{tag}/evolution", make_strip, ()))
        charted = maps if every is None else every
        if any((history.first(layer) or {"step": step})["step"] != step for layer in charted):
            # A chart of radius vs step needs a second probe to show anything. It is drawn at
            # a probe without valid maps too: its crosses say the curves stop there.
            series = {
                layer: (
                    [r["step"] for r in history.records if r["layer"] == layer],
                    [
                        r.get("radius", math.nan) if r["status"] == "ok" else math.nan
                        for r in history.records
                        if r["layer"] == layer
                    ],
                    _geo_mean(tuple(m.trf)),
                )
                for layer, m in charted.items()
            }
            chart = partial(render_radius_chart, series)
            jobs.append((f"{self.tag_prefix}/{ALL_LAYERS_TAG}", chart, ()))
        if (
            self.heatmap_style == "annotated"
            and len(side_by_side) >= 2
            and len({p.erf.shape for p in side_by_side}) == 1
        ):
            # Small tiles, three a row: the picture is about as wide as init_vs_now, so its text
            # reads in TensorBoard's image card (~350-470 px) like the other pictures'.
            one_scale = partial(
                render_on_one_scale,
                side_by_side,
                suptitle=f"{step_text}every layer on one scale",
                cmap=self.cmap,
                max_columns=3,
                panel_px=120,
            )
            jobs.append((f"{self.tag_prefix}/{ALL_HEATMAPS_TAG}", one_scale, ()))
        rank, world_size = share
        images: dict[str, np.ndarray] = {}
        for k, (tag, make, aliases) in enumerate(jobs):
            if k % world_size == rank:
                images[tag] = make()
                for alias in aliases:
                    images[alias] = images[tag]
        return images

    def _init_panel(
        self, layer: str, panel: Any, history: ERFHistory, step: int | None
    ) -> tuple[Any, float]:
        """The init map's panel and its radius: remembered, or rebuilt from the history."""
        from erf_callback.render.annotated import MapPanel

        first = history.first(layer)
        cached = self._init.get(layer)
        if cached is None and (first is None or (step is not None and first["step"] == step)):
            # This probe is the layer's first: it is the init map.
            radius = first["radius"] if first is not None else math.nan
            init_step = first["step"] if first is not None else step
            cached = self._init[layer] = (
                MapPanel(
                    panel.erf,
                    panel.mean,
                    panel.cov,
                    panel.trf_box,
                    panel.location,
                    title=f"init (step {init_step})\nradius {radius:.1f} px",
                ),
                radius,
            )
        if cached is not None:
            return cached
        # Resumed from a checkpoint: only the downsampled history map of the first probe exists.
        assert first is not None
        frames = history.maps.get(layer, [])
        small = frames[0][1].numpy() if frames else np.full((1, 1), np.nan)
        full_shape = panel.erf.shape
        scale = full_shape[-1] / small.shape[-1]
        axes = [k for k in ("center_z", "center_y", "center_x") if k in first][-small.ndim :]
        sig = [k.replace("center", "sigma") for k in axes]
        mean = np.array([first[k] for k in axes]) if axes else None
        cov = np.diag([first[k] ** 2 for k in sig]) if all(k in first for k in sig) else None
        cached = self._init[layer] = (
            MapPanel(
                small,
                mean,
                cov,
                panel.trf_box,
                panel.location,
                title=f"init (step {first['step']})\nradius {first['radius']:.1f} px",
                scale=scale,
            ),
            first["radius"],
        )
        return cached


def render_probe_images(
    maps: dict[str, ERFMap],
    history: ERFHistory,
    tag_prefix: str,
    cmap: str = "inferno",
    metrics: dict[str, dict[str, float]] | None = None,
    *,
    step: int | None = None,
    heatmap_style: HeatmapStyle = "annotated",
) -> dict[str, np.ndarray]:
    """``{tag: uint8 HWC image}`` of one probe, with no memory of earlier probes.

    The init map of ``init_vs_now`` comes from ``history`` (its first map of each layer).
    """
    return ProbeImages(tag_prefix, cmap, heatmap_style).render(maps, history, metrics, step)

"""Annotated heatmaps, the init-vs-now pair and the all-layers chart: what the pixels show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from torch import nn

from erf_callback import compute_erf
from erf_callback.callback.history import ERFHistory
from erf_callback.callback.images import ProbeImages
from erf_callback.render import render_heatmap
from erf_callback.render.annotated import MapPanel, render_heatmap_figure, render_init_vs_now
from erf_callback.render.charts import render_radius_chart


def gauss(side: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    c = (side - 1) / 2
    return np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * sigma**2))


def ring_radius(img: np.ndarray, rows: slice) -> float:
    """Median distance of the cyan (1 sigma) pixels from their centroid, in image pixels."""
    part = img[rows].astype(int)
    cyan = (part[..., 0] < 90) & (part[..., 1] > 200) & (part[..., 2] > 200)
    pts = np.argwhere(cyan).astype(float)
    assert len(pts) > 50
    return float(np.median(np.hypot(*(pts - pts.mean(0)).T)))


def test_one_sigma_ellipse_scales_with_the_fit() -> None:
    # One 260 px panel shows the 33 px map: 1 sigma of 3 px -> ~23.6 image px, 6 px -> ~47 px.
    c = np.array([16.0, 16.0])
    small = render_heatmap_figure(MapPanel(gauss(33, 3), c, 9 * np.eye(2)))
    big = render_heatmap_figure(MapPanel(gauss(33, 6), c, 36 * np.eye(2)))
    panel = slice(50, 310)  # the map's rows (top margin 50, panel 260)
    r_small, r_big = ring_radius(small, panel), ring_radius(big, panel)
    assert r_big / r_small == pytest.approx(2.0, rel=0.05)
    assert r_small == pytest.approx(3 * 260 / 33, rel=0.08)


def test_downsampled_history_panel_is_drawn_in_input_pixels() -> None:
    # The same Gaussian, at full resolution and downsampled 2x (scale=2): same ring size.
    cov = 16 * np.eye(2)
    full = MapPanel(gauss(32, 4), np.array([15.5, 15.5]), cov)
    half = MapPanel(gauss(16, 2), np.array([15.5, 15.5]), cov, scale=2.0)
    img = render_init_vs_now(half, full)
    left, right = img[:, :210], img[:, 210:]
    rows = slice(50, 230)
    assert ring_radius(left, rows) == pytest.approx(ring_radius(right, rows), rel=0.05)


def test_legend_names_the_trf_box_only_when_it_is_drawn() -> None:
    green = np.array([int(255 * v) for v in to_rgb("#00e600")])

    def green_in_legend(box: tuple) -> bool:
        img = render_heatmap_figure(MapPanel(gauss(32, 4), trf_box=box))
        legend = img[-56:].astype(int)  # the legend strip under the map
        return bool((np.abs(legend - green).sum(-1) < 60).any())

    assert green_in_legend(((10.0, 21.0), (10.0, 21.0)))  # a box inside the map
    assert not green_in_legend(((-20.0, 51.0), (-20.0, 51.0)))  # TRF larger than the input


def _shifted_gauss(side: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("centre", [(64.0, 64.0), (3.0, 120.0), (100.0, 20.0)])
def test_a_small_erf_is_drawn_zoomed_in_on_its_trf(centre) -> None:
    # A 2 px Gaussian in a 9 x 9 TRF on a 128 px input: the panel shows a square around the
    # TRF and the 3 sigma ellipse (all of the map's gradient lies inside the TRF), inside the
    # map even where the TRF is cut by the border, not the whole input.
    from erf_callback.render.annotated import zoom_view

    cy, cx = centre
    box = ((cy - 4, cy + 4), (cx - 4, cx + 4))
    panel = MapPanel(_shifted_gauss(128, centre, 2.0), np.array(centre), 4 * np.eye(2), box, centre)
    view = zoom_view(panel)
    assert view is not None
    y0, y1, x0, x1 = view
    assert y1 - y0 == pytest.approx(x1 - x0) and y1 - y0 < 0.5 * 128
    assert y0 >= -0.5 and x0 >= -0.5 and y1 <= 127.5 and x1 <= 127.5
    for lo, hi, (t0, t1), c in ((y0, y1, box[0], cy), (x0, x1, box[1], cx)):
        assert lo <= max(t0 - 0.5, -0.5) and min(t1 + 0.5, 127.5) <= hi
        assert lo <= max(c - 6, -0.5) and min(c + 6, 127.5) <= hi  # 3 sigma
    # What the reader sees: the bright part of the map covers many times more of the panel.
    zoomed = render_heatmap_figure(panel)
    whole = render_heatmap_figure(
        MapPanel(panel.erf, panel.mean, panel.cov, None, centre)  # no TRF: no zoom
    )
    rows, cols = slice(50, 310), slice(30, 290)  # the map's axes

    def bright(img: np.ndarray) -> int:
        return int((img[rows, cols].astype(int).sum(-1) > 300).sum())

    assert bright(zoomed) > 10 * bright(whole)


@pytest.mark.parametrize(("side", "zoomed"), [(48, True), (40, False)])
def test_a_zoom_at_least_doubles_the_scale(side, zoomed) -> None:
    # A 9 x 9 TRF holding a 2.25 px Gaussian: its view (TRF and 3 sigma, padded) is ~22 px,
    # under half of a 48 px input (shown at twice the scale and more; at 40% of it, the view
    # was once left whole and the ERF a small blob) but over half of a 40 px one.
    from erf_callback.render.annotated import zoom_view

    c = (side - 1) / 2
    box = ((c - 4, c + 4), (c - 4, c + 4))
    panel = MapPanel(_shifted_gauss(side, (c, c), 2.25), np.array([c, c]), 2.25**2 * np.eye(2), box)
    view = zoom_view(panel)
    assert (view is not None) is zoomed
    if view is not None:
        assert side / (view[1] - view[0]) >= 2.0


def test_large_or_global_fields_show_the_whole_input() -> None:
    from erf_callback.render.annotated import zoom_view

    c = np.array([63.5, 63.5])
    wide = MapPanel(
        gauss(128, 20), c, 400 * np.eye(2), ((10.0, 117.0), (10.0, 117.0)), (63.5, 63.5)
    )
    inf = float("inf")
    pooled = MapPanel(gauss(128, 2), c, 4 * np.eye(2), ((-inf, inf), (-inf, inf)), (63.5, 63.5))
    assert zoom_view(wide) is None
    assert zoom_view(pooled) is None  # a global TRF: the map may be anywhere


def test_a_1d_map_is_zoomed_along_its_samples_with_the_trf_in_the_legend() -> None:
    # A 9-sample TRF on a 128-sample line was a sliver of a 128 x 16 strip captioned
    # "input 128 x 16 px", and the legend left out the TRF it drew (its x edges were read
    # against the strip's rows).
    from erf_callback.render.annotated import zoom_view

    line = gauss(128, 2)[64]
    panel = MapPanel(line, np.array([63.5]), 4 * np.eye(1), ((59.0, 67.0),), (63.5,))
    view = zoom_view(panel)
    assert view is not None
    y0, y1, x0, x1 = view
    assert (y0, y1) == (-0.5, 15.5)  # the strip's 16 rows, whole
    assert x0 <= 58.5 and x1 >= 67.5 and x1 - x0 >= y1 - y0  # the TRF, at least square
    assert x1 - x0 < 0.5 * 128
    img = render_heatmap_figure(panel)
    green = np.array([0, 230, 0])
    legend = img[-56:].astype(int)
    assert (np.abs(legend - green).sum(-1) < 60).any()  # "theoretical RF" in the legend
    # A TRF over most of the line leaves it whole.
    wide = MapPanel(line, np.array([63.5]), 4 * np.eye(1), ((10.0, 117.0),), (63.5,))
    assert zoom_view(wide) is None


def test_init_and_now_share_one_zoomed_view() -> None:
    # Side by side they compare only at one scale: the view holds both panels' own views.
    from erf_callback.render.annotated import _common_view, zoom_view

    box = ((56.0, 72.0), (56.0, 72.0))
    init = MapPanel(
        _shifted_gauss(128, (64, 64), 1.5), np.array([64.0, 64.0]), 2.25 * np.eye(2), box
    )
    now = MapPanel(_shifted_gauss(128, (64, 64), 3.0), np.array([64.0, 64.0]), 9 * np.eye(2), box)
    view, own = _common_view([init, now]), [zoom_view(init), zoom_view(now)]
    assert view is not None and all(v is not None for v in own)
    for v in own:
        assert view[0] <= v[0] and v[1] <= view[1] and view[2] <= v[2] and v[3] <= view[3]
    img = render_init_vs_now(init, now)
    left, right = img[:, :210], img[:, 210:]
    rows = slice(50, 230)
    assert ring_radius(right, rows) == pytest.approx(2 * ring_radius(left, rows), rel=0.1)


def test_radius_chart_gives_each_layer_its_own_colour() -> None:
    series = {
        f"layer{i}": ([0, 10, 20], [1.0 + i, 1.5 + i, 2.0 + i], float("inf")) for i in range(3)
    }
    img = render_radius_chart(series).astype(int)
    for i in range(3):
        colour = np.array([int(255 * v) for v in to_rgb(f"C{i}")])
        assert (np.abs(img - colour).sum(-1) < 30).sum() > 100, f"no pixels of C{i}"
    # One layer fewer: its colour is gone (colours follow the layers, not the chart).
    img2 = render_radius_chart(dict(list(series.items())[:2])).astype(int)
    c2 = np.array([int(255 * v) for v in to_rgb("C2")])
    assert (np.abs(img2 - c2).sum(-1) < 30).sum() == 0


def test_radius_chart_marks_probes_without_a_map_on_the_step_axis() -> None:
    # A diverged layer's curve stopped, as if the run had; its later probes (NaN radius) are
    # crosses on the step axis, in the layer's colour.
    nan = float("nan")
    steady = ([0, 10, 20, 30], [4.0, 5.0, 5.5, 6.0], float("inf"))
    stopped = render_radius_chart({"a": ([0, 10, 20, 30], [2, 2.5, nan, nan], 9.0), "b": steady})
    dropped = render_radius_chart({"a": ([0, 10], [2, 2.5], 9.0), "b": steady})
    c0 = np.array([int(255 * v) for v in to_rgb("C0")])

    def blue_low(img: np.ndarray) -> int:  # C0 pixels in the radius axes' bottom band
        near = np.abs(img.astype(int) - c0).sum(-1) < 60
        return int(near[190:225].sum())

    assert blue_low(stopped) >= blue_low(dropped) + 20


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
    maps = compute_erf(net, torch.randn(2, 1, 16, 16), ["2"])
    m = maps["2"]
    history = ERFHistory()
    metrics = {**m.metrics(), "center_y": 7.5, "center_x": 7.5}
    history.add(0, 0, "2", "ok", metrics, m.grad)
    return maps, history


def test_heatmap_init_is_written_once_and_raw_style_is_the_raster(probe) -> None:
    maps, history = probe
    images = ProbeImages("erf")
    first = images.render(maps, history, step=0)
    assert "erf/2/heatmap_init" in first
    np.testing.assert_array_equal(first["erf/2/heatmap_init"], first["erf/2/heatmap"])
    history.add(5, 0, "2", "ok", {**maps["2"].metrics(), "center_y": 7.5, "center_x": 7.5},
                maps["2"].grad)  # fmt: skip
    later = images.render(maps, history, step=5)
    assert "erf/2/heatmap_init" not in later and "erf/2/init_vs_now" in later

    raw = ProbeImages("erf", heatmap_style="raw").render(maps, history, step=5)
    m = maps["2"]
    expected = render_heatmap(
        m.numpy(), mean=m.gaussian.mean, cov=m.gaussian.cov,
        trf_box=m.geometry.box(m.position), location=m.location,
    )  # fmt: skip
    np.testing.assert_array_equal(raw["erf/2/heatmap"], expected)
    with pytest.raises(ValueError, match="heatmap_style"):
        ProbeImages("erf", heatmap_style="fancy")  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_images_of_a_probe(world_size) -> None:
    # Two layers: 9 images at the first probe, 12 at a later one. Each rank renders its
    # share; the shares are disjoint, each does a fair part, and their union is the
    # single-process set, pixel for pixel (heatmap_init travels with heatmap).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
    maps = compute_erf(net, torch.randn(2, 1, 16, 16), ["0", "2"])
    history = ERFHistory()
    for step in (0, 5):
        for layer, m in maps.items():
            history.add(step, 0, layer, "ok", {**m.metrics(), "center_y": 7.5, "center_x": 7.5},
                        m.grad)  # fmt: skip
    for step, count in ((0, 9), (5, 12)):  # the first probe (with heatmap_init), a later one
        whole = ProbeImages("erf").render(maps, history, step=step)
        assert len(whole) == count
        shares = [
            ProbeImages("erf").render(maps, history, step=step, share=(r, world_size))
            for r in range(world_size)
        ]
        assert sum(len(s) for s in shares) == len(whole)  # disjoint
        # A fair part of the rendering: heatmap_init is heatmap's picture, not a render.
        renders = [[t for t in s if not t.endswith("/heatmap_init")] for s in [whole, *shares]]
        assert max(len(r) for r in renders[1:]) <= -(-len(renders[0]) // world_size)
        union = {tag: img for s in shares for tag, img in s.items()}
        assert union.keys() == whole.keys()
        for tag, img in whole.items():
            np.testing.assert_array_equal(union[tag], img, err_msg=tag)


def test_the_zoom_keeps_every_pixel_the_picture_shows() -> None:
    # A unit near the corner of a circularly padded net also sees the far side of the input,
    # which its TRF box (the padding's geometry) does not hold, and a fit of the main blob
    # does not reach: the view must still hold it (before, the far rows were cut off).
    from erf_callback.render.annotated import zoom_view

    a = _shifted_gauss(64, (3.0, 3.0), 1.5)
    a[a < 1e-4] = 0.0
    a[62:, :7] = 0.2  # wrapped round from the top edge
    box = ((-1.0, 7.0), (-1.0, 7.0))
    corner = MapPanel(a, np.array([3.0, 3.0]), 2.25 * np.eye(2), box, (3.0, 3.0))
    assert zoom_view(corner) is None  # blob and far rows span the input: shown whole
    a[62:] = 0.0  # without the wrap, zoomed as before
    view = zoom_view(MapPanel(a, np.array([3.0, 3.0]), 2.25 * np.eye(2), box, (3.0, 3.0)))
    assert view is not None and view[1] < 32
    # Reflection padding reads a few pixels past the box: they are kept in a zoomed view.
    a[8:10, 2:5] = 0.05
    view = zoom_view(MapPanel(a, np.array([3.0, 3.0]), 2.25 * np.eye(2), box, (3.0, 3.0)))
    assert view is not None and view[1] >= 9.5


def test_render_erf_map_is_the_tensorboard_heatmap() -> None:
    # One call for notebook users: the picture the callback logs (without a step), in the
    # linear and the log colour scale.
    from erf_callback.render import render_erf_map

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
    maps = compute_erf(net, torch.randn(2, 1, 48, 48), ["2"])
    history = ERFHistory()
    history.add(0, 0, "2", "ok", {**maps["2"].metrics(), "center_y": 23.5, "center_x": 23.5},
                maps["2"].grad)  # fmt: skip
    logged = ProbeImages("erf").render(maps, history)
    np.testing.assert_array_equal(render_erf_map(maps["2"]), logged["erf/2/heatmap"])
    np.testing.assert_array_equal(
        render_erf_map(maps["2"], log_scale=True), logged["erf/2/heatmap_log"]
    )


def test_render_erf_maps_draws_the_layers_on_one_scale_in_rows() -> None:
    # Five layers whose ERFs grow with depth. Each alone would be zoomed on its own TRF (a
    # 5 px ERF as large as a 21 px one); side by side they share the view that holds every
    # map's own, so their sizes compare, in rows of max_columns with the layers in order.
    from erf_callback.render import render_erf_map, render_erf_maps
    from erf_callback.render.annotated import _common_view, _layout, erf_map_panel, zoom_view

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(1 if i == 0 else 2, 2, 5, padding=2) for i in range(5)])
    maps = compute_erf(net, torch.randn(2, 1, 96, 96), [str(i) for i in range(5)])
    panels = [erf_map_panel(m) for m in maps.values()]
    own = [zoom_view(p) for p in panels]
    assert all(v is not None for v in own) and len(set(own)) == 5  # five different zooms
    shared = _common_view(panels)
    assert shared is not None
    for v in own:  # the shared view holds each map's own view
        assert shared[0] <= v[0] and v[1] <= shared[1] and shared[2] <= v[2] and v[3] <= shared[3]
    out = render_erf_maps(maps, max_columns=2)
    # Every row on the shared view, its size line (the same for all) under its first map only.
    rows = [
        _layout(panels[i : i + 2], False, "inferno", "", 260, view_of=panels, one_caption=True)
        for i in (0, 2, 4)
    ]
    assert out.shape == (3 * rows[0].shape[0] + 2 * 12, rows[0].shape[1], 3)
    top = 0
    for row in rows:
        np.testing.assert_array_equal(out[top : top + row.shape[0], : row.shape[1]], row)
        assert (out[top : top + row.shape[0], row.shape[1] :] == 255).all()
        top += row.shape[0] + 12
    # The same pixels as the layer's own heatmap where it is the only one; the log scale.
    for log_scale in (False, True):
        np.testing.assert_array_equal(
            render_erf_maps({"4": maps["4"]}, log_scale=log_scale),
            render_erf_map(maps["4"], log_scale=log_scale),
        )
    # By default up to four in one row: wider than two panels by two panels and gaps; five
    # maps in balanced rows, 3 + 2.
    assert render_erf_maps({k: maps[k] for k in "0123"}).shape[1] == out.shape[1] + 2 * (260 + 14)
    five = render_erf_maps(maps)
    assert five.shape == (2 * rows[0].shape[0] + 12, out.shape[1] + 260 + 14, 3)


@pytest.mark.parametrize(
    ("which", "kwargs", "match"),
    [
        ("none", {}, "at least one map"),
        ("2-D", {"max_columns": 0}, "max_columns must be a positive int"),
        ("mixed", {}, r"one input shape.*render_erf_map"),
    ],
)
def test_render_erf_maps_rejects_what_it_cannot_compare(which, kwargs, match) -> None:
    from erf_callback.render import render_erf_maps

    torch.manual_seed(0)
    maps = dict(compute_erf(nn.Conv2d(1, 1, 3), torch.randn(2, 1, 16, 16)))
    if which == "mixed":
        maps["line"] = compute_erf(nn.Conv1d(1, 1, 3), torch.randn(2, 1, 16))["output"]
    with pytest.raises(ValueError, match=match):
        render_erf_maps({} if which == "none" else maps, **kwargs)


def test_a_map_without_an_erf_says_why_and_missing_numbers_read_n_a() -> None:
    from erf_callback.render.annotated import erf_map_panel, heatmap_title

    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[1].bias.fill_(-100.0)  # the ReLU is off everywhere: an all-zero gradient
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="zero"):
        maps = compute_erf(net, torch.randn(2, 1, 24, 24), ["0", "2"])
    assert maps["2"].status == "zero"
    assert erf_map_panel(maps["2"]).title == "2\nno ERF: all-zero gradient"
    assert erf_map_panel(maps["2"], step=7).title == "2 \u00b7 step 7\nno ERF: all-zero gradient"
    assert erf_map_panel(maps["0"]).title.startswith("0 \u00b7 radius ")
    # A TRF that could not be traced or a failed fit: "n/a", never "nan".
    nan = float("nan")
    assert (
        heatmap_title("x", nan, nan, None)
        == "x \u00b7 radius n/a px\nERF/TRF n/a \u00b7 Gaussian R\u00b2 n/a"
    )


def test_every_layers_heatmap_on_one_scale_is_logged_with_two_layers_or_more() -> None:
    # erf/all_layers/heatmaps: the layers' panels (titled with the layer and its radius; the
    # step is the suptitle) on the view that holds all of them, in tiles small enough for
    # TensorBoard's image card; not with one layer (its heatmap says it all) nor in the raw
    # style (no titles to name the layers).
    from dataclasses import replace

    from erf_callback.render.annotated import erf_map_panel, render_on_one_scale

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2) for _ in range(4)])
    maps = compute_erf(net, torch.randn(2, 1, 64, 64), ["0", "3"])
    history = ERFHistory()
    for layer, m in maps.items():
        history.add(0, 0, layer, "ok", m.metrics(), m.grad)
    images = ProbeImages("erf").render(maps, history, step=0)
    panels = [
        replace(erf_map_panel(m), title=f"{k}\nradius {m.metrics()['radius']:.1f} px")
        for k, m in maps.items()
    ]
    expected = render_on_one_scale(
        panels,
        suptitle="step 0 \u00b7 every layer on one scale",
        max_columns=3,
        panel_px=120,
    )
    np.testing.assert_array_equal(images["erf/all_layers/heatmaps"], expected)
    # As wide as init_vs_now (its text reads in a TensorBoard card) with three layers.
    assert expected.shape[1] <= 500
    one = ProbeImages("erf").render({"3": maps["3"]}, history, step=0)
    raw = ProbeImages("erf", heatmap_style="raw").render(maps, history, step=0)
    assert "erf/all_layers/heatmaps" not in one and "erf/all_layers/heatmaps" not in raw


@pytest.mark.parametrize(
    ("shape", "ratio"), [((1, 97), 8.0), ((97, 2), 1 / 8.0), ((3, 5), 5 / 3), ((6, 40), 40 / 6)]
)
def test_an_elongated_map_is_drawn_at_most_eight_times_as_long_as_wide(shape, ratio) -> None:
    # A 1 x 97 map drawn at its own aspect was a hairline whose values could not be seen.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from erf_callback.render.annotated import _draw_panel

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    erf = np.exp(-(((xx - shape[1] / 2) / 3) ** 2) - ((yy - shape[0] / 2) / 3) ** 2)
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    _draw_panel(ax, MapPanel(erf, None, None), log_scale=False, cmap="inferno")
    fig.canvas.draw()  # applies the aspect: the axes' box shrinks to the drawn map
    box = ax.get_position()
    assert box.width / box.height == pytest.approx(ratio, rel=0.03)

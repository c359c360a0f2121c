"""``erf-callback report``: one page (PNG and HTML) from a run's history or TensorBoard logs.

The page shows the ERF radius against the step for every layer, each layer's evolution grid
(init -> end) and a table of the final metrics.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erf_callback.cli.errors import CLIError

__all__ = [
    "TABLE_METRICS",
    "Run",
    "find_run",
    "read_history",
    "read_tensorboard",
    "render_report_html",
    "render_report_png",
    "run_from_history",
    "write_report",
]

#: Columns of the report's table (the HTML page has every metric).
TABLE_METRICS = (
    "radius",
    "radius_growth",
    "erf_trf_ratio",
    "gaussian_r2",
    "area_ratio@0.5",
    "map_correlation",
    "border_mass",
)


@dataclass
class Run:
    """What a report needs: records, and per layer the maps or a finished evolution image."""

    source: str
    records: list[dict[str, Any]] = field(default_factory=list)
    maps: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    evolution: dict[str, np.ndarray] = field(default_factory=dict)
    # Per layer the maps' shape before downsampling (the input's), when the history has it.
    map_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.records))

    def with_map(self, layer: str) -> list[dict[str, Any]]:
        """The layer's probes that gave a map (status ``"ok"``), in order."""
        return [r for r in self.records if r["layer"] == layer and r.get("status", "ok") == "ok"]

    def final(self, layer: str) -> dict[str, Any] | None:
        """The layer's last probe with a map, or None."""
        ok = self.with_map(layer)
        return ok[-1] if ok else None

    def without_map(self, layer: str) -> list[dict[str, Any]]:
        """The layer's probes that gave no map (status ``"nonfinite"``, ``"zero"``, ...)."""
        return [r for r in self.records if r["layer"] == layer and r.get("status", "ok") != "ok"]

    def last_probe(self, layer: str) -> str:
        """``"ok"``, or the status and step of the layer's last probe where it gave no map
        (after divergence the final metrics are those of an earlier probe)."""
        mine = [r for r in self.records if r["layer"] == layer]
        last = mine[-1] if mine else {}
        status = str(last.get("status", "ok"))
        return "ok" if status == "ok" else f"{status} at step {_fmt(last.get('step', ''))}"


def find_run(path: str, tag_prefix: str = "erf") -> Run:
    """Read a history ``.json``/``.csv`` file, or search a folder for one (else TB events)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(
            f"no file or folder {path!r}",
            "pass a run's erf_history.json, erf_history.csv, or its log folder",
        )
    if p.is_file():
        if p.suffix in (".json", ".csv"):
            return read_history(p)
        if p.name.startswith("events.out.tfevents"):
            return read_tensorboard(p.parent, tag_prefix)
        raise CLIError(
            f"{path!r} is neither a history file (.json/.csv) nor a TensorBoard event file",
            "pass erf_history.json or the run's log folder",
        )
    histories = sorted(p.rglob("erf_history*.json"), key=lambda f: f.stat().st_mtime)
    if histories:
        return read_history(histories[-1])
    events = sorted(p.rglob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    if events:
        return read_tensorboard(events[-1].parent, tag_prefix)
    raise CLIError(
        f"no erf_history.json and no TensorBoard event files under {path!r}",
        "pass the log folder of a run that used ERFMonitor or ERFTracker",
    )


def read_history(path: Path) -> Run:
    """A run from the ``erf_history.json`` (records and maps) or ``.csv`` (records) file."""
    run = Run(source=str(path))
    try:
        if path.suffix == ".json":
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or "records" not in data:
                raise CLIError(
                    f"{str(path)!r} is JSON but not an erf-callback history (no 'records')",
                    "pass the erf_history.json that ERFMonitor or ERFTracker wrote",
                )
            run.records = [_numbers(r) for r in data["records"]]
            for layer, entries in data.get("maps", {}).items():
                run.maps[layer] = [(int(e["step"]), np.asarray(e["map"])) for e in entries]
            for layer, shape in (data.get("map_shapes") or {}).items():
                run.map_shapes[layer] = tuple(int(n) for n in shape)
        else:
            with open(path, newline="") as f:
                run.records = [_numbers(r) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CLIError(
            f"cannot read history {str(path)!r} ({type(err).__name__}: {err})",
            "pass an erf_history.json/.csv written by erf-callback",
        ) from err
    if not run.records or "layer" not in run.records[0]:
        raise CLIError(
            f"{str(path)!r} has no probe records", "pass the history of a run that probed"
        )
    return run


def run_from_history(history: Any, source: str = "") -> Run:
    """A run from an in-memory history (``ERFMonitor.history``, ``ERFTracker.history``): its
    records, its downsampled maps and the maps' shapes, as the JSON file would give them
    (``source``: what the page's title names, e.g. a file; none by default)."""
    run = Run(source=source)
    run.records = [dict(r) for r in history.records]
    for layer, entries in history.maps.items():
        run.maps[layer] = [(int(step), np.asarray(m, dtype=np.float64)) for step, m in entries]
    run.map_shapes = {k: tuple(int(n) for n in v) for k, v in history.map_shapes.items()}
    return run


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in ("layer", "status"):
            out[k] = v
        elif v is None or v == "":
            out[k] = math.nan
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = v
    return out


def read_tensorboard(log_dir: Path, tag_prefix: str = "erf") -> Run:
    """A run from TensorBoard event files: ``<prefix>/<layer>/<metric>`` scalars, evolution."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    pattern = re.compile(rf"^{re.escape(tag_prefix)}/(.+)/([^/]+)$")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for tag in tags.get("scalars", []):
        match = pattern.match(tag)
        if not match:
            continue
        layer, metric = match.groups()
        for event in acc.Scalars(tag):
            row = rows.setdefault(
                (layer, event.step), {"step": float(event.step), "layer": layer, "status": "ok"}
            )
            row[metric] = float(event.value)
    if not rows:
        raise CLIError(
            f"the TensorBoard logs in {str(log_dir)!r} have no {tag_prefix}/<layer>/<metric> "
            "scalars",
            "pass the log folder of a run that used ERFMonitor or ERFTracker (or --tag-prefix)",
        )
    run = Run(source=str(log_dir))
    run.records = [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]
    for tag in tags.get("images", []):
        match = pattern.match(tag)
        if match and match.group(2) == "evolution":
            last = acc.Images(tag)[-1]
            with Image.open(io.BytesIO(last.encoded_image_string)) as img:
                run.evolution[match.group(1)] = np.asarray(img.convert("RGB"))
    return run


def _evolution_image(run: Run, layer: str) -> np.ndarray | None:
    if layer in run.evolution:
        return run.evolution[layer]
    frames = run.maps.get(layer)
    if not frames:
        return None
    from erf_callback.render import render_evolution
    from erf_callback.render.annotated import frames_view
    from erf_callback.render.figures import balanced_columns

    maps = [m for _, m in frames]
    shape = run.map_shapes.get(layer, ())
    # Zoomed like the callback's grid where the input's shape is known (the history keeps
    # only downsampled maps): on the pixels any frame shows, the TRF not being stored.
    view, shown = None, None
    if len(shape) >= 2 and all(m.ndim == len(shape) for m in maps):
        shown = (shape[-2], shape[-1])
        view = frames_view(maps, shown)
    # Up to 6 tiles a row (the page is wider than TensorBoard's image card), rows balanced
    # (at most 12 frames are shown).
    return render_evolution(
        maps,
        [f"step {s}" for s, _ in frames],
        max_columns=balanced_columns(min(len(maps), 12), 6),
        view=view,
        input_shape=shown if view is not None else None,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def render_report_png(run: Run) -> np.ndarray:
    """The page as one ``uint8`` image: radius curves, evolution grids, final metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = run.layers
    images = [(layer, _evolution_image(run, layer)) for layer in layers]
    grids = [(layer, g) for layer, g in images if g is not None]
    width_px = 1000
    heights = [320] + [g.shape[0] * width_px / max(g.shape[1], width_px) for _, g in grids]
    heights.append(40 + 24 * (len(layers) + 1))
    # 80 px between rows (the curves' x label, each grid's title) and 30 above and below, so
    # every row gets its own height in pixels: the grids are drawn 1:1.
    gap, margin = 80.0, 30.0
    total = sum(heights) + gap * (len(heights) - 1) + 2 * margin
    fig = Figure(figsize=(width_px / 100, total / 100), dpi=100)
    FigureCanvasAgg(fig)
    spec = fig.add_gridspec(
        len(heights),
        1,
        height_ratios=heights,
        hspace=gap / (sum(heights) / len(heights)),  # in units of the mean row height
        top=1 - margin / total,
        bottom=margin / total,
    )
    ax = fig.add_subplot(spec[0])
    failed = False
    for layer in layers:
        ok = run.with_map(layer)
        steps, radii = [r["step"] for r in ok], [r.get("radius", math.nan) for r in ok]
        (line,) = ax.plot(steps, radii, "o-", label=layer)
        # Probes without a map (a diverged model, dead units): crosses on the axis, so that a
        # curve that stops is not read as a run that stopped.
        bad = [r["step"] for r in run.without_map(layer)]
        if bad:
            failed = True
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), ms=9, mew=2, clip_on=False)
    if failed:
        ax.plot([], [], "x", color="0.35", ms=9, mew=2, label="probe without a map")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("ERF radius (input pixels)")
    ax.set_title("ERF radius per layer" + (f": {run.source}" if run.source else ""), fontsize=9)
    # A size: from 0, so a 1% change does not fill the axis, with room above the top point.
    every = (r.get("radius", math.nan) for r in run.records if r.get("status", "ok") == "ok")
    top = max((v for v in every if math.isfinite(v)), default=0.0)
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)  # all zero (lines, dead units): from 0 up
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for i, (layer, grid) in enumerate(grids, start=1):
        gax = fig.add_subplot(spec[i])
        gax.imshow(grid, interpolation="nearest")
        gax.set_title(f"{layer}: evolution (each tile normalised to its maximum)", fontsize=9)
        gax.axis("off")
    tax = fig.add_subplot(spec[-1])
    tax.axis("off")
    columns = ["step", *TABLE_METRICS]
    cells = [[_fmt((run.final(layer) or {}).get(k, math.nan)) for k in columns] for layer in layers]
    if failed:  # where the last probe gave no map, the row is an earlier probe's: say so
        columns.append("last probe")
        for row, layer in zip(cells, layers, strict=True):
            row.append(run.last_probe(layer))
    # Padded layer names: matplotlib sizes the label column tight (a "3" touched its edge).
    labels = [f" {layer} " for layer in layers]
    table = tax.table(cellText=cells, rowLabels=labels, colLabels=columns, loc="upper center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(-1, len(columns))))  # headers and text fit
    tax.set_title("final metrics (each layer's last probe with a map)", fontsize=9)
    canvas = fig.canvas
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])  # type: ignore[attr-defined]


def render_report_html(run: Run, png: bytes) -> str:
    """A self-contained page: the PNG inline and a table of every final metric."""
    layers = run.layers
    keys: list[str] = []
    for layer in layers:
        keys += [k for k in (run.final(layer) or {}) if k not in keys and k not in ("layer",)]
    last = any(run.without_map(layer) for layer in layers)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    head += "<th>last probe</th>" if last else ""
    rows = "".join(
        f"<tr><th>{html.escape(layer)}</th>"
        + "".join(
            f"<td>{html.escape(_fmt((run.final(layer) or {}).get(k, '')))}</td>" for k in keys
        )
        + (f"<td>{html.escape(run.last_probe(layer))}</td>" if last else "")
        + "</tr>"
        for layer in layers
    )
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ERF report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
        f"<h1>ERF report</h1><p>Source: <code>{html.escape(run.source)}</code></p>"
        f"<img alt='ERF report' src='data:image/png;base64,{image}'>"
        "<h2>Final metrics</h2><p>Each layer's last probe with a map.</p>"
        f"<table><tr><th>layer</th>{head}</tr>{rows}</table>"
        "</body></html>\n"
    )


def write_report(run: Run, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into ``out_dir``; returns their paths."""
    from PIL import Image

    img = render_report_png(run)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    png_path, html_path = out_dir / "report.png", out_dir / "report.html"
    png_path.write_bytes(buf.getvalue())
    html_path.write_text(render_report_html(run, buf.getvalue()))
    return png_path, html_path

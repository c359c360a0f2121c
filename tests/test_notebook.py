"""In IPython and Jupyter an ERFMap displays as its annotated heatmap and an ERFHistory as the
report page of ``erf-callback report`` (erf_callback.notebook)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erf_callback import ERFWarning, compute_erf
from erf_callback.callback.history import ERFHistory
from erf_callback.cli.report import read_history, render_report_png, run_from_history
from erf_callback.engine import ERFMaps
from erf_callback.notebook import (
    erf_map_png,
    erf_maps_png,
    history_png,
    register_notebook_display,
)
from erf_callback.render import render_erf_map, render_erf_maps

ROOT = Path(__file__).resolve().parents[1]


def small_map(dims: int = 2):
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    torch.manual_seed(0)
    net = torch.nn.Sequential(conv(1, 2, 3), torch.nn.ReLU(), conv(2, 1, 3))
    return compute_erf(net, torch.randn(4, 1, *[(24 if dims < 3 else 12)] * dims))["output"]


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_png_is_the_heatmap_tensorboard_shows(dims):
    m = small_map(dims)
    png = erf_map_png(m)
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decoded(png), render_erf_map(m))


def test_compute_erf_returns_a_dict_that_draws_its_layers_side_by_side():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(4)])
    maps = compute_erf(net, torch.randn(4, 1, 24, 24), layers=["3", "0", "1"])
    assert isinstance(maps, ERFMaps) and isinstance(maps, dict)
    assert list(maps) == ["3", "0", "1"]  # the order asked for
    png = erf_maps_png(maps)
    assert png is not None
    np.testing.assert_array_equal(decoded(png), render_erf_maps(maps))


def a_history() -> ERFHistory:
    """Two layers probed at three steps, one probe of one layer failed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *[torch.nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(4)]
    )
    history = ERFHistory(map_size=16)
    for probe, step in enumerate((0, 10, 20)):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.1)
        maps = compute_erf(net, torch.randn(4, 1, 24, 24), layers=["1", "3"])
        for layer, m in maps.items():
            status = "failed" if (layer, step) == ("3", 10) else m.status
            history.add(step, 0, layer, status, m.metrics(), m.grad, probe=probe)
    return history


def test_a_history_draws_as_the_report_page_of_its_json_file(tmp_path):
    history = a_history()
    png = history_png(history)
    assert png is not None
    np.testing.assert_array_equal(decoded(png), render_report_png(run_from_history(history)))
    # The run read from the history's own JSON file is the same run: the notebook shows what
    # `erf-callback report` makes of the file.
    _, json_path = history.write(str(tmp_path))
    from_file = read_history(Path(json_path))
    in_memory = run_from_history(history, source=json_path)
    assert in_memory.layers == from_file.layers == ["1", "3"]
    assert in_memory.map_shapes == from_file.map_shapes == {"1": (24, 24), "3": (24, 24)}
    assert [r["status"] for r in in_memory.records] == [r["status"] for r in from_file.records]
    for mine, theirs in zip(in_memory.records, from_file.records, strict=True):
        assert mine.keys() == theirs.keys()
        np.testing.assert_allclose(
            [float(v) for k, v in mine.items() if k not in ("layer", "status")],
            [float(v) for k, v in theirs.items() if k not in ("layer", "status")],
            rtol=1e-12,
        )
    for layer in ("1", "3"):
        assert [s for s, _ in in_memory.maps[layer]] == [s for s, _ in from_file.maps[layer]]
        for (_, a), (_, b) in zip(in_memory.maps[layer], from_file.maps[layer], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)  # float32 maps through JSON
    assert np.array_equal(render_report_png(in_memory), render_report_png(from_file)), (
        "the same run must draw the same page"
    )


def test_nothing_to_draw_shows_the_text_quietly(recwarn):
    assert erf_maps_png(ERFMaps()) is None
    history = ERFHistory()
    assert history_png(history) is None
    assert not [w for w in recwarn if issubclass(w.category, ERFWarning)]
    assert repr(history) == "ERFHistory(layers=[], probes=0, steps=none, records=0, map_size=64)"
    assert repr(a_history()) == (
        "ERFHistory(layers=['1', '3'], probes=3, steps=0..20, records=6, map_size=16)"
    )


def test_a_map_that_cannot_be_drawn_warns_once_and_falls_back_to_text():
    with pytest.warns(ERFWarning, match="could not draw object as a picture") as caught:
        assert erf_map_png(object()) is None
    assert len(caught) == 1
    broken = ERFHistory()
    broken.records = [{"layer": "x"}]  # no step, no status: nothing a report can draw
    with pytest.warns(ERFWarning, match="could not draw ERFHistory as a picture"):
        assert history_png(broken) is None
    with pytest.warns(ERFWarning, match="could not draw ERFMaps as a picture"):
        assert erf_maps_png(ERFMaps(layer=object())) is None


def test_outside_ipython_nothing_is_registered():
    assert register_notebook_display(object()) is False  # no display formatters
    # The running interpreter is no IPython shell: nothing to register with.
    if "IPython" not in sys.modules:
        assert register_notebook_display() is False


class FakeFormatter:
    def __init__(self) -> None:
        self.registered: list[tuple[str, str, object]] = []

    def for_type_by_name(self, module: str, name: str, func: object) -> None:
        self.registered.append((module, name, func))


def test_registration_names_the_erf_map_class_without_importing_it():
    png = FakeFormatter()
    shell = type("Shell", (), {})()
    shell.display_formatter = type("Display", (), {"formatters": {"image/png": png}})()
    assert register_notebook_display(shell) is True
    registered = {func: (module, name) for module, name, func in png.registered}
    assert len(png.registered) == 3
    drawn = ((small_map(), erf_map_png), (ERFMaps(), erf_maps_png), (ERFHistory(), history_png))
    for obj, func in drawn:
        assert registered[func] == (type(obj).__module__, type(obj).__name__)


_IN_IPYTHON = """
import io, json, sys
import numpy as np, torch
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
import erf_callback  # registers itself: the shell is running
import erf_callback.callback.history
from erf_callback.render import render_erf_map
from PIL import Image
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 1, 3))
m = erf_callback.compute_erf(net, torch.randn(4, 1, 24, 24))["output"]
data, _ = shell.display_formatter.format(m)
pixels = np.asarray(Image.open(io.BytesIO(data["image/png"])).convert("RGB"))
plain, _ = shell.display_formatter.format({"a": 1})
history = erf_callback.callback.history.ERFHistory()
empty, _ = shell.display_formatter.format(history)
history.add(0, 0, "output", "ok", m.metrics(), m.grad)
report, _ = shell.display_formatter.format(history)
net2 = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 3))
several, _ = shell.display_formatter.format(
    erf_callback.compute_erf(net2, torch.randn(4, 1, 24, 24), layers=["0", "1"])
)
print(json.dumps({
    "mimes": sorted(data),
    "text": data["text/plain"],
    "same": bool(np.array_equal(pixels, render_erf_map(m))),
    "other_objects": sorted(plain),
    "empty_history": sorted(empty),
    "history": sorted(report),
    "several": sorted(several),
}))
"""


def test_in_a_running_ipython_shell_a_map_displays_as_its_heatmap(tmp_path):
    pytest.importorskip("IPython")
    res = subprocess.run(
        [sys.executable, "-c", _IN_IPYTHON],
        cwd=tmp_path,
        # IPython keeps its history and profile under IPYTHONDIR: a temporary one.
        env={**os.environ, "PYTHONPATH": str(ROOT), "IPYTHONDIR": str(tmp_path / "ipython")},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["mimes"] == ["image/png", "text/plain"]
    assert seen["text"].startswith("ERFMap(layer='output'")
    assert seen["same"]
    assert seen["other_objects"] == ["text/plain"]
    assert seen["empty_history"] == ["text/plain"]
    assert seen["history"] == ["image/png", "text/plain"]
    assert seen["several"] == ["image/png", "text/plain"]

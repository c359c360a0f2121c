"""In IPython and Jupyter an ERFMap displays as its annotated heatmap (erf_callback.notebook)."""

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
from erf_callback.notebook import erf_map_png, register_notebook_display
from erf_callback.render import render_erf_map

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


def test_a_map_that_cannot_be_drawn_warns_once_and_falls_back_to_text():
    with pytest.warns(ERFWarning, match="could not draw object as a picture") as caught:
        assert erf_map_png(object()) is None
    assert len(caught) == 1


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
    [(module, name, func)] = png.registered
    m = small_map()
    assert (type(m).__module__, type(m).__name__) == (module, name)
    assert func is erf_map_png


_IN_IPYTHON = """
import io, json, sys
import numpy as np, torch
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
import erf_callback  # registers itself: the shell is running
from erf_callback.render import render_erf_map
from PIL import Image
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 1, 3))
m = erf_callback.compute_erf(net, torch.randn(4, 1, 24, 24))["output"]
data, _ = shell.display_formatter.format(m)
pixels = np.asarray(Image.open(io.BytesIO(data["image/png"])).convert("RGB"))
plain, _ = shell.display_formatter.format({"a": 1})
print(json.dumps({
    "mimes": sorted(data),
    "text": data["text/plain"],
    "same": bool(np.array_equal(pixels, render_erf_map(m))),
    "other_objects": sorted(plain),
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

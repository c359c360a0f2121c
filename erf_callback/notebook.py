"""Inline pictures in Jupyter and IPython: an ``ERFMap`` shows as its annotated heatmap, a
training run's history as its report.

``import erf_callback`` inside IPython (a Jupyter notebook, JupyterLab, the ``ipython`` shell)
registers PNG formatters, so an object that ends a cell is drawn instead of printed:

* an :class:`~erf_callback.ERFMap` as TensorBoard shows it
  (:func:`~erf_callback.render.render_erf_map`: the fitted Gaussian, the TRF, the probed unit,
  radius, ERF/TRF and R² in the title);
* what :func:`~erf_callback.compute_erf` returns (an ``ERFMaps`` dict) as those heatmaps side
  by side, layer after layer (:func:`~erf_callback.render.render_erf_maps`);
* an ``ERFHistory`` (``ERFMonitor.history``, ``ERFTracker.history``) as the page of
  ``erf-callback report``: radius against step per layer, each layer's evolution grid and
  the final metrics.

Outside IPython nothing happens, and nothing is imported: matplotlib loads at the first
picture.

Example:
    In a notebook cell::

        maps = compute_erf(net, images, layers=["layer3"])
        maps["layer3"]        # the heatmap, inline; print(maps["layer3"]) for the text
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from typing import Any

from erf_callback.warnings import ERFWarning

__all__ = ["erf_map_png", "erf_maps_png", "history_png", "register_notebook_display"]

# Where the drawn classes are defined: the formatters are registered by name, so registering
# them imports neither the engine nor the callback (nor matplotlib) until one is displayed.
_ERF_MAP = ("erf_callback.engine.erf_map", "ERFMap")
_ERF_MAPS = ("erf_callback.engine.erf_map", "ERFMaps")
_HISTORY = ("erf_callback.callback.history", "ERFHistory")


def register_notebook_display(shell: Any = None) -> bool:
    """Draw ``ERFMap``, ``ERFMaps`` and ``ERFHistory`` objects inline as PNG in an IPython shell
    (Jupyter's kernel included).

    ``import erf_callback`` calls this already when it runs inside IPython; call it yourself
    for a shell started after that import.

    Args:
        shell: the IPython shell (default: the running one, ``IPython.get_ipython()``).

    Returns:
        True when the formatter was registered; False outside IPython (or for a shell
        without IPython's display formatters).

    Example:
        >>> from erf_callback.notebook import register_notebook_display
        >>> register_notebook_display()  # a plain Python session: nothing to do
        False
    """
    if shell is None:
        ipython = sys.modules.get("IPython")  # only a shell that is already running counts
        get_shell = getattr(ipython, "get_ipython", None)
        shell = get_shell() if callable(get_shell) else None
        if shell is None:
            return False
    try:
        png = shell.display_formatter.formatters["image/png"]
        png.for_type_by_name(*_ERF_MAP, erf_map_png)
        png.for_type_by_name(*_ERF_MAPS, erf_maps_png)
        png.for_type_by_name(*_HISTORY, history_png)
    except (AttributeError, KeyError, TypeError):
        return False
    return True


def erf_map_png(erf_map: Any) -> bytes | None:
    """The PNG of :func:`~erf_callback.render.render_erf_map` for ``erf_map``.

    Args:
        erf_map: an ``ERFMap`` (from :func:`~erf_callback.compute_erf`).

    Returns:
        The PNG file's bytes; None when the map cannot be drawn (one :class:`ERFWarning` says
        why; the notebook then shows the map's text).

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 1, 3))
        >>> png = erf_map_png(compute_erf(net, torch.randn(4, 1, 32, 32))["output"])
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """

    def draw() -> Any:
        from erf_callback.render import render_erf_map

        return render_erf_map(erf_map)

    return _png(draw, erf_map)


def erf_maps_png(erf_maps: Any) -> bytes | None:
    """The PNG of :func:`~erf_callback.render.render_erf_maps` for ``erf_maps``.

    Args:
        erf_maps: what :func:`~erf_callback.compute_erf` returns.

    Returns:
        The PNG file's bytes; None for an empty dict (nothing to draw) or maps that cannot be
        drawn (one :class:`ERFWarning` says why); the notebook then shows the dict's text.
    """
    if not erf_maps:
        return None

    def draw() -> Any:
        from erf_callback.render import render_erf_maps

        return render_erf_maps(erf_maps)

    return _png(draw, erf_maps)


def history_png(history: Any) -> bytes | None:
    """The PNG of ``erf-callback report``'s page for an in-memory history.

    Args:
        history: an ``ERFHistory`` (``ERFMonitor.history`` or ``ERFTracker.history``).

    Returns:
        The PNG file's bytes: the radius of every layer against the step, each layer's
        evolution grid and the final metrics. None for a history without records (nothing
        to draw; the notebook shows its text) or one that cannot be drawn (with one
        :class:`ERFWarning` that says why).

    Example:
        >>> import torch
        >>> from erf_callback.callback.history import ERFHistory
        >>> h = ERFHistory()
        >>> history_png(h) is None  # no probe yet
        True
        >>> _ = h.add(0, 0, "layer1", "ok", {"radius": 2.0}, torch.ones(16, 16))
        >>> history_png(h)[:4] == b"\\x89PNG"
        True
    """
    if not getattr(history, "records", None):
        return None

    def draw() -> Any:
        from erf_callback.cli.report import render_report_png, run_from_history

        return render_report_png(run_from_history(history))

    return _png(draw, history)


def _png(draw: Callable[[], Any], shown: Any) -> bytes | None:
    """PNG bytes of the ``uint8 (H, W, 3)`` array ``draw()`` returns; None, with one warning,
    when drawing fails: a picture must never break the cell that displays ``shown``."""
    try:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(draw()).save(buffer, format="PNG")
    except Exception as err:
        warnings.warn(
            f"erf_callback: could not draw {type(shown).__name__} as a picture "
            f"({type(err).__name__}: {err}); showing its text instead.",
            ERFWarning,
            stacklevel=3,
        )
        return None
    return buffer.getvalue()

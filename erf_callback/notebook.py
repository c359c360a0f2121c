"""Inline pictures in Jupyter and IPython: an ``ERFMap`` shows as its annotated heatmap.

``import erf_callback`` inside IPython (a Jupyter notebook, JupyterLab, the ``ipython`` shell)
registers a PNG formatter for :class:`~erf_callback.ERFMap`, so a map that ends a cell is drawn
as TensorBoard shows it (:func:`~erf_callback.render.render_erf_map`: the fitted Gaussian, the
TRF, the probed unit, radius, ERF/TRF and R² in the title) instead of printed. Outside
IPython nothing happens, and nothing is imported: matplotlib loads at the first picture.

Example:
    In a notebook cell::

        maps = compute_erf(net, images, layers=["layer3"])
        maps["layer3"]        # the heatmap, inline; print(maps["layer3"]) for the text
"""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any

from erf_callback.warnings import ERFWarning

__all__ = ["erf_map_png", "register_notebook_display"]

# Where ERFMap is defined: the formatter is registered by name, so that registering it needs no
# import of the engine (nor of matplotlib) until a map is displayed.
_ERF_MAP = ("erf_callback.engine.erf_map", "ERFMap")


def register_notebook_display(shell: Any = None) -> bool:
    """Draw ``ERFMap`` objects inline as PNG in an IPython shell (Jupyter's kernel included).

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
    try:
        from PIL import Image

        from erf_callback.render import render_erf_map

        buffer = io.BytesIO()
        Image.fromarray(render_erf_map(erf_map)).save(buffer, format="PNG")
    except Exception as err:  # a picture must never break the cell that displays the map
        warnings.warn(
            f"erf_callback: could not draw {type(erf_map).__name__} as a picture "
            f"({type(err).__name__}: {err}); showing its text instead.",
            ERFWarning,
            stacklevel=2,
        )
        return None
    return buffer.getvalue()

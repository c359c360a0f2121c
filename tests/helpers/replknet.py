"""RepLKNet's high-contribution area ratio (erf/analyze_erf.py), as an independent reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["replknet_area_ratio", "replknet_get_rectangle"]


def replknet_get_rectangle(
    data: np.ndarray, thresh: float, center: Sequence[int] | None = None
) -> tuple[int, float] | None:
    """RepLKNet's ``get_rectangle``, verbatim logic, with the square's centre as a parameter
    (the published script always uses ``(h // 2, w // 2)``).

    Without ``center`` it is the published script exactly: it tries sides up to ``h`` only
    (returning None past them) and slices ``data[h // 2 - i : ..., w // 2 - i : ...]`` as
    written, so on a map taller than wide a square wider than the map gets a negative start
    that Python counts from the end. With ``center`` the squares are clipped to the map."""
    h, w = data.shape
    cy, cx = (h // 2, w // 2) if center is None else center
    all_sum = np.sum(data)
    for i in range(1, h // 2 if center is None else max(h, w)):
        if center is None:
            selected_area = data[h // 2 - i : h // 2 + 1 + i, w // 2 - i : w // 2 + 1 + i]
        else:
            selected_area = data[max(cy - i, 0) : cy + 1 + i, max(cx - i, 0) : cx + 1 + i]
        area_sum = np.sum(selected_area)
        if area_sum / all_sum > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


def replknet_area_ratio(
    erf: np.ndarray, thresh: float, center: Sequence[int] | None = None
) -> float:
    """``log10(erf + 1)``, normalised to its maximum, then :func:`replknet_get_rectangle`."""
    scaled = np.log10(erf + 1)
    found = replknet_get_rectangle(scaled / scaled.max(), thresh, center)
    assert found is not None
    return found[1]

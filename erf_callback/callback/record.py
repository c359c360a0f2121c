"""Turning one probe's maps into history records and logged scalars.

``ERFMonitorBase._record`` calls :func:`record_probe`; :class:`~erf_callback.ERFTracker` runs
that same core, so plain PyTorch loops and Lightning runs write identical histories.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from erf_callback.callback.history import CHANGE_METRICS, ERFHistory
from erf_callback.callback.publish import scalar_tags
from erf_callback.engine.erf_map import ERFMap
from erf_callback.warnings import ERFWarning

__all__ = ["ProbeRecord", "record_probe"]

#: ``warn_once(key, message)``: issue ``message`` once per ``key`` (the caller keeps the keys).
WarnOnce = Callable[[str, str], None]


@dataclass
class ProbeRecord:
    """What one probe produced: ``{tag: value}`` scalars, the valid maps and their metrics."""

    scalars: dict[str, float] = field(default_factory=dict)
    maps: dict[str, ERFMap] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def record_probe(
    history: ERFHistory,
    maps: Mapping[str, ERFMap],
    step: int,
    epoch: int,
    tag_prefix: str,
    warn_once: WarnOnce,
    detail_scalars: bool = True,
) -> ProbeRecord:
    """Append every layer's record to ``history``; invalid maps are recorded and skipped.

    A NaN/zero map gets a ``status`` record (so the gap is visible in the history) and one
    warning per layer and kind; border warnings of the metrics are passed on once per layer.
    Scalars are ``<tag_prefix>/<layer>/<metric>`` for the main metrics and
    ``<tag_prefix>_detail/<layer>/<metric>`` for the others (see
    :func:`~erf_callback.callback.publish.scalar_tags`; ``detail_scalars=False`` drops those).

    Example:
        >>> import torch
        >>> from erf_callback import compute_erf
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
        >>> maps = compute_erf(net, torch.randn(2, 1, 16, 16), ["0"])
        >>> out = record_probe(ERFHistory(), maps, 0, 0, "erf", lambda key, msg: None)
        >>> out.scalars["erf_detail/0/trf_x"], out.scalars["erf/0/radius_growth"]
        (3.0, 1.0)
    """
    probe = history.num_probes
    out = ProbeRecord()
    for layer, m in maps.items():
        if m.status != "ok":
            why = (
                "NaN/Inf gradients or weights (a diverged model?)"
                if m.status == "nonfinite"
                else "all-zero gradients"
            )
            warn_once(
                f"{m.status}:{layer}",
                f"ERF probe of {layer!r} at step {step} skipped: {why}; training goes on.",
            )
            history.add(step, epoch, layer, m.status, {}, m.grad, probe)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ERFWarning)
            metrics = m.metrics()
        for w in caught:
            warn_once(f"border:{layer}", str(w.message))
        axes = ("center_z", "center_y", "center_x")[-m.spatial_dims :]
        centre = dict(zip(axes, m.gaussian.mean, strict=True))
        record = history.add(step, epoch, layer, "ok", {**metrics, **centre}, m.grad, probe)
        values = {key: record[key] for key in (*metrics, *CHANGE_METRICS)}
        out.scalars.update(scalar_tags(tag_prefix, layer, values, detail_scalars))
        out.maps[layer] = m
        out.metrics[layer] = metrics
    return out

"""The ERF engine: :func:`compute_erf` and what it returns. Pure torch, no Lightning.

* :mod:`.compute`: chunked gradient accumulation and map assembly.
* :mod:`.chunking`: chunk sizes from measured activations and a memory budget; OOM retries.
* :mod:`.config`: :class:`ProbeConfig`, every probe option in one frozen object.
* :mod:`.erf_map`: :class:`ERFMap`, one layer's map and its metrics; :class:`ERFMaps`, the
  dict of them that :func:`compute_erf` returns.
* :mod:`.fastpath`: BatchNorm folding and channels_last for later chunks, model untouched.
* :mod:`.guard`: leaving the model exactly as found.
* :mod:`.layers`: layer names, wrappers, the default layer.
* :mod:`.trace_cache`: the first probe's trace, remembered per model for the next probes.
* :mod:`.transforms`: layer outputs to ``(N, C, *spatial)`` tensors.
* :mod:`.validate`: argument checks with messages that say the fix.
"""

from erf_callback.engine.compute import compute_erf
from erf_callback.engine.config import OUTPUT, ProbeConfig, Reduction
from erf_callback.engine.erf_map import ERFMap, ERFMaps, Status
from erf_callback.engine.guard import preserved_rng, probe_context
from erf_callback.engine.layers import (
    deepest_spatial_layer,
    model_device_dtype,
    resolve_layers,
    unwrap_model,
)
from erf_callback.engine.trace_cache import clear_trace_cache
from erf_callback.engine.transforms import OutputTransform, tokens_to_grid

__all__ = [
    "OUTPUT",
    "ERFMap",
    "ERFMaps",
    "OutputTransform",
    "ProbeConfig",
    "Reduction",
    "Status",
    "clear_trace_cache",
    "compute_erf",
    "deepest_spatial_layer",
    "model_device_dtype",
    "preserved_rng",
    "probe_context",
    "resolve_layers",
    "tokens_to_grid",
    "unwrap_model",
]

"""Pictures of ERF maps: numpy heatmaps (:mod:`.raster`) and matplotlib figures (:mod:`.figures`,
:mod:`.annotated`); :func:`render_erf_map` draws an ``ERFMap`` as TensorBoard shows it,
:func:`render_erf_maps` several side by side.

Every function returns a ``uint8`` ``(H, W, 3)`` array for ``SummaryWriter.add_image``.
"""

from erf_callback.render.annotated import render_erf_map, render_erf_maps
from erf_callback.render.figures import render_evolution, render_radial_profile
from erf_callback.render.raster import colorize, render_heatmap, to_display_2d

__all__ = [
    "colorize",
    "render_erf_map",
    "render_erf_maps",
    "render_evolution",
    "render_heatmap",
    "render_radial_profile",
    "to_display_2d",
]

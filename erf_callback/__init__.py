"""erf-callback: see what your CNN looks at while it learns.

The engine (:func:`compute_erf`, :func:`fit_gaussian`) is pure torch. :class:`ERFMonitor`, the
callback for ``pytorch_lightning.Trainer``, is imported lazily so that engine users do not pay
for importing Lightning; ``erf_callback.lightning.ERFMonitor`` is the twin for
``lightning.pytorch.Trainer``.

Example:
    >>> import torch
    >>> from erf_callback import compute_erf
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> m = compute_erf(net, torch.randn(4, 3, 32, 32))["output"]
    >>> m.grad.shape
    torch.Size([32, 32])
"""

from typing import TYPE_CHECKING, Any

from erf_callback.engine import ERFMap, ProbeConfig, compute_erf, tokens_to_grid
from erf_callback.fit import GaussianFit, MetricConfig, fit_gaussian
from erf_callback.notebook import register_notebook_display
from erf_callback.tracker import ERFTracker
from erf_callback.trf import AxisRF, RFGeometry
from erf_callback.warnings import ERFWarning

if TYPE_CHECKING:
    from erf_callback.pytorch_lightning import ERFMonitor

__version__ = "0.1.0"

# Inside IPython / Jupyter an ERFMap displays as its heatmap; elsewhere this does nothing.
register_notebook_display()

__all__ = [
    "AxisRF",
    "ERFMap",
    "ERFMonitor",
    "ERFTracker",
    "ERFWarning",
    "GaussianFit",
    "MetricConfig",
    "ProbeConfig",
    "RFGeometry",
    "compute_erf",
    "fit_gaussian",
    "tokens_to_grid",
]


def __getattr__(name: str) -> Any:
    if name == "ERFMonitor":
        from erf_callback.pytorch_lightning import ERFMonitor

        return ERFMonitor
    raise AttributeError(f"module 'erf_callback' has no attribute {name!r}")

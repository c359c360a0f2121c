"""The theoretical receptive field (TRF): geometry types, a tracer, and its per-op rules.

* :mod:`~erf_callback.trf.geometry`: :class:`AxisRF`, :class:`RFGeometry` and the algebra of
  receptive fields (windows, unions, reductions) the rules are written in;
* :mod:`~erf_callback.trf.tracer`: :class:`ReceptiveFieldTracer`, a ``TorchFunctionMode``
  that follows a forward pass and dispatches each torch call to its rule;
* :mod:`~erf_callback.trf.rules`: the rule table (data), grouped by kind of op.

Example:
    >>> import torch
    >>> x = torch.rand(1, 1, 16, 16)
    >>> with ReceptiveFieldTracer(x) as tracer:
    ...     y = torch.nn.functional.conv2d(x, torch.ones(1, 1, 5, 5), padding=2)
    >>> tracer.geometry(y).box((0, 3))
    ((-2.0, 2.0), (1.0, 5.0))
"""

from erf_callback.trf.geometry import AxisRF, RFGeometry
from erf_callback.trf.tracer import ReceptiveFieldTracer

__all__ = ["AxisRF", "RFGeometry", "ReceptiveFieldTracer"]

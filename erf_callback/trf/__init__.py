"""The theoretical receptive field (TRF): geometry types and a tracer over torch functions."""

from erf_callback.trf.receptive_field import AxisRF, ReceptiveFieldTracer, RFGeometry

__all__ = ["AxisRF", "RFGeometry", "ReceptiveFieldTracer"]

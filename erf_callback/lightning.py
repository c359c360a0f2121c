"""``ERFMonitor`` for ``lightning.pytorch.Trainer``.

The two Lightning namespaces must not be mixed in one Trainer. Use this class with
``lightning.pytorch.Trainer``, and ``erf_callback.ERFMonitor``
with ``pytorch_lightning.Trainer``.
"""

from lightning.pytorch.callbacks import Callback

from erf_callback.callback.core import ERFMonitorBase


class ERFMonitor(ERFMonitorBase, Callback):
    __doc__ = ERFMonitorBase.__doc__


__all__ = ["ERFMonitor"]

"""``ERFMonitor`` for ``pytorch_lightning.Trainer``.

The two Lightning namespaces must not be mixed in one Trainer. Use this class with
``pytorch_lightning.Trainer``, and ``erf_callback.lightning.ERFMonitor``
with ``lightning.pytorch.Trainer``.
"""

from pytorch_lightning.callbacks import Callback

from erf_callback.callback.core import ERFMonitorBase


class ERFMonitor(ERFMonitorBase, Callback):
    __doc__ = ERFMonitorBase.__doc__


__all__ = ["ERFMonitor"]

"""``ERFMonitor`` for ``lightning.pytorch.Trainer``.

The two Lightning namespaces cannot be mixed: a callback from one is rejected by a Trainer of
the other. Use this class with ``lightning.pytorch.Trainer``, and erf_callback.ERFMonitor (for pytorch_lightning).
"""

from lightning.pytorch.callbacks import Callback

from erf_callback.monitor import ERFMonitorBase


class ERFMonitor(ERFMonitorBase, Callback):
    __doc__ = ERFMonitorBase.__doc__


__all__ = ["ERFMonitor"]

"""``ERFMonitor`` for ``pytorch_lightning.Trainer``.

The two Lightning namespaces cannot be mixed: a callback from one is rejected by a Trainer of
the other. Use this class with ``pytorch_lightning.Trainer``, and erf_callback.lightning.ERFMonitor (for lightning.pytorch).
"""

from pytorch_lightning.callbacks import Callback

from erf_callback.monitor import ERFMonitorBase


class ERFMonitor(ERFMonitorBase, Callback):
    __doc__ = ERFMonitorBase.__doc__


__all__ = ["ERFMonitor"]

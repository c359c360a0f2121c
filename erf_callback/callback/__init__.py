"""The callback's logic, free of any Lightning import (duck-typed ``trainer``/``pl_module``).

* :mod:`.core`: :class:`ERFMonitorBase`, the hooks and the probe loop.
* :mod:`.schedule`: when to probe.
* :mod:`.inputs`: where the probe inputs come from.
* :mod:`.history`: the record of every probe, CSV/JSON files, checkpoint state.
* :mod:`.images`: the pictures of one probe.
* :mod:`.publish`: scalars and images to whatever loggers the Trainer has.

``erf_callback.ERFMonitor`` (``pytorch_lightning``) and ``erf_callback.lightning.ERFMonitor``
(``lightning.pytorch``) mix :class:`ERFMonitorBase` into their namespace's ``Callback``.
"""

from erf_callback.callback.core import ERFMonitorBase
from erf_callback.callback.history import CHANGE_METRICS, ERFHistory
from erf_callback.callback.schedule import ProbeSchedule

__all__ = ["CHANGE_METRICS", "ERFHistory", "ERFMonitorBase", "ProbeSchedule"]

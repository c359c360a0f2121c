"""Where a monitor's history files go, and that no two monitors or runs share them.

* The directory is the run's own: a ``TensorBoardLogger``/``CSVLogger``'s ``log_dir``
  (``version_<n>``), a W&B run's files directory (``experiment.dir``, so the files travel with
  the run), else the Trainer's ``log_dir``/``default_root_dir``, which runs may share: there
  :func:`~erf_callback.callback.history.claim_history_files` gives each run its own names.
* Several monitors in one Trainer get base names of their own, derived from their tag prefix,
  module and layers; the same file name or the same tags twice is an error at fit start.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_BASENAME", "check_monitors", "derived_basename", "run_directory"]

#: Base name of the history files of a Trainer's only monitor.
DEFAULT_BASENAME = "erf_history"


def run_directory(trainer: Any, log_dir: str | None) -> str:
    """The run's own directory for history files (call on rank 0; ``log_dir`` is
    ``trainer.log_dir``, which every rank must read since it broadcasts)."""
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        first = loggers[0]
        run_dir = _wandb_files_dir(first)
        if run_dir:
            return run_dir
    return log_dir or trainer.default_root_dir


def _wandb_files_dir(logger: Any) -> str | None:
    # A W&B run's files directory (uploaded with the run). Only W&B loggers are asked for
    # their experiment here: building it for others could start a remote connection.
    if "wandb" not in type(logger).__name__.lower():
        return None
    try:
        run_dir = getattr(logger.experiment, "dir", None)
    except Exception:
        return None
    return run_dir if isinstance(run_dir, str) and run_dir else None


def derived_basename(tag_prefix: str, module: str | None, layers: Sequence[str] | None) -> str:
    """``erf_history-<prefix>-<module.layers>``: the history name of one of several monitors.

    Example:
        >>> derived_basename("erf", None, ["layer2", "layer4"])
        'erf_history-erf-layer2+layer4'
        >>> derived_basename("erf", "backbone", None)
        'erf_history-erf-backbone.auto'
    """
    names = "+".join(layers) if layers else "auto"
    if module:
        names = f"{module}.{names}"
    slug = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{tag_prefix}-{names}")
    if len(slug) > 80:  # stay far below file-name limits; the hash keeps it unique
        slug = slug[:60] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
    return f"{DEFAULT_BASENAME}-{slug}"


def check_monitors(monitors: Sequence[Any]) -> None:
    """Raise ``ValueError`` when two monitors would write the same history files or log the
    same tags (same ``tag_prefix``, module and a shared layer). ``monitors`` have
    ``history_filename``, ``tag_prefix``, ``module`` and ``layers`` (``None``: not resolved)."""
    for i, a in enumerate(monitors):
        for b in monitors[i + 1 :]:
            if a.history_filename == b.history_filename:
                raise ValueError(
                    f"Two ERFMonitors in this Trainer write the same history files "
                    f"'{a.history_filename}.csv/.json' ({_describe(a)} and {_describe(b)}). "
                    "Pass a different history_filename= to one of them."
                )
            if a.tag_prefix != b.tag_prefix or a.module != b.module:
                continue
            shared = sorted(set(a.layers or []) & set(b.layers or []))
            if shared:
                raise ValueError(
                    f"Two ERFMonitors in this Trainer log the same tags "
                    f"'{a.tag_prefix}/{shared[0]}/...' ({_describe(a)} and {_describe(b)}). "
                    "Pass a different tag_prefix= to one of them."
                )


def _describe(monitor: Any) -> str:
    return f"layers={monitor.layers!r}, tag_prefix={monitor.tag_prefix!r}"

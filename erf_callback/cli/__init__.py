"""The offline command-line tool ``erf-callback`` (also ``python -m erf_callback``).

* ``erf-callback probe MODULE:FACTORY --layers L1 [L2 ...] --out DIR``: the ERF of a model
  built by a factory (and optionally a checkpoint), as ``metrics.json`` and PNG heatmaps.
* ``erf-callback report RUN --out DIR``: a one-page HTML/PNG report of a run's history.

* :mod:`.main`: argument parsing and the error boundary (user errors exit with status 2).
* :mod:`.loading`: the factory, the checkpoint and the probe inputs.
* :mod:`.probe` and :mod:`.report`: the two commands.
"""

from erf_callback.cli.errors import CLIError
from erf_callback.cli.main import build_parser, main

__all__ = ["CLIError", "build_parser", "main"]

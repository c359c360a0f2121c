"""``python -m erf_callback``: the same as the ``erf-callback`` command."""

import sys

from erf_callback.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())

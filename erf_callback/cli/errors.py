"""The one error type of the command line: a problem the user can fix, said in one line."""

from __future__ import annotations

__all__ = ["EXIT_USAGE", "CLIError"]

#: Exit status for every user error (as argparse uses for bad arguments).
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: the message names the problem and the fix; the CLI exits with status 2.

    Example:
        >>> str(CLIError("no file 'x.pt'", "check the path"))
        "no file 'x.pt'; check the path"
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix

# What the command-line entry points (`mailhub`, `mailhub-loadtest`) share: the installed package's
# version for `--version`, and a quiet end when standard output's reader goes away
# (`mailhub site list | head -1`): no traceback, exit status 141 (128 + SIGPIPE, what a shell reports
# for a command killed by SIGPIPE), as CPython's signal module documentation recommends.
import functools
import importlib.metadata
import os
import sys
from typing import Protocol

DISTRIBUTION = "dicom-mail-hub"
EXIT_CLOSED_PIPE = 141


class Main(Protocol):
    """A command's main(): its arguments (default: sys.argv's) -> its exit status."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


def version() -> str:
    """The installed package's version ("unknown" when run from a source tree never installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def quiet_on_closed_pipe(main: Main) -> Main:
    """main, flushing standard output before it returns (or exits, as --help does); if that output's
    reader has gone, standard output is pointed at /dev/null (so the interpreter's own flush at exit
    stays quiet) and the status is EXIT_CLOSED_PIPE."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            try:
                return main(argv)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_CLOSED_PIPE

    return run

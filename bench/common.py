# What every benchmark script shares: the checkout it runs from, a command line parser whose usage
# shows how the script is really started (`python -m bench.NAME`), and the command line to print
# beside the figures, so that every table can be made again; the summary line of an A/B run; and
# a process's children and descendants (the hub's index writer and its launcher, Postfix's daemons).
# Must never import the hub's internals.
import argparse
import contextlib
import os
import shlex
import statistics
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def argument_parser(module: str, description: str) -> argparse.ArgumentParser:
    """A parser for `python -m MODULE`, its description shown as written (line breaks kept)."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def command_line(module: str) -> str:
    """The command that is running, for the report: `INTERPRETER -m MODULE ARGS...` (the
    interpreter relative to the current folder when it lies inside it, e.g. .venv/bin/python)."""
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    return shlex.join([python, "-m", module, *sys.argv[1:]])


def print_ab_summary(label: str, what: str, this: list[float], base: list[float]) -> None:
    """One figure of an A/B run (bench.ab_ingest, bench.ab_download): both sides' medians, the
    this/base ratio of each round and their median."""
    ratios = [a / b for a, b in zip(this, base)]
    print(
        f"{label}, {what}: this {statistics.median(this):.3f} vs base {statistics.median(base):.3f} (medians);"
        f" this/base per round {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}",
        flush=True,
    )


def children(pid: int) -> list[int]:
    """The pids of a process's live children (started by any of its threads); [] once it is gone."""
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found += [int(child) for child in f.read().split()]
    return found


def descendants(pid: int) -> list[int]:
    """The pids of a process's live children, theirs, and so on."""
    return [each for child in children(pid) for each in (child, *descendants(child))]

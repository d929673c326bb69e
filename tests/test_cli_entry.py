# The command-line entry points of `mailhub` and `mailhub-loadtest`, run as real processes: `--version`
# prints the installed package's version.
import importlib.metadata
import subprocess
import sys

import pytest

from conftest import REPO

TOOLS = {"mailhub": "mailhub.cli", "mailhub-loadtest": "loadtest.cli"}


def run(module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, stdin=subprocess.DEVNULL, timeout=60, **kwargs
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_version_prints_the_package_version(tool):
    result = run(TOOLS[tool], "--version", capture_output=True, text=True)
    expected = importlib.metadata.version("dicom-mail-hub")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{tool} {expected}\n", "")

# Tests of how the suite is handed to its pytest-xdist workers (scripts/test.sh, SLOWEST_FILES in
# tests/conftest.py): every file named as slow exists, and with the options test.sh passes, a
# worker runs whole files in collection order, not the files with the most tests first (xdist's
# default, which made the longest file, with few tests, the tail of the run).
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SLOWEST_FILES

TESTS = Path(__file__).resolve().parent
TEST_SH = TESTS.parent / "scripts" / "test.sh"


def test_every_slow_file_named_exists():
    missing = [name for name in SLOWEST_FILES if not (TESTS / name).is_file()]
    assert missing == []
    assert len(set(SLOWEST_FILES)) == len(SLOWEST_FILES)


def _distribution_options() -> list[str]:
    """The options of test.sh's pytest command that decide how files go to the workers."""
    command = next(line for line in TEST_SH.read_text().splitlines() if "-m pytest" in line)
    return re.findall(r"--dist \w+|--no-loadscope-reorder|--loadscope-reorder", command)


def test_workers_take_files_in_collection_order(tmp_path):
    options = _distribution_options()
    assert "--no-loadscope-reorder" in options, options
    ran = tmp_path / "ran.txt"
    # collected first: a file with one test; then one with five (xdist's default would start there)
    (tmp_path / "test_a_one.py").write_text(f"def test_one():\n    open({str(ran)!r}, 'a').write('one\\n')\n")
    many = "".join(f"def test_{n}():\n    open({str(ran)!r}, 'a').write('many\\n')\n\n" for n in range(5))
    (tmp_path / "test_b_many.py").write_text(many)
    args = [arg for option in options for arg in option.split()]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "xdist.plugin", "-n", "1", *args, "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=os.environ | {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},  # xdist only: a second less to start
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran.read_text().splitlines() == ["one"] + ["many"] * 5

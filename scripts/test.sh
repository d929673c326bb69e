#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine and runs it:
# the Debian packages of the real third-party clients/servers (as root), a virtual environment
# with the hub and its test dependencies, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    sh bench/install-debian-packages.sh
else
    echo "test.sh: not root, assuming the Debian packages in bench/debian-packages.txt are installed"
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install --quiet -e '.[test]'

# Three pytest-xdist workers, each taking whole test files (module fixtures are made once): on two
# cores the tests wait (paced transfers, timeouts, restarts) about as much as they compute.
# Arguments given here come later and win (-n 0: no workers).
# pytest's exit status 5 (no tests collected) is a failure here like any other non-zero status.
# Fixed order (-p no:randomly) until the shuffled suite has been shown green more than once;
# `.venv/bin/python -m pytest -n 3 --dist loadfile` runs it shuffled (pytest-randomly).
exec .venv/bin/python -m pytest -q -n 3 --dist loadfile -p no:randomly "$@"

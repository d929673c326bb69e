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

# The static checks (scripts/lint.sh: layers, ruff, mypy) first; a failure there fails the run
# after the tests have run too. MAILHUB_LINT=0 skips them.
lint_status=0
if [ "${MAILHUB_LINT:-1}" != 0 ]; then
    bash scripts/lint.sh || lint_status=$?
fi

# Two pytest-xdist workers per CPU (MAILHUB_TEST_WORKERS overrides), each taking whole test files
# (module fixtures are made once) in collection order (--no-loadscope-reorder: the slowest files are
# handed out first, see SLOWEST_FILES in tests/conftest.py): the tests wait (paced transfers,
# timeouts, restarts, real clients) about as much as they compute, so a second worker per core
# fills the waits.
# The order is shuffled (pytest-randomly) with a seed printed here: a failure found in one order is
# replayed with `bash scripts/test.sh --randomly-seed=SEED` (a later seed wins), and `-p no:randomly`
# keeps the collected order. Arguments given here come later and win (-n 0: no workers).
# pytest's exit status 5 (no tests collected) is a failure here like any other non-zero status.
order=(--randomly-seed="${MAILHUB_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}")
for arg in "$@"; do
    if [ "$arg" = no:randomly ] || [ "$arg" = "-pno:randomly" ]; then order=(); fi
done
if [ ${#order[@]} -gt 0 ]; then
    echo "test.sh: random order, ${order[0]} (replay: bash scripts/test.sh ${order[0]})"
else
    echo "test.sh: fixed order (-p no:randomly)"
fi
test_status=0
workers="${MAILHUB_TEST_WORKERS:-$(( $(nproc) * 2 ))}"
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "${order[@]}" "$@" || test_status=$?
if [ "$lint_status" != 0 ]; then
    echo "test.sh: the static checks failed (scripts/lint.sh, output above)" >&2
    [ "$test_status" != 0 ] || test_status=$lint_status
fi
exit "$test_status"

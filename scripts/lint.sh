#!/usr/bin/env bash
# The project's static checks, as CI runs them (scripts/test.sh calls this before pytest; MAILHUB_LINT=0 skips):
# the package layers (import-linter), ruff's lint rules and formatting, and mypy ([tool.mypy] in
# pyproject.toml: every package, strict for storage, quotas and the protocol cores). Needs the venv
# made by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
status=0
run() { echo "lint: $*"; "$@" || status=1; }
run "$bin/lint-imports" --no-cache
run "$bin/ruff" check --quiet .
run "$bin/ruff" format --check --quiet .
run "$bin/mypy"
exit $status

# The package layers (docs/architecture.md): mailhub <- relay <- directory <- storage | quotas, and
# none of them importing the tools (loadtest, bench). The import-linter contracts in pyproject.toml
# say so; these tests run `lint-imports` on the tree, and on a copy of it with one upward import
# added each, to show that the contracts catch a break (lazy imports inside a function included).
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["mailhub", "relay", "directory", "quotas", "storage", "loadtest", "bench"]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "lint-imports"
    command = [str(tool)] if tool.exists() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run(command + ["--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    return copy


@pytest.mark.parametrize("module, line, broken", [
    ("storage/errors.py", "import quotas", "storage is not allowed to import quotas"),
    ("quotas/limits.py", "from storage import db", "quotas is not allowed to import storage"),
    ("storage/db.py", "from directory import errors", "storage is not allowed to import directory"),
    ("directory/errors.py", "import relay.metrics", "directory is not allowed to import relay"),
    ("relay/smtp_replies.py", "def f():\n    from mailhub import config", "relay is not allowed to import mailhub"),
    ("storage/files.py", "def f():\n    import mailhub.cli", "storage is not allowed to import mailhub"),
    ("relay/bounce.py", "import loadtest.net", "relay is not allowed to import loadtest"),
])
def test_an_upward_import_breaks_a_contract(tree_copy, module, line, broken):
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + "\n\n" + line + "\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout and broken in result.stdout, result.stdout

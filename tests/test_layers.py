# The package layers (docs/architecture.md): mailhub <- relay <- directory <- storage | quotas, none
# of them importing the tools (loadtest, bench), and loadtest importing nothing of bench; inside
# relay/, the protocol packages independent of each other and the sans-I/O cores free of I/O. The
# import-linter contracts in pyproject.toml say so; these tests run `lint-imports` on the tree, and
# on a copy of it with one upward import added each, to show that the contracts catch a break (lazy
# imports inside a function included).
# Also: the package graph in docs/architecture.md is current and has no cycle, and no SQL is
# written outside storage/.
import ast
import importlib.util
import re
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
    return subprocess.run(
        command + ["--no-cache", "--no-logo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
    )


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    return copy


# One upward import added to each of these modules of a copy of the tree (lazy imports inside a
# function included); one run of lint-imports must name each of them as the importer of its broken
# contract line. (One run for all: the tool reports every illegal import, grouped per layer pair.)
UPWARD_IMPORTS = [
    ("storage/errors.py", "import quotas", "storage is not allowed to import quotas"),
    ("quotas/limits.py", "from storage import db", "quotas is not allowed to import storage"),
    ("storage/db.py", "from directory import errors", "storage is not allowed to import directory"),
    ("directory/errors.py", "import relay.metrics", "directory is not allowed to import relay"),
    (
        "relay/smtp/replies.py",
        "def f():\n    from mailhub import logsetup",
        "relay is not allowed to import mailhub",
    ),
    ("storage/files.py", "def f():\n    import mailhub.control", "storage is not allowed to import mailhub"),
    ("relay/outbound/bounce.py", "import loadtest.net", "relay is not allowed to import loadtest"),
    ("loadtest/net.py", "def f():\n    from bench import abuse", "loadtest is not allowed to import bench"),
    ("relay/pop3/server.py", "from relay.imap import server", "relay.pop3 is not allowed to import relay.imap"),
    (
        "relay/outbound/queue.py",
        "def f():\n    import relay.smtp.ingest",
        "relay.outbound is not allowed to import relay.smtp",
    ),
    ("relay/mime/sniff.py", "from relay.policy import replies", "relay.mime is not allowed to import relay.policy"),
    (
        "relay/framing.py",
        "def f():\n    from relay.pop3 import protocol",
        "relay.framing is not allowed to import relay.pop3",
    ),
    ("relay/pop3/protocol.py", "import asyncio", "relay.pop3.protocol is not allowed to import asyncio"),
    (
        "relay/imap/parser.py",
        "def f():\n    from relay.imap import server",
        "relay.imap.parser is not allowed to import relay.imap.server",
    ),
    ("relay/smtp/syntax.py", "def f():\n    import storage", "relay.smtp.syntax is not allowed to import storage"),
    ("relay/smtp/protocol.py", "import ssl", "relay.smtp.protocol is not allowed to import ssl"),
]


def _importer(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def test_an_upward_import_breaks_a_contract(tree_copy):
    modules = [module for module, _line, _broken in UPWARD_IMPORTS]
    assert len(set(modules)) == len(modules), "one break per module, or one could hide another"
    for module, line, _broken in UPWARD_IMPORTS:
        path = tree_copy / module
        path.write_text(path.read_text() + "\n\n" + line + "\n")
    result = lint_imports(tree_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    sections = _broken_sections(result.stdout)
    for module, _line, broken in UPWARD_IMPORTS:
        assert broken in sections, f"{module}: no '{broken}' in\n{result.stdout}"
        assert f"{_importer(module)} -> " in sections[broken], f"{module} not named under '{broken}'"


def _broken_sections(report: str) -> dict[str, str]:
    """lint-imports' report of broken contracts: each 'X is not allowed to import Y' line with the
    import chains listed under it."""
    sections: dict[str, str] = {}
    current = None
    for line in report.splitlines():
        if line.endswith(":") and " is not allowed to import " in line:
            current = line.removesuffix(":")
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _package_graph():
    spec = importlib.util.spec_from_file_location("package_graph", ROOT / "scripts" / "package_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_graph_has_no_cycle_and_the_docs_show_it():
    graph = _package_graph()
    text = graph.render(graph.package_edges())
    assert text.endswith("no cycle"), text
    assert text in (ROOT / "docs" / "architecture.md").read_text(), (
        "docs/architecture.md does not show the current package graph; paste the output of "
        "scripts/package_graph.py:\n" + text
    )


def test_the_cycle_finder_finds_cycles():
    find_cycle = _package_graph().find_cycle
    assert find_cycle({"mailhub": {"relay": 1}, "relay": {"storage": 2}, "storage": {}}) is None
    assert find_cycle({"mailhub": {"relay": 1}, "relay": {"mailhub": 1}}) == ["mailhub", "relay", "mailhub"]
    assert find_cycle({"relay": {"directory": 1}, "directory": {"storage": 1}, "storage": {"relay": 1}}) == [
        "relay",
        "directory",
        "storage",
        "relay",
    ]


# SQL statements in string literals (an IMAP "SELECT" command or the word "update" in prose is not one)
_SQL = re.compile(
    r"\b(SELECT\b.*\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"BEGIN(\s+IMMEDIATE)?$|COMMIT$|ROLLBACK$|CREATE\s+TABLE)\b",
    re.S,
)
_EXECUTE = {"execute", "executemany", "executescript", "execute_fetchall", "execute_insert"}


def _sql_outside_storage(package_dir: Path) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(package_dir.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.search(node.value.strip()):
                found.append(f"{where}: SQL text {node.value.strip()[:60]!r}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _EXECUTE:
                found.append(f"{where}: .{node.func.attr}(...)")
    return found


@pytest.mark.parametrize("package", ["mailhub", "relay", "directory", "quotas"])
def test_no_sql_outside_storage(package):
    assert _sql_outside_storage(ROOT / package) == []


def test_the_sql_check_finds_sql(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text('def f(conn):\n    return conn.execute("SELECT 1 FROM sites").fetchone()\n')
    (package / "b.py").write_text(
        'SQL = "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)"\nREPLY = "OK [READ-WRITE] SELECT completed"\n'
    )
    assert [line.split(": ", 1)[1][:12] for line in _sql_outside_storage(package)] == [
        ".execute(...",
        "SQL text 'SE",
        "SQL text 'IN",
    ]

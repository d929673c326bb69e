# Tests of the operator tools' layout: loadtest/ (an installed product, mailhub-loadtest) imports
# nothing from bench/ (benchmark scripts run from a checkout), every bench module starts with a
# header comment saying what it is for, and every bench command answers --help with its real
# invocation (`python -m bench.NAME`) and a description.
import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_COMMANDS = [
    "ab_commit",
    "ab_download",
    "ab_ingest",
    "abuse",
    "balancer_loadtest",
    "bare_aiosmtpd",
    "cluster_loadtest",
    "hub_cpu",
    "imap_benchmark",
    "ingest_benchmark",
    "index_size",
    "mime_stream_benchmark",
    "pop3_benchmark",
    "pop3_fetch",
    "rebuild_benchmark",
    "relay_benchmark",
    "scrypt_gil",
    "smtp_blast",
    "trivial_sinks",
]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_loadtest_imports_nothing_from_bench():
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in _imported_modules(path) if name == "bench" or name.startswith("bench.")
        )
        for path in (REPO / "loadtest").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_bench_module_has_a_header_comment():
    missing = [
        path.name
        for path in sorted((REPO / "bench").glob("*.py"))
        if path.name != "__init__.py" and not path.read_text().startswith("#")
    ]
    assert missing == []
    listed = {path.stem for path in (REPO / "bench").glob("*.py")} - {
        "__init__",
        "common",
        "abuse_attacks",
        "abuse_gateway",
        "abuse_inputs",
        "sustained",  # the --sustained mode of ingest_benchmark
    }
    assert listed == set(BENCH_COMMANDS), "a bench command was added or removed: update BENCH_COMMANDS"


# Runs `python -m bench.NAME --help` for every command in one child process (imports shared), and
# prints {name: [exit status, stdout, stderr]} as JSON.
_HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for name in sys.argv[1:]:
    sys.argv[:] = [name, "--help"]
    stdout, stderr, status = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_module("bench." + name, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            status = exc.code
    out[name] = [status, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


def test_every_bench_command_answers_help():
    result = subprocess.run(
        [sys.executable, "-c", _HELP_ALL, *BENCH_COMMANDS], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    helps = json.loads(result.stdout)
    for name in BENCH_COMMANDS:
        status, stdout, stderr = helps[name]
        assert status in (0, None) and "Traceback" not in stderr, (name, stderr)
        usage, _, rest = stdout.partition("\n\n")
        assert usage.startswith(f"usage: python -m bench.{name} "), (name, stdout)
        description = rest.split("\n\n")[0]
        assert len(description.split()) >= 5 and not description.startswith(("options:", "positional")), stdout


def test_sustained_sessions_option_replaces_the_workloads_count_and_label():
    from bench.ingest_benchmark import WORKLOADS
    from bench.sustained import with_sessions

    for workload in WORKLOADS:
        changed = with_sessions(workload, 16)
        assert changed[3] == 16 and changed[1].endswith(", 16 sessions"), changed
        assert changed[1].count("sessions") == 1, changed  # the workload's own count is gone
        assert changed[:1] + changed[2:3] + changed[4:] == workload[:1] + workload[2:3] + workload[4:]

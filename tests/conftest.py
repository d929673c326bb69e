# Shared fixtures: a real hub on loopback (port 0) in a temporary data folder, run in this process
# (mailhub.hub.Hub on a thread of its own) or as a `mailhub serve` process, plus helpers to add
# sites, read the index and wait for a condition. Every hub started here is stopped at teardown.
import asyncio
import base64
import contextlib
import functools
import hashlib
import inspect
import io
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest
import uvloop

from mailhub import config
from mailhub.hub import Hub as HubObject
from mailhub.logsetup import formatter

from seaweedutil import seaweedfs  # noqa: F401  (the session's SeaweedFS: tests/test_s3_*.py)

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pass-long"  # `site add` wants 12 characters at least
_LISTEN_RE = re.compile(r"(\w+) listening on ([\d.:a-f]+):(\d+)")


# The folder a pytest-xdist controller makes for what all of its workers share: the bytecode cache
# of their children (pycache/), the session's hub key and site data templates (see _made_once).
_SHARED = "PYTEST_MAILHUB_SHARED"


def pytest_configure(config):
    """The child Pythons (hub, CLI, tools) compile this checkout's modules once per session into a
    throw-away bytecode cache instead of at every start, even where the environment says
    PYTHONDONTWRITEBYTECODE. Under pytest-xdist the controller makes one cache for the children of
    all of its workers (each compiled the hub, its dependencies and the tools into a cache of its
    own: about 3 s of CPU per worker) and runs no test itself; the workers do not use it for their
    own imports (started with PYTHONPYCACHEPREFIX, each would compile all of pytest again)."""
    xdist_worker = hasattr(config, "workerinput")
    if not xdist_worker and config.getoption("dist", "no") != "no":  # the controller
        config._mailhub_shared = tempfile.mkdtemp(prefix="mailhub-test-shared-")
        os.environ[_SHARED] = config._mailhub_shared
        _compile_for_the_workers()
        return
    if "PYTHONPYCACHEPREFIX" in os.environ:
        return
    shared = os.environ.get(_SHARED) if xdist_worker else None
    if shared is not None:
        pycache = os.path.join(shared, "pycache")  # written atomically: the workers share it
    else:
        pycache = config._mailhub_pycache = tempfile.mkdtemp(prefix="mailhub-test-pycache-")
    os.environ["PYTHONPYCACHEPREFIX"] = pycache
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


# The checkout's packages: what the test modules and the `mailhub` children import.
_PACKAGES = ("mailhub", "relay", "storage", "directory", "quotas", "loadtest", "bench")


def _compile_for_the_workers() -> None:
    """Every pytest-xdist worker imports the whole suite to collect it, and where the environment
    says PYTHONDONTWRITEBYTECODE each compiled the checkout's modules and rewrote (pytest's
    assertions) every test module again: ~5 s of CPU per worker. The controller, which runs no
    test, compiles them once into their __pycache__ folders (ignored by git) before the workers
    start, which then read them."""
    import compileall
    import importlib

    tests = Path(__file__).parent
    for folder in (*(REPO / package for package in _PACKAGES), tests):
        compileall.compile_dir(folder, maxlevels=0 if folder == tests else 10, quiet=2)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        for path in sorted(tests.glob("test_*.py")):  # pytest's import hook rewrites and caches them
            try:
                importlib.import_module(path.stem)
            except KeyboardInterrupt:
                raise
            except BaseException:  # also pytest.skip at import: the workers' collection reports it
                pass
    finally:
        sys.dont_write_bytecode = dont_write


def _made_once(name: str, make, private: Path | None = None) -> tuple[Path, bool]:
    """A folder filled by make(folder) once for the session: under pytest-xdist once for all the
    workers (the first to finish renames its folder into the shared one, a later one throws its
    own away), else a new folder in `private` (or the system's temporary folder). Returns it and
    whether it is the shared one."""
    shared = os.environ.get(_SHARED)
    target = Path(shared) / name if shared else None
    if target is not None and target.exists():
        return target, True
    folder = Path(tempfile.mkdtemp(prefix=f"mailhub-test-{name}-", dir=shared or private))
    make(folder)
    if target is None:
        return folder, False
    try:
        folder.rename(target)  # atomic: the others see the whole folder or none
    except OSError:  # another worker was first
        shutil.rmtree(folder, ignore_errors=True)
    return target, True


# The test files that take longest (9 s or more of wall time each on 2 cores, summed per file over
# its tests in a run of the whole suite), longest first. They are collected first, and
# scripts/test.sh passes --no-loadscope-reorder so that pytest-xdist (--dist loadfile) hands whole
# files to its workers in collection order: by default it hands out the files with the most tests
# first, which left the 2.5-minute Ansible scenario (6 tests) to start halfway through the run and
# be its tail while the other workers idled. Otherwise the order is pytest-randomly's shuffle
# (files, and tests within each file).
SLOWEST_FILES = (
    "test_ansible.py",
    "test_smtp_fuzz.py",
    "test_pop3_server.py",
    "test_relay_outbound.py",
    "test_loadtest.py",
    "test_fuzz_protocols.py",
    "test_abuse_bench.py",
    "test_quotas_smtp.py",
    "test_ansible_role.py",
    "test_pop3_interop.py",
    "test_config_cli.py",
    "test_hub_key.py",
    "test_hostile_smtp.py",
    "test_directory.py",
    "test_smtp_ingest.py",
    "test_imap_interop.py",
    "test_throttle_e2e.py",
    "test_hostile_connections.py",
    "test_imap_server.py",
    "test_storage_faults.py",
    "test_swaks.py",
    "test_lifecycle.py",
    "test_rebuild_backup.py",
    "test_s3_client.py",
    "test_directory_updates.py",
    "test_s3_blobs.py",
    "test_crash.py",
    "test_cluster_hub.py",
    "test_hostile_auth.py",
    "test_encryption_policy.py",
    "test_cluster_quotas.py",
    "test_memory.py",
    "test_hostile_imap.py",
    "test_mailbox_admin.py",
    "test_shared_blobs.py",
    "test_openpgp_packets.py",
    "test_pg_serving.py",
    "test_s3_backup.py",
    "test_cluster_link.py",
    "test_metrics.py",
    "test_bounded_reads.py",
    "test_shutdown.py",
)


def pytest_collection_modifyitems(config, items):
    """The files of SLOWEST_FILES first, in that order; the rest as collected (or shuffled). A test
    module that sets IN_FILE_ORDER = True (the steps of one scenario on a module fixture) keeps the
    order of its tests in the file."""
    rank = {name: n for n, name in enumerate(SLOWEST_FILES)}

    def in_file_order(item) -> bool:
        return getattr(getattr(item, "module", None), "IN_FILE_ORDER", False)

    def position(item) -> tuple:
        line = item.location[1] if in_file_order(item) else 0
        return rank.get(item.path.name, len(rank)), str(item.path) if in_file_order(item) else "", line

    items.sort(key=position)  # stable: keeps the shuffle of the files and of the other tests


def pytest_unconfigure(config):
    if _session_key and not _session_key[1]:
        shutil.rmtree(_session_key[0].parent, ignore_errors=True)
    pycache = getattr(config, "_mailhub_pycache", None)
    if pycache is not None:
        shutil.rmtree(pycache, ignore_errors=True)
        del os.environ["PYTHONPYCACHEPREFIX"]
    shared = getattr(config, "_mailhub_shared", None)
    if shared is not None:  # the controller, after its workers ended
        shutil.rmtree(shared, ignore_errors=True)
        del os.environ[_SHARED]


def writer_children(data_dir) -> list[int]:
    """The pids of the live index writer processes of a hub's data folder (the launcher,
    storage/launcher_child.py, names them `mailhub-writer`, and each holds its data folder open)."""
    folder = str(Path(data_dir).resolve())
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if folder in _writer_open_files(pid)]


def _writer_open_files(pid: int) -> list[str]:
    """What an index writer process has open; [] for another process, or one gone."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "mailhub-writer":
            return []
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return []
        return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, message="", raise_on_timeout: bool = True):
    """Call `condition` until it returns something true (returned) or `timeout` seconds pass: then
    an AssertionError naming `message` (a text, or a callable giving one then, e.g. the log's tail)
    or the condition; with raise_on_timeout=False the last (false) result is returned instead, for
    a caller that asserts on it itself. The one way tests poll (async tests: `until` below)."""
    deadline = time.monotonic() + timeout
    while not _poll_ends(result := condition(), deadline, timeout, message, condition, raise_on_timeout):
        time.sleep(interval)
    return result


async def until(condition, timeout: float = 10.0, interval: float = 0.02, message="", raise_on_timeout: bool = True):
    """wait_for's twin for async tests: `condition` may be a plain callable or return an awaitable
    (an async function); the event loop keeps running between the checks."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if _poll_ends(result, deadline, timeout, message, condition, raise_on_timeout):
            return result
        await asyncio.sleep(interval)


def _poll_ends(result, deadline: float, timeout: float, message, condition, raise_on_timeout: bool) -> bool:
    """wait_for's and until's rule: stop at a true result, or at the deadline (raising unless
    raise_on_timeout is False)."""
    if result:
        return True
    if time.monotonic() < deadline:
        return False
    if raise_on_timeout:
        text = message() if callable(message) else message
        raise AssertionError(f"not true after {timeout}s: {text or condition}")
    return True


def _fresh_metrics() -> None:
    """Every metric of mailhub/metrics.py back at zero, as in a new hub process: tests read exact
    counts, and the registry is one per process."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from mailhub.metrics import REGISTRY

    registries = [REGISTRY]
    while registries:  # the hub's registry holds those of the layers (relay, storage, directory)
        for collector in list(registries.pop()._collector_to_names):
            if isinstance(collector, CollectorRegistry):
                registries.append(collector)
            elif isinstance(collector, MetricWrapperBase):
                if collector._labelnames:
                    collector.clear()
                else:
                    collector._metric_init()
    import relay.metrics  # its cache of labelled children would keep counting into the cleared ones

    relay.metrics._children.clear()


_session_key: list = []  # the key file, and whether it is the one the xdist workers share


def session_signing_key() -> Path:
    """One hub signing key (RSA-3072, seconds to make) for the session (all its xdist workers),
    made as a hub's first start makes it for the default domain and directory address; copied into
    each hub's new data folder instead of a key made per hub (see Hub.own_key)."""
    if not _session_key:
        from directory.hub_key import KEY_FILE, load_or_create_hub_keys

        folder, shared = _made_once(
            "hub-key", lambda folder: load_or_create_hub_keys(folder, ["directory@hub.test"], 30 * 86400)
        )
        _session_key.extend([folder / KEY_FILE, shared])
    return _session_key[0]


# Environment variables that make no difference between `python -m mailhub.cli` and a call of
# mailhub.cli.main in this process (which has this checkout on its path and its own bytecode cache).
# PYTEST_CURRENT_TEST: a hub made in a fixture's setup copied it with "(setup)", the test has "(call)".
_CLI_SAME_IN_PROCESS = ("PYTHONPATH", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "PYTEST_CURRENT_TEST")


def cli_in_process_is_the_same(args: tuple, env: dict) -> bool:
    """Whether a `mailhub` command can run in this process with the outcome of a child process: not
    `serve`, no fault injection (armed at import), and no variable other than MAILHUB_* settings
    differing from this process's environment (a fake clock, a locale...)."""
    if not args or args[0] == "serve" or Path.cwd() != REPO:
        return False
    if any(name.startswith("MAILHUB_FAULT") for name in (*env, *os.environ)):
        return False
    names = (set(env) | set(os.environ)) - set(_CLI_SAME_IN_PROCESS)
    return all(name.startswith("MAILHUB_") or env.get(name) == os.environ.get(name) for name in names)


class _ToStderr(logging.Handler):
    """What logging's last resort does in a `mailhub` process that sets no logging up: records of
    level WARNING and above, as their bare message, on stderr; here only those of one thread."""

    def __init__(self, stream, thread: int):
        super().__init__(logging.WARNING)
        self.stream, self.thread = stream, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.stream.write(self.format(record) + "\n")


def _universal_newlines(data: bytes) -> str:
    """Bytes a child wrote, read as subprocess.run(text=True) reads them."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


def run_cli_in_process(args: tuple, stdin: str | None, env: dict) -> subprocess.CompletedProcess:
    """mailhub.cli.main(ARGS) in this thread, as `python -m mailhub.cli ARGS` with `env` would run:
    its MAILHUB_* settings in os.environ for the call, stdin from `stdin` (empty if None), stdout
    (with .buffer) and stderr captured, a warning logged shown on stderr and not in any hub's log,
    an exception's traceback on stderr with exit status 1. Saves the start of a Python (~0.3-0.5 s)."""
    from mailhub import cli

    saved = {name: os.environ.get(name) for name in (set(env) | set(os.environ)) if name.startswith("MAILHUB_")}
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    thread = threading.get_ident()
    to_stderr = _ToStderr(stderr, thread)
    with _HubLog.lock_all:
        _HubLog.cli_threads.add(thread)
    logging.getLogger().addHandler(to_stderr)
    real_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8")
    try:
        for name in saved:
            if name in env:
                os.environ[name] = env[name]
            else:
                del os.environ[name]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(list(args)) or 0
            except SystemExit as exc:  # argparse's usage errors; as the interpreter exits with it
                code = exc.code or 0
                if not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.stdin = real_stdin
        logging.getLogger().removeHandler(to_stderr)
        with _HubLog.lock_all:
            _HubLog.cli_threads.discard(thread)
    return subprocess.CompletedProcess(
        ["mailhub", *args], code, _universal_newlines(out.getvalue()), _universal_newlines(err.getvalue())
    )


def _tasks_of(loop: asyncio.AbstractEventLoop) -> str:
    """Where each task of a hub's event loop waits (what a hub that does not stop is waiting for):
    the chain of coroutines each task awaits, outermost first."""
    lines = []
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError as exc:
        return f"(tasks not readable: {exc})"
    for task in tasks:
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 20:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is None:
                chain.append(type(coro).__name__)
                break
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"{task.get_name()}: " + " -> ".join(chain))
    return "\n".join(lines)


class _HubLog(logging.Handler):
    """Writes the records of one in-process hub into its log file: those logged on its event loop
    thread, and those of other threads (workers, watchdog) that belong to no other running hub."""

    loop_threads: set[int] = set()  # the event loop threads of all in-process hubs running now
    cli_threads: set[int] = set()  # threads running a `mailhub` command in process (run_cli_in_process)
    saved_levels: dict[str, int] = {}
    lock_all = threading.Lock()

    def __init__(self, path: Path, fmt: str, loop_thread: int):
        super().__init__()
        self.stream = open(path, "a", encoding="utf-8")
        self.setFormatter(formatter(fmt))
        self.loop_thread = loop_thread

    def attach(self, level: str) -> None:
        """Log the hub's records at `level` (log.level) into its file, as setup_logging would."""
        with self.lock_all:
            if not self.loop_threads:  # the first hub running: the levels to restore after the last
                _fresh_metrics()
                self.saved_levels = {name: logging.getLogger(name).level for name in ("mailhub", "mail.log")}
            self.loop_threads.add(self.loop_thread)
            logging.getLogger().addHandler(self)
            logging.getLogger("mailhub").setLevel(level.upper())
            logging.getLogger("mail.log").setLevel(logging.ERROR)

    def detach(self) -> None:
        with self.lock_all:
            logging.getLogger().removeHandler(self)
            self.loop_threads.discard(self.loop_thread)
            if not self.loop_threads:  # the last hub stopped: the other tests see the levels as before
                for name, level in self.saved_levels.items():
                    logging.getLogger(name).setLevel(level)
        self.close()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread in self.cli_threads or (
            record.thread != self.loop_thread and record.thread in self.loop_threads
        ):
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.stream.close()
        super().close()


class Hub:
    """A hub and its data folder: by default a `mailhub.hub.Hub` run in this process, on an event
    loop thread of its own (start() returns once it listens); with `process=True` (crash, signal
    and kill -9 tests, or fault injection through MAILHUB_FAULT) a `mailhub serve` subprocess.
    Both write the hub's log to `log_path` and fill `ports` with the bound ports."""

    def __init__(self, data_dir: Path, env: dict, config: Path | None = None, process: bool = False):
        self.data_dir = data_dir
        self.env = env
        self.config = config
        self.process = process or any(k.startswith("MAILHUB_FAULT") for k in env)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = data_dir.parent / f"{data_dir.name}-hub.log"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hub = None
        self.hub_kwargs: dict = {}  # more arguments of mailhub.hub.Hub in process (cluster_url)
        # The session's hub key is copied in at the start when the folder has none yet; a hub of
        # another domain or directory address (or with own_key) makes its own at its first start.
        self.own_key = (
            env.get("MAILHUB_DOMAIN") != "hub.test" or env.get("MAILHUB_DIRECTORY_ADDRESS", "directory") != "directory"
        )

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`mailhub ARGS` with the hub's environment: in this process where that is the same (see
        run_cli_in_process), else as `python -m mailhub.cli`; a CompletedProcess either way."""
        if cli_in_process_is_the_same(args, self.env):
            result = run_cli_in_process(args, stdin, self.env)
        else:
            cmd = [sys.executable, "-m", "mailhub.cli", *args]
            result = subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=60
            )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed: {result.stderr}")
        return result

    def add_site(self, name: str, *addresses: str, password: str = PASSWORD) -> None:
        args = ["site", "add", name, "--password-stdin"]
        for address in addresses or (f"{name}@hub.test",):
            args += ["--address", address]
        self.cli(*args, stdin=password + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None or self._thread is not None

    def sites_reloaded(self, timeout: float = 30.0) -> None:
        """Wait until the running hub's site cache holds the sites as the index has them now, after
        `mailhub site ...` changed them: its watcher rereads every 0.5 s, on a loaded machine later
        (a fixed wait of 0.6 s fell short). In-process hubs only (the cache is read in place)."""
        assert self._hub is not None and self._hub._sites is not None, "an in-process hub, running"
        ((value,),) = self.query("SELECT value FROM meta WHERE key = 'sites_version'")
        cache = self._hub._sites
        wait_for(lambda: cache.version >= int(value), timeout, message=f"the hub's sites reach version {value}")

    def start(self, wait: float = 60.0) -> "Hub":
        assert not self.running, "this hub runs already"
        if not self.own_key:
            key = session_signing_key()
            if not (self.data_dir / key.name).exists():
                self.data_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(key, self.data_dir / key.name)
        if self.process:
            return self._start_process(wait)
        return self._start_in_process(wait)

    def _start_process(self, wait: float) -> "Hub":
        self.log = open(self.log_path, "a+")
        mark = self.log.tell()
        cmd = [sys.executable, "-m", "mailhub.cli", "serve"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> str | None:
            text = self.log_path.read_text()[mark:]
            if "hub ready" in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}:\n{text[-3000:]}")
            return None

        text = wait_for(
            ready,
            timeout=wait,
            interval=0.05,
            message=lambda: "'hub ready' in the log\n" + self.log_path.read_text()[-3000:],
        )
        self.ports = {name: int(port) for name, _, port in _LISTEN_RE.findall(text)}
        return self

    def _start_in_process(self, wait: float) -> "Hub":
        cfg = config.load(self.config, environ=self.env)
        ready = threading.Event()
        outcome: dict = {}

        async def run() -> None:
            hub = HubObject(cfg, environ=self.env, **self.hub_kwargs)
            self._loop = asyncio.get_running_loop()
            try:
                await hub.start()
            except BaseException as exc:
                outcome["error"] = exc
                ready.set()
                return
            self._hub = hub
            ready.set()
            try:
                await hub.stopped()
            finally:
                await hub.stop()

        def thread_main() -> None:
            handler = _HubLog(self.log_path, cfg.log.format, threading.get_ident())
            handler.attach(cfg.log.level)
            try:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runner.run(run())
            except BaseException as exc:
                outcome.setdefault("error", exc)
                ready.set()
            finally:
                handler.detach()

        self._thread = threading.Thread(target=thread_main, name=f"hub-{self.data_dir.name}", daemon=True)
        self._thread.start()
        if not ready.wait(wait):
            raise AssertionError("hub did not start:\n" + self.log_text()[-3000:])
        if "error" in outcome:
            self._thread.join(30)
            self._thread = None
            raise AssertionError(f"hub did not start: {outcome['error']!r}\n{self.log_text()[-3000:]}")
        self.ports = dict(self._hub.ports)
        return self

    @property
    def pid(self) -> int:
        """The process the hub runs in."""
        return self.proc.pid if self.proc is not None else os.getpid()

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the hub (gracefully, or for a subprocess with `sig`); its exit status (0 for an
        in-process hub that shut down cleanly), None if it was not running."""
        if self._thread is not None:
            return self._stop_in_process(timeout)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self.log.close()
        return code

    def _stop_in_process(self, timeout: float) -> int:
        thread, hub, loop = self._thread, self._hub, self._loop
        self._thread = self._hub = self._loop = None
        if hub is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(hub.request_stop)
            except RuntimeError:  # the loop ended already
                pass
        thread.join(timeout)
        if thread.is_alive():
            where = _tasks_of(loop) if loop is not None else "(no loop)"
            raise AssertionError(
                f"in-process hub did not stop within {timeout}s:\n{self.log_text()[-3000:]}\nits thread is at:\n{where}"
            )
        return 0

    def kill(self, writer_too: bool = False) -> None:
        """kill -9 of the hub process, returning once its index writer child is gone too (it dies
        with the hub, but a moment later: one that saw its socket close first closed SQLite, which
        checkpointed the WAL into the index while the test was looking at what the kill left).
        writer_too: the writer is stopped (SIGSTOP) first, so that it dies without closing
        anything, as when both die at once: its commits stay in the WAL only."""
        assert self.process, "kill -9 needs a hub process: make_hub(..., process=True)"
        if writer_too:
            for pid in writer_children(self.data_dir):
                os.kill(pid, signal.SIGSTOP)  # its parent's death signal (SIGKILL) still ends it
        self.stop(signal.SIGKILL)
        wait_for(lambda: not writer_children(self.data_dir), 10, message="the index writer ended with the hub")

    def in_process_from_now_on(self) -> "Hub":
        """After the part of a test that is about the process (its kill -9, its SIGTERM, a fault of
        its own that fired and is spent): the next starts run the hub in this process, on the same
        data folder and log, with the same settings less MAILHUB_FAULT*; start-up recovery is the
        same code, without the ~1 s of CPU a `mailhub serve` costs."""
        assert not self.running, "stop the hub process first"
        self.env = {name: value for name, value in self.env.items() if not name.startswith("MAILHUB_FAULT")}
        self.process = False
        return self

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    @property
    def index_url(self) -> str:
        """storage.index of this hub: "" (SQLite in its data folder) or its PostgreSQL database's URL."""
        return self.env.get("MAILHUB_STORAGE_INDEX", "")

    def db(self) -> sqlite3.Connection:
        """A connection to the hub's index: SQLite's file, or on PostgreSQL a PgConnection (autocommit;
        execute/fetchone/fetchall/commit/close as sqlite3's)."""
        if self.index_url:
            from storage.postgres.connection import PgConnection

            return PgConnection.connect(self.index_url)  # type: ignore[return-value]
        return sqlite3.connect(self.data_dir / "index.sqlite3")

    def query(self, sql: str, *params):
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def blob_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "blobs").rglob("*") if p.is_file())

    def stored(self, queue_id: str) -> bytes:
        """The stored bytes of a message: its range of its blob file (a file of its own or a pack)."""
        return stored_message(self.data_dir, queue_id, self.index_url)


def stored_message(data_dir: Path, queue_id: str, index_url: str = "") -> bytes:
    if index_url:
        from storage.postgres.connection import PgConnection

        conn = PgConnection.connect(index_url)
    else:
        conn = sqlite3.connect(Path(data_dir) / "index.sqlite3")
    try:
        ((blob, offset, size),) = conn.execute(
            "SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", (queue_id,)
        ).fetchall()
    finally:
        conn.close()
    with open(Path(data_dir) / "blobs" / blob, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def hub_env(data_dir: Path, **overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")}
    env.update(
        {
            "MAILHUB_DATA_DIR": str(data_dir),
            "MAILHUB_DOMAIN": "hub.test",
            "MAILHUB_SMTP_LISTEN": "127.0.0.1:0",
            "MAILHUB_POP3_LISTEN": "127.0.0.1:0",
            "MAILHUB_IMAP_LISTEN": "127.0.0.1:0",
            "MAILHUB_METRICS_LISTEN": "127.0.0.1:0",
            "MAILHUB_SHUTDOWN_TIMEOUT": "10",
            # Directory update mails would add a mail to every mailbox whenever a test adds a site;
            # the directory tests turn them on.
            "MAILHUB_DIRECTORY_NOTIFY_ON_CHANGE": "false",
            # Likewise quota warnings would add a notice to a mailbox that a quota test fills; the
            # lifecycle tests turn them on.
            "MAILHUB_LIFECYCLE_QUOTA_WARNING_LEVELS": "",
            # Freed bytes in packs are released at once, so that tests can see it (test_storage_packs
            # checks the delay).
            "MAILHUB_STORAGE_RELEASE_FREED_AFTER": "0",
            # A small full-disk reserve: hundreds of test hubs need not set 64 MB aside each.
            "MAILHUB_STORAGE_RESERVE_BYTES": "256K",
            # A failed login holds its reply back 0.05 s, doubling with each further failure (the
            # default 0.5 s made the tests that log in wrongly wait seconds); the tests of the
            # pacing itself set their own (test_hostile_auth, test_pop3_server, test_smtp_ingest).
            "MAILHUB_AUTH_FAILURE_DELAY": "0.05",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(overrides)
    return env


# Sites as `make_hub(sites=...)` takes them: (name, address, ...) each, with the password PASSWORD.
ALPHA = (("alpha", "alpha@hub.test"),)
BETA = (("beta", "beta@hub.test"),)
ALPHA_BETA = ALPHA + BETA
ALPHA_BETA_B2 = (("alpha", "alpha@hub.test"), ("beta", "beta@hub.test", "b2@hub.test"))


@pytest.fixture(scope="session")
def site_data_templates(tmp_path_factory) -> dict:
    """Data folders holding only sites added with `mailhub site add`, one per list of sites, made
    once per session (for all xdist workers: _made_once) and copied into each hub made with that
    list: a CLI run costs most of a second, and most hubs of the suite start with the same few sites."""
    return {"folder": tmp_path_factory.mktemp("site-data"), "made": {}}


# `site add` reads only these settings; a template made without them is what it would have made.
_SITE_ADD_SETTINGS = ("MAILHUB_DATA_DIR", "MAILHUB_DOMAIN", "MAILHUB_DIRECTORY_ADDRESS")


@pytest.fixture(scope="session")
def self_signed_certificate(tmp_path_factory) -> tuple[str, str]:
    """A throw-away self-signed certificate for localhost, made once per session: (cert, key) paths."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="session")
def hub_signing_key() -> Path:
    return session_signing_key()


def pytest_generate_tests(metafunc):
    """A module marked both_engines (pytestmark = pytest.mark.both_engines) runs each test that
    starts a hub (through make_hub or hub: the `engine` fixture) twice: on SQLite, and on PostgreSQL
    (marked postgresql). A test of such a module marked one_engine(reason) runs on SQLite only: one
    about the SQLite file itself, or about the process (signals, kill -9) rather than the storage."""
    definition = metafunc.definition
    if (
        "engine" in metafunc.fixturenames
        and definition.get_closest_marker("both_engines")
        and not definition.get_closest_marker("one_engine")
    ):
        metafunc.parametrize(
            "engine", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
        )


@pytest.fixture
def engine(request) -> str:
    """The index engine of the test's hubs: "sqlite" unless the module is marked both_engines."""
    return getattr(request, "param", "sqlite")


def _postgres_index_for(request, first: bool) -> str:
    """The URL of an empty index database on the session's PostgreSQL server: the first hub of a
    test gets the session's pg_index database emptied (50 ms), any other a new copy of the
    session's pg_schema_template."""
    url, reset = request.getfixturevalue("pg_index")
    if first:
        reset()
        return url
    server = request.getfixturevalue("postgres_server")
    return server.url(server.create_database(template=request.getfixturevalue("pg_schema_template")))


# The tables a data folder template made with the CLI (`site add`, `site key import`, `site set`)
# may hold rows in: copied as they are into a PostgreSQL index.
_TEMPLATE_TABLES = ("sites", "addresses", "site_keys", "site_limits", "site_policy", "site_retention", "site_contact")


def _copy_sites_to_postgres(template_dir: Path, url: str) -> None:
    """The sites (their addresses, keys and settings) of a data folder template's SQLite index,
    copied into the PostgreSQL index at `url` as they are (password hashes, ids, UIDVALIDITY): a
    `site add` costs a scrypt hash and most of a second of CLI per site. A database made for a
    test's second hub gets its schema first."""
    import psycopg

    from storage.postgres import migrate_schema
    from storage.postgres.connection import PgConnection

    with psycopg.connect(url, autocommit=True) as conn:
        migrate_schema(conn)
    source = sqlite3.connect(template_dir / "index.sqlite3")
    target = PgConnection.connect(url)
    try:
        target.execute("BEGIN")
        for table in _TEMPLATE_TABLES:
            cursor = source.execute(f"SELECT * FROM {table}")
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
            if not rows:
                continue
            target.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows
            )
            if "id" in columns:
                target.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        target.execute("COMMIT")
    finally:
        source.close()
        target.close()


def copy_data_folder(template: Path, hub: Hub) -> None:
    """A data folder made with the CLI (sites, keys, settings) copied in as `hub`'s; on PostgreSQL
    (a module marked both_engines) without its SQLite index, whose rows go to the hub's index.
    SQLite's side files (-wal, -shm) are never copied: the template's index has everything in its
    main file (_settle_template_index), and a reader in another worker (_copy_sites_to_postgres)
    makes and deletes them, once between a copy listing them and copying them."""
    if hub.index_url:
        shutil.copytree(template, hub.data_dir, ignore=shutil.ignore_patterns("index.sqlite3*"))
        _copy_sites_to_postgres(template, hub.index_url)
    else:
        shutil.copytree(template, hub.data_dir, ignore=shutil.ignore_patterns("index.sqlite3-*"))


def _settle_template_index(data_dir: Path) -> None:
    """A template's index with everything in its main file (its write-ahead log checkpointed), so
    that a copy of the main file alone is the whole index."""
    conn = sqlite3.connect(data_dir / "index.sqlite3")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the template's index is still open elsewhere"
    finally:
        conn.close()


# scrypt's cost in the password hashes of the sites that make_hub(sites=...) copies in: a login checks
# the hash with the cost the hash names (storage/passwords.py), 2**14 (the hub's, 45 ms of CPU) cost
# a tenth to a fifth of a hub test file's CPU, as each new hub checks each site's password once;
# 2**10 takes 3 ms. `mailhub site add`, `site passwd` and the tests about them keep the hub's own
# cost. A login with an unknown name is checked at the cost most sites' hashes have
# (storage/site_cache.py), so with these sites at 2**10 too.
TEMPLATE_SCRYPT_N = 2**10


def _cheaper_password_hashes(data_dir: Path) -> None:
    """The password hashes of a site data template (password PASSWORD) made again at TEMPLATE_SCRYPT_N."""
    from storage.passwords import hash_password

    conn = sqlite3.connect(data_dir / "index.sqlite3")
    try:
        with conn:
            for (name,) in conn.execute("SELECT name FROM sites").fetchall():
                conn.execute(
                    "UPDATE sites SET password_hash = ? WHERE name = ?",
                    (hash_password(PASSWORD, TEMPLATE_SCRYPT_N), name),
                )
    finally:
        conn.close()


@pytest.fixture
def cheaper_site_passwords(monkeypatch):
    """Sites added in this process (storage.sites.add_site) get password hashes at TEMPLATE_SCRYPT_N:
    for tests that add many sites for their data, not for their passwords (a hash at the hub's cost
    takes 45 ms of CPU, and a hub checks it again at each site's first login)."""
    from storage import passwords, sites

    monkeypatch.setattr(sites, "hash_password", functools.partial(passwords.hash_password, n=TEMPLATE_SCRYPT_N))


@pytest.fixture
def make_hub(tmp_path, site_data_templates, engine, request):
    hubs = []

    def factory(sites: tuple = (), process: bool = False, own_key: bool = False, **overrides: str) -> Hub:
        """A hub (not started) in a new data folder; with `sites`, the folder already holds them,
        as `hub.add_site(*site)` for each one would have left it. The folder holds the session's
        hub signing key unless `own_key` (the hub then makes one at its first start). `process`:
        run it as a `mailhub serve` subprocess (for signals, kill -9 and crashes). On the engine
        postgresql (a module marked both_engines) its index is a PostgreSQL database of its own."""
        data_dir = tmp_path / f"data{len(hubs)}"
        if engine == "postgresql" and "MAILHUB_STORAGE_INDEX" not in overrides:
            overrides["MAILHUB_STORAGE_INDEX"] = _postgres_index_for(request, first=not hubs)
        hub = Hub(data_dir, hub_env(data_dir, **overrides), process=process)
        hubs.append(hub)
        if sites:
            assert not set(overrides) & set(_SITE_ADD_SETTINGS), "add these sites with hub.add_site"
            made = site_data_templates["made"]
            if sites not in made:

                def add_sites(folder: Path) -> None:
                    template = Hub(folder / "data", hub_env(folder / "data"))
                    for name, *addresses in sites:
                        template.add_site(name, *addresses)
                    _cheaper_password_hashes(folder / "data")
                    _settle_template_index(folder / "data")

                name = "sites-" + hashlib.sha256(repr(sites).encode()).hexdigest()[:16]
                made[sites] = _made_once(name, add_sites, site_data_templates["folder"])[0] / "data"
            copy_data_folder(made[sites], hub)
        hub.own_key = hub.own_key or own_key
        return hub

    yield factory
    for hub in hubs:
        hub.stop(signal.SIGKILL if hub.process else signal.SIGTERM)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this test session (tests/pgutil.py: Debian's binaries, a temporary
    folder, 127.0.0.1 on a free port), started at first use, stopped and removed at the end."""
    from pgutil import PostgresServer

    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server) -> str:
    """The URL of a new, empty database of the session's PostgreSQL server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def pg_schema_template(postgres_server) -> str:
    """The name of a database of the session's server holding the index's schema (storage/postgres
    migrations) and nothing else, which nothing stays connected to: a database for a test's second
    hub is a copy of it (CREATE DATABASE ... TEMPLATE: about a quarter of a new database migrated)."""
    import psycopg

    from storage.postgres import migrate_schema

    name = postgres_server.create_database()
    with psycopg.connect(postgres_server.url(name), autocommit=True) as conn:
        migrate_schema(conn)
    return name


@pytest.fixture(scope="session")
def pg_index(postgres_server):
    """(URL, reset) of a database of the session's server with the index's schema (storage/postgres
    migrations); reset() empties it as new: every row deleted with the triggers off, the identities
    restarted, meta as migrated (about 50 ms, where a new database migrated takes 0.3-0.4 s)."""
    import psycopg

    from storage.postgres import migrate_schema

    url = postgres_server.url(postgres_server.create_database())
    with psycopg.connect(url, autocommit=True) as conn:
        migrate_schema(conn)
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        tables.remove("schema_migrations")
        sequences = [s for (s,) in conn.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")]
        meta = conn.execute("SELECT key, value FROM meta").fetchall()

    def reset():
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            for table in tables:
                conn.execute(f"DELETE FROM {table}".encode())
            for sequence in sequences:
                conn.execute(f"ALTER SEQUENCE {sequence} RESTART".encode())
            conn.cursor().executemany("INSERT INTO meta (key, value) VALUES (%s, %s)", meta)

    return url, reset


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    """An empty index with its schema, on each engine in turn: SQLite (storage.db.connect in a
    temporary folder) and PostgreSQL (the session's pg_index database emptied, wrapped in
    storage.postgres.connection.PgConnection). The same storage functions run on both."""
    from storage import db

    if request.param == "sqlite":
        conn = db.connect(tmp_path)
        yield conn
        conn.close()
        return
    from storage.postgres.connection import PgConnection

    url, reset = request.getfixturevalue("pg_index")
    reset()
    conn = PgConnection.connect(url)
    yield conn
    conn.close()


@pytest.fixture
def index_connect(index, request, tmp_path):
    """Opens another connection to the `index` fixture's index, on its engine (what a watcher's
    thread or the metrics collector opens for itself)."""
    from storage import db, sql

    if sql.dialect(index) == sql.POSTGRESQL:
        from storage.postgres.connection import PgConnection

        url = request.getfixturevalue("pg_index")[0]
        return lambda: PgConnection.connect(url)
    return lambda: db.connect(tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs for a data folder to fill up (needs root, as in CI)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def hub(make_hub) -> Hub:
    """A running hub with sites alpha (alpha@hub.test) and beta (beta@hub.test, b2@hub.test)."""
    return make_hub(sites=ALPHA_BETA_B2).start()


@pytest.fixture
def process_hub(make_hub) -> Hub:
    """The `hub` fixture's hub as a `mailhub serve` process (signals, kill -9, its memory)."""
    return make_hub(sites=ALPHA_BETA_B2, process=True).start()


def make_message(size: int = 2000, subject: str = "test", extra_headers: str = "") -> bytes:
    """A CRLF message of about `size` bytes, base64-like body lines as a DICOM gateway sends."""
    header = (
        f"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{os.urandom(8).hex()}@hub.test>\r\n{extra_headers}\r\n"
    ).encode()
    line = os.urandom(57).hex().encode()[:76] + b"\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return header + body


_QUEUED_RE = re.compile(rb"queued as (\S+)")


def queue_id_from(reply: bytes | str) -> str:
    """The queue ID of a `250 2.0.0 Ok: queued as QID` reply (AssertionError if it is not one)."""
    data = reply.encode() if isinstance(reply, str) else reply
    match = _QUEUED_RE.search(data)
    assert data.startswith(b"250") or data.startswith(b"2.0.0"), data
    assert match, data
    return match.group(1).decode()


class RawSMTP:
    """A minimal unbuffered SMTP client on a plain socket, for what smtplib cannot express
    (pipelining, BDAT, streaming from a generator, STARTTLS injection). Reads only whole replies
    and keeps unread bytes in `self.buf`, so nothing the server sent is silently dropped."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0, greet: bool = True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.banner = self.reply() if greet else b""

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed by the server; unread: {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "gateway.test") -> bytes:
        reply = self.command(f"EHLO {name}")
        assert reply.startswith(b"250"), reply
        return reply

    def auth_plain(self, login: str, password: str = PASSWORD) -> bytes:
        token = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
        return self.command(b"AUTH PLAIN " + token)

    def rest(self, timeout: float = 5.0) -> bytes:
        """Everything the server still sends until it closes the connection (or `timeout`)."""
        self.sock.settimeout(timeout)
        data, self.buf = self.buf, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data

    def close(self) -> None:
        self.sock.close()

# Starts index writer processes (storage/writer_child.py) by forking them from a launcher: one
# process per hub process, started at its first writer, that has imported the writer's code once.
# A new writer then costs a fork (a few ms) instead of a new interpreter importing `storage`
# (~0.1 s of CPU, and ~0.4 s more for PostgreSQL's driver), at every hub start and writer restart.
# The launcher is single-threaded (a fork from it is safe, unlike one from the hub's threads); its
# writers are its children, named `mailhub-writer` (`ps -e`; each holds its data folder open, so
# `ls -l /proc/PID/fd` names it). Lifetimes: the launcher ignores SIGINT and SIGTERM (a signal to the
# process group must leave the hub's graceful shutdown its writers) and ends when the hub closes
# its control socket or dies (kill -9 included); a writer dies with the launcher (its death signal).
# Control messages are datagrams of a SOCK_SEQPACKET pair: hub -> launcher, a pickle of (writer
# arguments, environment changes) with the writer's socket attached (SCM_RIGHTS); launcher -> hub,
# ("started", pid) or ("failed", 0, reason) per request in order, and ("ended", pid, exit status)
# whenever a writer ended.
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback

from . import faults, writer_child
from .errors import WriterDied

_PR_SET_NAME = 15
_MAX_MESSAGE = 1 << 20  # an environment of a few kB; far more is refused by the kernel's buffer
_REPLY_SECONDS = 60.0  # a fork takes ms; the first launch waits for the launcher's imports too
WRITER_NAME = b"mailhub-writer"
_COMMAND = "import sys; from storage.writer_launcher import main; main(sys.argv[1:])"  # what `ps` shows


class Launched:
    """A writer the launcher forked: its pid; `ended` gets its exit status (negative: the signal
    that ended it; None: the launcher ended first, having sent it its death signal)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.ended: concurrent.futures.Future[int | None] = concurrent.futures.Future()


class _Running:
    """One launcher process, as its hub sees it: started with the environment `env`. Its reader
    thread is the only one that changes `running` and sets `gone`; the Launcher closes `control`,
    under its lock."""

    def __init__(self, control: socket.socket, proc: subprocess.Popen[bytes], env: dict[str, str]):
        self.control = control
        self.proc = proc
        self.env = env
        # one per request sent, oldest first (one that timed out stays until its late reply)
        self.replies: collections.deque[concurrent.futures.Future[Launched]] = collections.deque()
        self.running: dict[int, Launched] = {}
        self.gone = threading.Event()
        threading.Thread(target=self._read, name="writer launcher", daemon=True).start()

    def _read(self) -> None:
        try:
            while message := self.control.recv(_MAX_MESSAGE):
                kind, pid, *status = pickle.loads(message)
                if kind == "started":
                    launched = self.running[pid] = Launched(pid)
                    self.replies.popleft().set_result(launched)
                elif kind == "failed":
                    failure = WriterDied(f"cannot start an index writer process: {status[0]}")
                    self.replies.popleft().set_exception(failure)
                else:
                    self.running.pop(pid, Launched(pid)).ended.set_result(status[0])
        except OSError:
            pass
        finally:  # whatever ended the loop: the launcher ended and reaped, every waiter answered
            with contextlib.suppress(OSError):
                self.control.shutdown(socket.SHUT_RDWR)  # (a send to it fails from now on)
            self.proc.wait()
            failure = WriterDied(f"index writer launcher ended (status {self.proc.returncode})")
            while self.replies:
                self.replies.popleft().set_exception(failure)
            for launched in self.running.values():
                launched.ended.set_result(None)
            self.running.clear()
            self.gone.set()


class Launcher:
    """The hub's side; thread-safe (each in-process hub runs its own event loop thread). The
    launcher process is started at the first `launch`, and again at the next one after it ended."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """No launcher (in a child forked from this process: its parent's is not its own)."""
        self._lock = threading.Lock()  # one request at a time: replies come in order
        self._current: _Running | None = None

    def launch(self, args: list[str], env: dict[str, str], sock: socket.socket) -> Launched:
        """Fork a writer with `args` (writer_child.main's, less the parent and socket), `env` as
        its environment and `sock` as its end of the hub's socket (closed here once sent). Blocks
        for a few ms (the first call: until the launcher runs): call it off the event loop."""
        with self._lock, sock:
            try:
                try:
                    reply = self._send(args, env, sock)
                except (BrokenPipeError, ConnectionResetError):  # it ended since the last launch
                    assert self._current is not None
                    self._current.gone.wait(_REPLY_SECONDS)
                    reply = self._send(args, env, sock)  # to a new one
            except OSError as exc:
                raise WriterDied(f"cannot send the index writer launcher a request: {exc}") from exc
            try:
                return reply.result(_REPLY_SECONDS)
            except concurrent.futures.TimeoutError:
                raise WriterDied(f"index writer launcher did not answer within {_REPLY_SECONDS:.0f} s") from None

    def _send(self, args: list[str], env: dict[str, str], sock: socket.socket) -> concurrent.futures.Future[Launched]:
        """Send the request to the running launcher (started first if none runs); its reply."""
        current = self._current
        if current is None or current.gone.is_set():
            if current is not None:
                current.control.close()
            try:
                current = self._current = self._start(env)
            except OSError as exc:
                raise WriterDied(f"cannot start the index writer launcher: {exc}") from exc
        # the environment as changes to the launcher's (the writer starts from a copy of it): a
        # request is one datagram, and an environment of a few hundred kB would not fit in one
        changed = {name: value for name, value in env.items() if current.env.get(name) != value}
        removed = [name for name in current.env if name not in env]
        reply: concurrent.futures.Future[Launched] = concurrent.futures.Future()
        current.replies.append(reply)
        try:
            socket.send_fds(current.control, [pickle.dumps((args, changed, removed))], [sock.fileno()])
        except OSError:
            with contextlib.suppress(ValueError):  # (answered already by the reader's end)
                current.replies.remove(reply)
            raise
        return reply

    def stop(self) -> None:
        """End the launcher (and any writer still running) and reap it: before the hub replaces
        its program (mailhub/cli.py), which would otherwise inherit it as a zombie, and at exit."""
        with self._lock:
            current, self._current = self._current, None
            if current is None:
                return
            with contextlib.suppress(OSError):
                current.control.shutdown(socket.SHUT_RDWR)  # the launcher sees the end of its socket
            if not current.gone.wait(_REPLY_SECONDS):
                current.proc.kill()  # it did not end: hung
                current.gone.wait(_REPLY_SECONDS)
            current.control.close()

    @staticmethod
    def _start(env: dict[str, str]) -> _Running:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        launcher_env = {name: value for name, value in env.items() if name != writer_child.INDEX_URL_VARIABLE}
        with theirs:
            try:  # -P: the hub's working folder is not put on the path (a `storage` folder there
                # would be imported instead of the hub's own; env's PYTHONPATH names the hub's)
                proc = subprocess.Popen(
                    [sys.executable, "-P", "-c", _COMMAND, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env=launcher_env,
                )
            except BaseException:
                ours.close()
                raise
        return _Running(ours, proc, launcher_env)


LAUNCHER = Launcher()  # this process's
os.register_at_fork(after_in_child=LAUNCHER.forget)
atexit.register(LAUNCHER.stop)  # reaped by the process that started it, not left to init


def main(argv: list[str]) -> None:
    """The launcher process: fork a writer per request until the hub's end of the socket closes."""
    control = socket.socket(fileno=int(argv[0]))
    ctypes.CDLL(None).prctl(_PR_SET_NAME, b"mailhub-launch")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # its wake-up byte is what counts
    while True:
        readable = select.select([control.fileno(), wake_r], [], [])[0]
        if wake_r in readable:
            _drain(wake_r)
            _report_ended(control)
        if control.fileno() in readable:
            message, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 1)
            if not message:
                return  # the hub closed it, or died: the writers die with this process
            args, changed, removed = pickle.loads(message)
            if writer_child.INDEX_URL_VARIABLE in changed:
                _preload_postgres()
            launcher_pid = os.getpid()
            try:
                faults.hit("launcher", "fork")
                pid = os.fork()
            except OSError as exc:  # out of memory or of processes: this request fails, not the launcher
                control.send(pickle.dumps(("failed", 0, str(exc))))
            else:
                if pid == 0:
                    _be_the_writer(args, changed, removed, launcher_pid, fds[0], [control.fileno(), wake_r, wake_w])
                control.send(pickle.dumps(("started", pid)))
            os.close(fds[0])


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _report_ended(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(pickle.dumps(("ended", pid, os.waitstatus_to_exitcode(status))))


def _preload_postgres() -> None:
    """Import the PostgreSQL driver here, once, rather than in each writer."""
    try:
        from .postgres import connection  # noqa: F401
    except ImportError:
        pass  # the writer reports it


def _be_the_writer(
    args: list[str], changed: dict[str, str], removed: list[str], launcher_pid: int, fd: int, launchers: list[int]
) -> None:
    """In the forked child: the writer process, with the hub's environment (the launcher's, as
    changed by the hub's request), until its socket closes. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for launcher_fd in launchers:
            os.close(launcher_fd)
        ctypes.CDLL(None).prctl(_PR_SET_NAME, WRITER_NAME)
        for name in removed:
            os.environ.pop(name, None)
        os.environ.update(changed)
        faults.load()  # the hub's fault settings (tests), not the launcher's
        os.open(args[0], os.O_RDONLY | os.O_DIRECTORY)  # kept open: /proc/PID/fd names the data folder
        writer_child.main([*args, str(launcher_pid), str(fd)])
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

# The hub's side of the index writers' launcher (the launcher process: storage/launcher_child.py).
# Index writer processes (storage/writer_child.py) are forked by a launcher: one process per hub
# process, started at its first writer, that has imported the writer's code once. A new writer
# then costs a fork (a few ms) instead of a new interpreter importing `storage` (~0.1 s of CPU, and
# ~0.4 s more for PostgreSQL's driver), at every hub start and writer restart. The launcher is
# single-threaded (a fork from it is safe, unlike one from the hub's threads). Lifetimes: the
# launcher ignores SIGINT and SIGTERM (a signal to the process group must leave the hub's graceful
# shutdown its writers) and ends when the hub closes its control socket or dies (kill -9
# included); a writer dies with the launcher (its death signal). Control messages are datagrams of
# a SOCK_SEQPACKET pair: hub -> launcher, a pickle of (writer arguments, environment changes) with
# the writer's socket attached (SCM_RIGHTS); launcher -> hub, ("started", pid) or ("failed", 0,
# reason) per request in order, and ("ended", pid, exit status) whenever a writer ended.
import atexit
import collections
import concurrent.futures
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading

from . import writer_child
from .errors import WriterDied
from .launcher_child import MAX_MESSAGE

_REPLY_SECONDS = 60.0  # a fork takes ms; the first launch waits for the launcher's imports too
_COMMAND = "import sys; from storage.launcher_child import main; main(sys.argv[1:])"  # what `ps` shows


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
            while message := self.control.recv(MAX_MESSAGE):
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

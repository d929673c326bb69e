# The index writers' launcher process (the hub's side: storage/writer_launcher.py, which says why
# and how it runs): forks an index writer (storage/writer_child.py) per request from the hub, and
# tells the hub each one's pid and, when it ended, its exit status. Single-threaded; named
# `mailhub-launch` in `ps -e`. Each writer it forks is named `mailhub-writer` and holds its data
# folder open, so `ls -l /proc/PID/fd` names it.
import ctypes
import os
import pickle
import select
import signal
import socket
import sys
import traceback

from . import faults, writer_child

_PR_SET_NAME = 15
MAX_MESSAGE = 1 << 20  # a control message's bound; the kernel's for one datagram is ~200 kB
WRITER_NAME = b"mailhub-writer"


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
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
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

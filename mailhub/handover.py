# Graceful restart (`mailhub restart`, SIGUSR2): the listening sockets outlive the hub that stops.
# The stopping hub keeps a duplicate of each listening socket's descriptor while it drains (the
# kernel keeps completing connections into the listen backlog), then `mailhub serve` replaces its
# own program with a new one (exec: same process ID, so systemd's unit is undisturbed), passing the
# sockets the way systemd's socket activation does (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID; fds from
# 3). The new hub adopts the sockets whose address its configuration still names and answers the
# connections that waited. Why not two hubs side by side: one data folder has one hub (its lock,
# one index writer), so the new one can open storage only after the old one closed it.
# Must never: let a descriptor leak into a child process (the index writer), or adopt a socket for
# an address the configuration no longer names.
import fcntl
import os
import socket
import sys
from collections.abc import MutableMapping
from typing import NoReturn

FIRST_FD = 3  # SD_LISTEN_FDS_START
_SCRATCH_FD = 200  # descriptors are moved to free ones above this before they are laid out from FIRST_FD


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The listening sockets passed to this process (name -> sockets), removing the variables that
    passed them, so that no child process takes them for its own."""
    environ = os.environ if environ is None else environ
    count = environ.pop("LISTEN_FDS", None)
    pid = environ.pop("LISTEN_PID", None)
    names = environ.pop("LISTEN_FDNAMES", "").split(":")
    if count is None or not count.isdigit() or pid != str(os.getpid()):
        return {}
    found: dict[str, list[socket.socket]] = {}
    for index in range(int(count)):
        fd = FIRST_FD + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (or closed): nothing to adopt
        sock.set_inheritable(False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.setdefault(name, []).append(sock)
    return found


def keep(server_sockets) -> list[int]:
    """Duplicates of a listener's socket descriptors, kept open (listening) after the server
    object closes its own; inheritable for the exec."""
    kept = []
    for sock in server_sockets:
        fd = os.dup(sock.fileno())
        os.set_inheritable(fd, True)
        kept.append(fd)
    return kept


def exec_serving(kept: list[tuple[str, int]], argv: list[str] | None = None) -> NoReturn:
    """Replace this process by `python -m mailhub.cli serve ...` (the same arguments) with the
    kept sockets laid out from fd 3. Only once the hub has stopped (storage closed, no threads
    that matter)."""
    moved = [(name, fcntl.fcntl(fd, fcntl.F_DUPFD, _SCRATCH_FD)) for name, fd in kept]  # above any in use
    for _, fd in kept:
        os.close(fd)
    for index, (_, fd) in enumerate(moved):
        os.dup2(fd, FIRST_FD + index, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(moved))
    os.environ["LISTEN_FDNAMES"] = ":".join(name for name, _ in moved)
    os.environ["LISTEN_PID"] = str(os.getpid())
    args = argv if argv is not None else sys.argv[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "mailhub.cli", *args])


def matches(sock: socket.socket, host: str, port: int) -> bool:
    """Whether a listening socket is bound where the configuration says (port 0: any port)."""
    bound_host, bound_port = sock.getsockname()[:2]
    if port and bound_port != port:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    return bound_host in addresses

# Ports to name before the server that will listen on them starts (a third-party server's
# configuration, a hub spawned as a process, a deployed unit's config): picked below the kernel's
# ephemeral port range, so that no outgoing connection's own port and no other program's bind to
# port 0 can take one in the time between (that is how "bind to port 0, close, hand the number on"
# lost ports under a parallel test suite), each one checked free by a bind of its own. Parallel
# pytest-xdist workers (PYTEST_XDIST_WORKER) take ports from blocks of their own; within a process
# no port is handed out twice until its block has gone round.
# Only loopback addresses are ever bound here.
import itertools
import os
import random
import socket
import threading

_LOWEST = 10000  # below this are the ports well-known services use
_BLOCKS = 16  # parallel workers with a block of their own (a seventeenth shares the first's)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _worker() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" in the test suite's fourth worker
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


_lock = threading.Lock()
_size = (_ephemeral_low() - _LOWEST) // _BLOCKS
_first = _LOWEST + (_worker() % _BLOCKS) * _size
_cursor = itertools.count(random.randrange(max(_size, 1)))  # a random start: two runs at once rarely meet


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def _bindable(host: str, port: int) -> bool:
    with _socket(host) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` (a loopback address) that nothing listens on or holds, from this process's block."""
    if _size < 100:  # an ephemeral range that starts low: leave the choice to the kernel
        with _socket(host) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    with _lock:
        for _ in range(_size):
            port = _first + next(_cursor) % _size
            if _bindable(host, port):
                return port
    raise OSError(f"no free port left in {_first}-{_first + _size - 1} on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different free ports (see free_port)."""
    return [free_port(host) for _ in range(count)]

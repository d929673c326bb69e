# loadtest/ports.py: ports named before their server starts come from below the kernel's ephemeral
# range (no outgoing connection or bind to port 0 can take them meanwhile), are free when handed
# out, never twice in one process, and from a block of their own per pytest-xdist worker.
import os
import socket
import subprocess
import sys

from loadtest import ports


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    got = ports.free_ports(200)
    assert len(set(got)) == 200
    assert all(10000 <= port < _ephemeral_low() for port in got)
    for port in got[:20]:  # each one can be listened on
        with socket.create_server(("127.0.0.1", port)):
            pass


def test_a_port_something_listens_on_is_skipped():
    first = ports.free_port()
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", first + 1))  # the next one this process would hand out
        except OSError:
            pass  # someone else holds it: skipped all the same
        holder.listen()
        second = ports.free_port()
    assert second not in (first, first + 1)


def test_each_xdist_worker_draws_from_a_block_of_its_own():
    blocks = []
    for worker in ("gw0", "gw3"):
        out = subprocess.run(
            [sys.executable, "-c", "from loadtest import ports; print(ports._first, ports._size, ports.free_port())"],
            env={**os.environ, "PYTEST_XDIST_WORKER": worker},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        first, size, port = map(int, out)
        assert first <= port < first + size
        blocks.append((first, size))
    (first0, size), (first3, _) = blocks
    assert first3 == first0 + 3 * size and first3 + size <= _ephemeral_low()

# A two-node cluster for tests (issue 27): two `mailhub serve` processes, each with its own data
# folder (spool, sockets: node-local), distinct fixed ports (a restarted node binds the same ones)
# and node names (metrics.node), over one index (storage.index: the same PostgreSQL URL; or, for a
# test of the harness itself, each node its own SQLite index) and optionally one shared blob folder
# (storage.blobs), with HAProxy on loopback in front: TCP, send-proxy-v2, the nodes checked on
# /healthz (as the Ansible role mailhub_balancer configures it; tests/test_ansible_balancer.py checks
# that role). kill(node) sends SIGKILL, restart(node) starts the node again on its data folder,
# wait_healthy/wait_balanced wait with a deadline for /healthz and for HAProxy's view of a node.
# Must never leave a process behind: stop() (and the context manager) ends HAProxy and both nodes.
from __future__ import annotations

import csv
import io
import poplib
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtest.ports import free_port
from loadtest.thirdparty import haproxy_config

from conftest import Hub, wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PROTOCOLS = ("smtp", "pop3", "imap")
# HAProxy connects to the nodes from this address, the one the nodes trust as their balancer; a
# test's client that connects to a node directly from 127.0.0.1 is served as it is (no PROXY header).
BALANCER_SOURCE = "127.0.0.5"
# A gateway as HAProxy sees it: what the nodes must see through the PROXY header.
GATEWAY = "127.0.0.2"


def healthz(metrics_port: int) -> int | None:
    """The status of a node's GET /healthz, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def pop3_login(port: int, user: str, password: str, timeout: float = 60.0) -> poplib.POP3:
    """A POP3 session on 127.0.0.1:`port` logged in as `user`, logging in again while the mailbox
    is still locked by a session that has just ended: a node lets the mailbox go after its reply to
    QUIT, and the database's lock of a cluster a moment later ([IN-USE] until then)."""

    def attempt() -> poplib.POP3 | None:
        pop = poplib.POP3("127.0.0.1", port, timeout=timeout)
        pop.user(user)
        try:
            pop.pass_(password)
        except poplib.error_proto as exc:
            pop.close()
            if b"[IN-USE]" not in exc.args[0]:
                raise
            return None
        return pop

    return wait_for(attempt, 20, interval=0.05, message=f"{user}'s mailbox still locked on port {port}")


def haproxy_command(admin_socket: Path, line: str) -> str:
    """One command on an HAProxy admin socket ("show stat", "disable server smtp/node1"...)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(admin_socket))
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_states(admin_socket: Path) -> dict[tuple[str, str], str]:
    """(listen, server) -> HAProxy's status of each server: "UP", "DOWN", "UP 1/2", "MAINT"..."""
    rows = csv.DictReader(io.StringIO(haproxy_command(admin_socket, "show stat").lstrip("# ")))
    return {
        (row["pxname"], row["svname"]): row["status"] for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")
    }


class Balancer:
    """HAProxy (-db: in the foreground, a child of the test) with one `listen` per protocol on a
    free loopback port and every node behind each, checked on its metrics port every 200 ms."""

    def __init__(self, work: Path, nodes: dict[str, dict[str, int]], protocols: tuple[str, ...] = PROTOCOLS):
        self.work = work
        self.nodes = nodes
        self.protocols = protocols
        self.front = {name: free_port() for name in protocols}
        self.config = work / "haproxy.cfg"
        self.socket = work / "haproxy-admin.sock"
        self.log = work / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def render(self) -> str:
        return haproxy_config(
            self.front,
            self.nodes,
            check_interval_ms=200,
            source=BALANCER_SOURCE,
            stats_socket=str(self.socket),
            maxconn=200,  # HAProxy raises its file limit to about twice this
            timeout_connect="2s",
            timeout_idle="120s",
        )

    def start(self) -> Balancer:
        self.config.write_text(self.render())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.work
            )
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 20, message="haproxy did not start")
        assert self.proc.poll() is None, f"haproxy exited:\n{self.log.read_text()[-3000:]}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket ("show stat", "disable server smtp/node1"...)."""
        return haproxy_command(self.socket, line)

    def states(self) -> dict[tuple[str, str], str]:
        """(protocol, node) -> HAProxy's status of that server: "UP", "DOWN", "UP 1/2", "MAINT"..."""
        return haproxy_states(self.socket)

    def is_up(self, node: str) -> bool:
        """Whether HAProxy sends new connections of every protocol to `node` (its checks passed)."""
        states = self.states()
        return all(states.get((protocol, node)) == "UP" for protocol in self.protocols)

    def is_down(self, node: str) -> bool:
        states = self.states()
        return all(states.get((protocol, node), "").startswith("DOWN") for protocol in self.protocols)


class Cluster:
    """Two nodes `node1` and `node2` behind HAProxy. `make_hub` is the conftest fixture's factory;
    `index_url`: the PostgreSQL URL both nodes use as storage.index (None: each node its own SQLite
    index, and the sites are copied into each); `blobs`: the shared storage.blobs folder, which must
    exist (None: each node's blobs in its data folder). `sites`: (name, address, ...) tuples as
    make_hub takes them, password PASSWORD."""

    NODES = ("node1", "node2")

    def __init__(
        self,
        make_hub,
        work: Path,
        index_url: str | None = None,
        blobs: Path | None = None,
        sites: tuple = (),
        **settings: str,
    ):
        self.work = work
        self.index_url = index_url
        self.blobs = blobs
        self.sites = sites
        self.ports: dict[str, dict[str, int]] = {}
        self.nodes: dict[str, Hub] = {}
        for name in self.NODES:
            ports = {protocol: free_port() for protocol in (*PROTOCOLS, "metrics")}
            env = {f"MAILHUB_{protocol.upper()}_LISTEN": f"127.0.0.1:{port}" for protocol, port in ports.items()}
            env |= {
                "MAILHUB_NODE_NAME": name,
                "MAILHUB_METRICS_NODE": name,
                "MAILHUB_METRICS_HEALTH_MIN_FREE_BYTES": "0",
                "MAILHUB_PROXY_TRUSTED_BALANCERS": f"{BALANCER_SOURCE}/32",
                # every test client connects from 127.0.0.0/8: held to the totals only
                **{f"MAILHUB_{p}_LIMIT_EXEMPT_NETWORKS": "127.0.0.0/8" for p in ("SMTP", "POP3", "IMAP")},
            }
            if index_url is not None:
                env["MAILHUB_STORAGE_INDEX"] = index_url
            if blobs is not None:
                env["MAILHUB_STORAGE_BLOBS"] = str(blobs)
            env |= settings
            # the sites copied in (no CLI run): into each SQLite index, or once into the shared one
            own_sites = sites if index_url is None or not self.nodes else ()
            self.nodes[name] = make_hub(sites=own_sites, process=True, **env)
            self.ports[name] = ports
        self.balancer = Balancer(work, self.ports)

    # ---- start and stop ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Cluster:
        # both processes start at once (a `mailhub serve` takes about a second of CPU to start)
        with ThreadPoolExecutor(len(self.NODES)) as pool:
            for started in [pool.submit(self.nodes[name].start) for name in self.NODES]:
                started.result()
        self.balancer.start()
        for name in self.NODES:
            self.wait_healthy(name, timeout)
            self.wait_balanced(name, True, timeout)
        return self

    def stop(self) -> None:
        """HAProxy, then both nodes (SIGTERM, then SIGKILL after the hub's own timeout)."""
        try:
            self.balancer.stop()
        finally:
            for hub in self.nodes.values():
                if hub.proc is not None:
                    hub.stop(signal.SIGTERM)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one node ----------------------------------------------------------------------------

    def kill(self, node: str, sig: int = signal.SIGKILL) -> int | None:
        """Sends `sig` to the node's process and waits for it to end; its exit status."""
        hub = self.nodes[node]
        assert hub.proc is not None, f"{node} is not running"
        return hub.stop(sig)

    def restart(self, node: str, timeout: float = 30.0) -> Hub:
        """Starts the node again on its own data folder and ports, once its last process has gone
        (after kill()); returns once its /healthz answers 200."""
        hub = self.nodes[node]
        if hub.proc is not None:
            hub.stop(signal.SIGTERM)
        hub.start()
        self.wait_healthy(node, timeout)
        return hub

    def pid(self, node: str) -> int:
        return self.nodes[node].pid

    def wait_healthy(self, node: str, timeout: float = 30.0) -> None:
        port = self.ports[node]["metrics"]
        wait_for(lambda: healthz(port) == 200, timeout, interval=0.05, message=f"{node}: /healthz not 200")

    def wait_balanced(self, node: str, up: bool = True, timeout: float = 30.0) -> None:
        """Waits until HAProxy has taken `node` in (up) or out (not up) for every protocol."""
        check = self.balancer.is_up if up else self.balancer.is_down
        wait_for(
            lambda: check(node),
            timeout,
            interval=0.05,
            message=f"haproxy did not mark {node} {'UP' if up else 'DOWN'}: {self.balancer.states()}",
        )

    # ---- where clients connect -----------------------------------------------------------------

    def front(self, protocol: str) -> int:
        """The balancer's port of a protocol (smtp, pop3, imap)."""
        return self.balancer.front[protocol]

    def node_port(self, node: str, protocol: str) -> int:
        return self.ports[node][protocol]

    def log_text(self, node: str) -> str:
        return self.nodes[node].log_text()

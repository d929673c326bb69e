# Behind a real HAProxy (Debian package `haproxy`, started here with a generated configuration,
# `send-proxy-v2`) in front of an in-process hub: the client's address from the PROXY header is
# the one the hub uses (Received:, logs, peer networks, per-address limits) on SMTP, POP3, IMAP
# and the implicit-TLS POP3S/IMAPS; a header from an address that is not a trusted balancer is
# never believed; a balancer's connection without a valid header is closed with a log line;
# /healthz answers 503 while the hub drains.
import base64
import imaplib
import json
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from loadtest.ports import free_port

from conftest import ALPHA_BETA, PASSWORD, RawSMTP, make_message, queue_id_from, wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"  # (root's PATH has /usr/sbin, others' may not)
pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY), reason="needs Debian's haproxy (bench/install-debian-packages.sh)"
)

BALANCER = "127.0.0.1"  # HAProxy connects to the hub from here
CLIENT = "127.0.0.2"  # the gateways, as HAProxy sees them
OTHER = "127.0.0.3"


class Balancer:
    """An HAProxy child process forwarding each named port of the hub (`send-proxy-v2`), and SMTP
    once more with the text header v1 (`send-proxy`, port "smtp-v1")."""

    def __init__(self, hub, names, folder):
        self.ports = {name: free_port() for name in [*names, "smtp-v1"]}
        lines = [
            "global",
            "    maxconn 100",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
        ]
        for name in names:
            lines += [
                f"listen {name}",
                f"    bind 127.0.0.1:{self.ports[name]}",
                f"    server hub1 {BALANCER}:{hub.ports[name]} send-proxy-v2",
            ]
        lines += [
            "listen smtp-v1",
            f"    bind 127.0.0.1:{self.ports['smtp-v1']}",
            f"    server hub1 {BALANCER}:{hub.ports['smtp']} send-proxy",
        ]
        self.config = folder / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        wait_for(lambda: all(self._listening(p) for p in self.ports.values()), 10, message="haproxy did not listen")

    def _listening(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.proc.stdout.read().decode(errors='replace')}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def behind(make_hub, tmp_path, self_signed_certificate):
    """make(**overrides): a started hub trusting 127.0.0.1 as its balancer, and an HAProxy in front."""
    balancers = []

    def make(**overrides):
        cert, key = self_signed_certificate
        hub = make_hub(
            sites=ALPHA_BETA,
            MAILHUB_PROXY_TRUSTED_BALANCERS=f"{BALANCER}/32",
            MAILHUB_PROXY_HEADER_TIMEOUT="1",
            MAILHUB_LOG_FORMAT="json",
            MAILHUB_TLS_CERT_FILE=cert,
            MAILHUB_TLS_KEY_FILE=key,
            MAILHUB_POP3_POP3S_LISTEN="127.0.0.1:0",
            MAILHUB_IMAP_IMAPS_LISTEN="127.0.0.1:0",
            **overrides,
        ).start()
        balancer = Balancer(hub, ["smtp", "pop3", "pop3s", "imap", "imaps"], tmp_path)
        balancers.append(balancer)
        return hub, balancer

    yield make
    for balancer in balancers:
        balancer.stop()


def records(hub) -> list[dict]:
    found = []
    for line in hub.log_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def clients_logged(hub, protocol: str) -> set[str]:
    """The client addresses of the logged-in sessions' log lines (the readiness probes through
    HAProxy come from 127.0.0.1 and log in nowhere)."""
    return {r["client"] for r in records(hub) if r.get("protocol") == protocol and r.get("client") and r.get("site")}


def tls_client() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a throw-away certificate; TLS itself is what is tested
    return context


class SourcedPOP3(poplib.POP3):
    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class SourcedPOP3S(poplib.POP3_SSL):
    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


class SourcedIMAP(imaplib.IMAP4):
    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class SourcedIMAPS(imaplib.IMAP4_SSL):
    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def submit(port: int, source: str, login: str | None, rcpt: str = "beta@hub.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("gateway.test")
        if login is not None:
            client.login(login, PASSWORD)
        client.mail(f"{login or 'alpha'}@hub.test")
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(make_message(1500))


def test_smtp_through_haproxy_the_client_address_counts(behind):
    hub, balancer = behind(MAILHUB_SMTP_PEER_NETWORKS=f"{CLIENT}/32")
    code, reply = submit(balancer.ports["smtp"], CLIENT, "alpha")
    assert code == 250, reply
    stored = hub.stored(queue_id_from(reply))
    assert stored.startswith(b"Received: from gateway.test ([127.0.0.2])"), stored[:200]
    wait_for(lambda: CLIENT in clients_logged(hub, "smtp"), 10, message="no smtp log line with the client")
    assert BALANCER not in clients_logged(hub, "smtp")
    code, reply = submit(balancer.ports["smtp-v1"], CLIENT, "alpha")  # the v1 header
    assert code == 250, reply
    assert hub.stored(queue_id_from(reply)).startswith(b"Received: from gateway.test ([127.0.0.2])")
    # peer networks go by the header's address: 127.0.0.2 may deliver without a login, 127.0.0.3
    # (through the same balancer) may not
    assert submit(balancer.ports["smtp"], CLIENT, None)[0] == 250
    code, reply = submit(balancer.ports["smtp"], OTHER, None)
    assert code == 530 or code // 100 == 5, reply


def test_pop3_imap_and_their_implicit_tls_through_haproxy(behind):
    hub, balancer = behind(MAILHUB_POP3_MAX_CONNECTIONS_PER_IP="1")
    assert submit(balancer.ports["smtp"], CLIENT, "alpha")[0] == 250

    pop = SourcedPOP3(CLIENT, "127.0.0.1", balancer.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 1
    listed = json.loads(hub.cli("sessions", "--json").stdout)  # `mailhub sessions` names the client
    assert [(r["protocol"], r["site"], r["client"]) for r in listed] == [("pop3", "beta", CLIENT)]
    # the per-address limit counts the client behind the balancer, not the balancer
    with pytest.raises(poplib.error_proto, match="too many connections from your address"):
        SourcedPOP3(CLIENT, "127.0.0.1", balancer.ports["pop3"], timeout=30)
    other = SourcedPOP3(OTHER, "127.0.0.1", balancer.ports["pop3"], timeout=30)
    other.user("alpha")
    other.pass_(PASSWORD)
    other.quit()
    pop.quit()

    pops = SourcedPOP3S(CLIENT, "127.0.0.1", balancer.ports["pop3s"], context=tls_client(), timeout=30)
    pops.user("beta")
    pops.pass_(PASSWORD)
    assert pops.stat()[0] == 1
    pops.quit()

    imap = SourcedIMAP(CLIENT, "127.0.0.1", balancer.ports["imap"], timeout=30)
    imap.login("beta", PASSWORD)
    assert imap.select("INBOX")[1] == [b"1"]
    imap.logout()
    imaps = SourcedIMAPS(CLIENT, "127.0.0.1", balancer.ports["imaps"], ssl_context=tls_client(), timeout=30)
    imaps.login("beta", PASSWORD)
    assert imaps.select("INBOX")[1] == [b"1"]
    imaps.logout()

    wait_for(lambda: clients_logged(hub, "pop3") == {CLIENT, OTHER}, 10, message=str(clients_logged(hub, "pop3")))
    wait_for(lambda: clients_logged(hub, "imap") == {CLIENT}, 10, message=str(clients_logged(hub, "imap")))


def test_a_header_from_an_untrusted_address_is_never_believed(behind):
    hub, _ = behind()
    port = hub.ports["smtp"]
    # v1 straight to the hub from 127.0.0.2 (not a balancer): just a bad command
    client = RawSMTP.__new__(RawSMTP)  # RawSMTP's socket, bound to the client's address
    client.sock = socket.create_connection(("127.0.0.1", port), 30, source_address=(CLIENT, 0))
    client.buf = b""
    assert client.reply().startswith(b"220")
    assert client.command("PROXY TCP4 203.0.113.7 127.0.0.1 40000 25")[:1] == b"5"
    client.ehlo()
    token = base64.b64encode(b"\0alpha\0" + PASSWORD.encode())
    assert client.command(b"AUTH PLAIN " + token).startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    reply = client.command(make_message(500) + b".")
    assert reply.startswith(b"250"), reply
    client.close()
    assert hub.stored(queue_id_from(reply)).startswith(b"Received: from gateway.test ([127.0.0.2])")

    # v2 on POP3 (its signature ends in QUIT: the session ends, believing nothing)
    with socket.create_connection(("127.0.0.1", hub.ports["pop3"]), 30, source_address=(CLIENT, 0)) as sock:
        assert sock.recv(100).startswith(b"+OK")
        sock.sendall(
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 127, 0, 0, 1]) + b"\x9c\x40\x00\x6e"
        )
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(1000):
            answer += chunk
        assert b"+OK" in answer  # the reply to QUIT
    assert "203.0.113.7" not in hub.log_text()

    # a direct client (not a balancer) on an implicit-TLS listener: the handshake at once, as without a balancer
    direct = SourcedPOP3S(CLIENT, "127.0.0.1", hub.ports["pop3s"], context=tls_client(), timeout=30)
    direct.user("beta")
    direct.pass_(PASSWORD)
    assert direct.stat()[0] == 1
    direct.quit()
    wait_for(lambda: clients_logged(hub, "pop3") == {CLIENT}, 10, message=str(clients_logged(hub, "pop3")))


def test_a_balancer_connection_without_a_valid_header_is_closed_with_a_log_line(behind):
    hub, _ = behind()
    with socket.create_connection(("127.0.0.1", hub.ports["smtp"]), 30, source_address=(BALANCER, 0)) as sock:
        sock.sendall(b"EHLO gateway.test\r\n")
        sock.settimeout(10)
        assert closed_unanswered(sock)  # no greeting
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", hub.ports["imaps"]), 30, source_address=(BALANCER, 0)) as sock:
        sock.settimeout(20)
        assert closed_unanswered(sock)  # nothing sent: closed after proxy.header_timeout (1 s)
    assert time.monotonic() - started >= 0.9
    wait_for(lambda: sum(r.get("event") == "proxy.refused" for r in records(hub)) == 2, 10, message=hub.log_text())
    lines = [r["msg"] for r in records(hub) if r.get("event") == "proxy.refused"]
    assert "smtp connection from balancer 127.0.0.1 closed: no PROXY protocol header" in lines[0], lines
    assert "imaps connection from balancer 127.0.0.1 closed: no complete PROXY header within 1s" in lines[1], lines


def closed_unanswered(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with bytes unread: a reset
        return True


def _healthz(hub) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_answers_503_while_the_hub_drains(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    assert _healthz(hub) == (200, "ok\n")
    client = RawSMTP(hub.smtp_port)  # a transaction in flight holds the shutdown
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(make_message(500)[:200])
    stopping = threading.Thread(target=hub.stop)
    stopping.start()
    try:
        wait_for(lambda: _healthz(hub)[0] == 503, 10, message="healthz did not turn 503")
        assert _healthz(hub) == (503, "draining: shutting down\n")
    finally:
        client.send(make_message(500)[200:] + b".\r\n")
        reply = client.reply()
        client.close()
        stopping.join(30)
    assert reply.startswith(b"250"), reply

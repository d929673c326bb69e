# Helpers of the hostile-client tests: real clients (poplib, imaplib, smtplib, raw sockets) bound
# to a chosen loopback source address (127.0.0.0/8 is all local, so one machine plays many
# clients), a well-behaved gateway whose login and download is timed while an attack runs, and
# the hub's metrics.
import imaplib
import poplib
import smtplib
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import PASSWORD

ATTACKER, GOOD = "127.0.0.1", "127.0.0.2"


def connect(port: int, source: str = ATTACKER, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


class POP3From(poplib.POP3):
    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class IMAP4From(imaplib.IMAP4):
    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def smtp_from(port: int, source: str, timeout: float = 10.0) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=timeout, source_address=(source, 0))


def good_gateway_pop3(hub, source: str = GOOD, site: str = "beta") -> float:
    """Seconds a well-behaved gateway takes to log in over POP3 and download every message."""
    started = time.monotonic()
    client = POP3From(hub.ports["pop3"], source)
    try:
        client.user(site)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        assert count >= 1
        for n in range(1, count + 1):
            client.retr(n)
    finally:
        client.quit()
    return time.monotonic() - started


def good_gateway_imap(hub, source: str = GOOD, site: str = "beta") -> float:
    started = time.monotonic()
    client = IMAP4From(hub.ports["imap"], source)
    try:
        client.login(site, PASSWORD)
        typ, data = client.select("INBOX")
        assert typ == "OK" and int(data[0]) >= 1
        typ, _ = client.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK"
    finally:
        client.logout()
    return time.monotonic() - started


def good_gateway_smtp(hub, message: bytes, source: str = GOOD, site: str = "alpha") -> float:
    started = time.monotonic()
    client = smtp_from(hub.smtp_port, source)
    try:
        client.ehlo("gateway.test")
        client.login(site, PASSWORD)
        client.sendmail(f"{site}@hub.test", ["beta@hub.test"], message)
    finally:
        client.quit()
    return time.monotonic() - started


def metrics(hub) -> dict:
    """{(name, frozenset(labels.items())): value} of the hub's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)

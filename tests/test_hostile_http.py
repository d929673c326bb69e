# Hostile clients of the metrics port (mailhub/http_server.py): malformed and oversized request
# heads, other methods, unknown paths, slowloris trickling, connection floods from one address, in
# memory (parse_head) and against a real hub, where a well-behaved gateway downloads within 1 s and
# a Prometheus-style scrape from another address still works while the attack runs.
import socket
import time
import urllib.request

import pytest
from test_hostile_imap import GOOD_MAIL, under_attack

from mailhub import http_server
from mailhub.http_server import Refusal, Request, parse_head

from conftest import ALPHA_BETA
from pop3util import send

ATTACKER = "127.0.0.2"  # loopback, but another client address than the good clients'


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Request("GET", "/metrics")),
        (b"HEAD /healthz?x=1 HTTP/1.0\n\n", Request("HEAD", "/healthz")),
        (b"POST /metrics HTTP/1.1\r\n\r\n", Refusal(405, "only GET and HEAD")),
        (b"GET /metrics HTTP/2.0\r\n\r\n", Refusal(505, "only HTTP/1.0 and HTTP/1.1")),
        (b"GET /metrics\r\n\r\n", Refusal(400, "malformed request line")),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", Refusal(400, "malformed request line")),
        (b"GET http://x/metrics HTTP/1.1\r\n\r\n", Refusal(400, "malformed request target")),
        (b"GET /m\x00 HTTP/1.1\r\n\r\n", Refusal(400, "malformed request target")),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", Refusal(405, "only GET and HEAD")),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", Refusal(400, "malformed header field")),
        (b"GET /metrics HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", Refusal(400, "malformed header field")),
        (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", Refusal(414, "request line too long")),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 51 + b"\r\n", Refusal(431, "more than 50 header fields")),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n", Refusal(431, "request head over 8192 octets")),
    ],
)
def test_parse_head(head, expected):
    assert parse_head(head) == expected


def http(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 20) -> bytes:
    """Send data, return everything the hub answers until it closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    try:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply
    except ConnectionResetError:
        return reply
    finally:
        sock.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def scrape(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200 and b"mailhub_event_loop_lag_seconds_count" in response.read()
    return time.monotonic() - started


@pytest.fixture
def hub(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    send(hub, ["alpha@hub.test"], GOOD_MAIL, login="beta")
    return hub


def test_malformed_oversized_and_unknown_requests_get_clean_replies(hub):
    port = hub.ports["metrics"]
    cases = [
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
        (b"GET /nothing-here HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics HTTP/3.0\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, 400),  # TLS hello: no wait for a line
        (b"OPTIONS * HTTP/1.1\r\n\r\n", 405),
        (b"GET /" + b"a" * 100_000, 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 100_000, 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n", 431),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200),
    ]

    def attack(results):
        for data, _ in cases:
            results.append(http(port, data, source=ATTACKER))

    started = time.monotonic()
    assert status_of(http(port, cases[3][0], source=ATTACKER)) == 400
    assert time.monotonic() - started < http_server.HEAD_SECONDS / 2  # refused at its first bytes
    replies = under_attack(hub, attack)
    for (data, expected), reply in zip(cases, replies):
        assert status_of(reply) == expected, (data[:40], reply[:200])
        assert b"Connection: close\r\n" in reply
    assert b"Allow: GET, HEAD\r\n" in replies[0]
    head = replies[-1]
    assert head.endswith(b"\r\n\r\n") and int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 1000
    assert scrape(port) < 1
    assert "Traceback" not in hub.log_text()


def test_slowloris_and_connection_floods(hub):
    port = hub.ports["metrics"]
    slow = []
    for _n in range(http_server.MAX_PER_ADDRESS):  # one address's share, each trickling a head
        sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(ATTACKER, 0))
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        slow.append(sock)
    started = time.monotonic()

    def attack(results):  # more from the same address: refused at once
        results.append(http(port, b"GET /metrics HTTP/1.1\r\n\r\n", source=ATTACKER))

    replies = under_attack(hub, attack)
    assert status_of(replies[0]) == 503 and b"Retry-After: 5\r\n" in replies[0]
    assert scrape(port) < 1  # another address still scrapes
    for sock in slow:  # trickling does not help: the head is due within HEAD_SECONDS
        try:
            while time.monotonic() - started < http_server.HEAD_SECONDS - 1:
                sock.sendall(b"X: y\r\n")
                time.sleep(0.2)
        except OSError:
            break
    for sock in slow:
        sock.settimeout(http_server.HEAD_SECONDS + 5)
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
        assert status_of(reply) == 408, reply
        sock.close()
    assert time.monotonic() - started < http_server.HEAD_SECONDS + 3
    assert status_of(http(port, b"GET /healthz HTTP/1.1\r\n\r\n", source=ATTACKER)) == 200  # slots freed

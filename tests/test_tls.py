# STARTTLS (RFC 3207) on the SMTP ingress with a throw-away self-signed certificate: advertising,
# login and delivery over TLS, the plaintext-injection defence, the reset of the session after the
# handshake, AUTH on plaintext connections from non-loopback clients, and swaks --tls.
import hashlib
import ipaddress
import re
import shutil
import smtplib
import ssl
import subprocess

import psutil
import pytest

from conftest import ALPHA_BETA, PASSWORD, RawSMTP, make_message, queue_id_from

READY = b"220 2.0.0 Ready to start TLS\r\n"


@pytest.fixture(scope="module")
def certificate(self_signed_certificate) -> tuple[str, str]:
    return self_signed_certificate


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def start_tls_hub(make_hub, certificate, **env):
    cert, key = certificate
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_TLS_CERT_FILE=cert, MAILHUB_TLS_KEY_FILE=key, **env)
    return hub.start()


@pytest.fixture
def tls_hub(make_hub, certificate):
    return start_tls_hub(make_hub, certificate)


def non_loopback_ipv4() -> str:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    raise AssertionError(
        "this test needs a non-loopback IPv4 address on the host (a client connecting to it is not a loopback peer)"
    )


def tls_raw(hub, host: str = "127.0.0.1") -> RawSMTP:
    client = RawSMTP(hub.smtp_port, host=host)
    client.ehlo()
    assert client.command("STARTTLS") == READY
    client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
    return client


def test_starttls_then_login_and_send(tls_hub, certificate):
    client = smtplib.SMTP("127.0.0.1", tls_hub.smtp_port, timeout=30)
    client.ehlo("gateway.test")
    assert client.has_extn("starttls")
    assert client.starttls(context=client_context()) == (220, b"2.0.0 Ready to start TLS")
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    with open(certificate[0]) as f:
        server_cert = ssl.PEM_cert_to_DER_cert(f.read())
    assert client.sock.getpeercert(binary_form=True) == server_cert
    client.ehlo("gateway.test")
    assert not client.has_extn("starttls")
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    for ext in ("size", "pipelining", "chunking", "8bitmime", "enhancedstatuscodes"):
        assert client.has_extn(ext), ext
    client.login("alpha", PASSWORD)
    body = make_message(200_000)
    client.mail("alpha@hub.test")
    client.rcpt("beta@hub.test")
    code, reply = client.data(body)
    assert code == 250
    client.quit()
    qid = queue_id_from(b"250 " + reply)
    (sha,) = tls_hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", qid)[0]
    data = tls_hub.stored(qid)
    assert data.endswith(body) and hashlib.sha256(data).hexdigest() == sha
    assert f"with ESMTPSA id {qid}".encode() in data[: -len(body)]


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<alpha@hub.test>\r\n", b"NOOP\r\nNOOP\r\nNOOP\r\n"],
    ids=["RSET", "MAIL", "3xNOOP"],
)
def test_commands_pipelined_with_starttls_are_discarded(tls_hub, injected):
    client = RawSMTP(tls_hub.smtp_port)
    client.ehlo()
    client.send(b"STARTTLS\r\n" + injected)  # one write: a man-in-the-middle's plaintext injection
    assert client.reply() == READY
    assert client.buf == b""  # nothing answered in plaintext after the 220
    client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
    # the first reply after the handshake must belong to the first command sent over TLS
    ehlo = client.command("EHLO gateway.test")
    assert ehlo.startswith(b"250-hub.test\r\n") and b"STARTTLS" not in ehlo, ehlo
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"503 5.5.1")  # no MAIL survived
    assert client.command("QUIT").startswith(b"221")
    assert client.rest() == b""


def test_session_is_reset_by_starttls_including_authentication(tls_hub):
    # RFC 3207 4.2: after the handshake the server MUST discard what it learnt from the client
    # before it, which includes a plaintext AUTH (allowed here because the peer is loopback).
    client = RawSMTP(tls_hub.smtp_port)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("STARTTLS") == READY
    client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"503")  # EHLO needed again
    client.ehlo()
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")  # the old MAIL is gone
    assert client.command("RCPT TO:<beta@hub.test>") == b"530 5.7.0 Authentication required\r\n"
    client.command("RSET")
    assert client.auth_plain("alpha").startswith(b"235 2.7.0")
    client.close()


def test_starttls_twice_and_with_an_argument(tls_hub):
    client = RawSMTP(tls_hub.smtp_port)
    client.ehlo()
    assert client.command("STARTTLS now").startswith(b"501 5.5.4")
    assert client.command("STARTTLS") == READY
    client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
    client.ehlo()
    assert client.command("STARTTLS") == b"503 5.5.1 TLS already active\r\n"
    client.close()


def test_no_starttls_without_a_certificate(hub):
    client = RawSMTP(hub.smtp_port)
    assert b"STARTTLS" not in client.ehlo()
    assert client.command("STARTTLS") == b"454 4.7.0 TLS not available\r\n"
    assert client.command("NOOP").startswith(b"250")  # still usable in plaintext
    client.close()


def test_failed_handshake_closes_only_that_connection(tls_hub):
    client = RawSMTP(tls_hub.smtp_port)
    client.ehlo()
    assert client.command("STARTTLS") == READY
    client.send(b"this is not a TLS ClientHello\r\n" * 10)
    got = client.rest()
    assert not re.search(rb"^[2-5]\d\d ", got, re.M), got  # garbage is never taken for commands
    client.close()
    other = tls_raw(tls_hub)
    assert other.command("NOOP").startswith(b"250")
    other.close()


def test_auth_on_plaintext_from_a_non_loopback_client(make_hub, certificate):
    address = non_loopback_ipv4()
    hub = start_tls_hub(make_hub, certificate, MAILHUB_SMTP_LISTEN=f"{address}:0")
    client = RawSMTP(hub.smtp_port, host=address)
    ehlo = client.ehlo()
    assert b"250-STARTTLS" in ehlo and b"AUTH" not in ehlo
    token = b"AUTH PLAIN AGFscGhhAHMzY3JldC1wYXNz"  # \0alpha\0s3cret-pass
    assert client.command(token) == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    assert client.command("MAIL FROM:<x@else.org>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>") == b"530 5.7.0 Authentication required\r\n"
    client.command("RSET")
    assert client.command("STARTTLS") == READY
    client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
    assert b"250-AUTH PLAIN LOGIN" in client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    reply = client.command(b"Subject: over TLS\r\n\r\nhello\r\n.")
    qid = queue_id_from(reply)
    received = hub.stored(qid)
    assert received.startswith(f"Received: from gateway.test ([{address}])".encode())
    assert f"with ESMTPSA id {qid}".encode() in received
    client.close()


def test_allow_plaintext_permits_auth_without_tls_from_a_non_loopback_client(make_hub, certificate):
    address = non_loopback_ipv4()
    hub = start_tls_hub(make_hub, certificate, MAILHUB_SMTP_LISTEN=f"{address}:0", MAILHUB_AUTH_ALLOW_PLAINTEXT="true")
    client = RawSMTP(hub.smtp_port, host=address)
    assert b"250-AUTH PLAIN LOGIN" in client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235 2.7.0")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    client.close()


def test_swaks_starttls(tls_hub):
    assert shutil.which("swaks"), "swaks is missing: DEBIAN_FRONTEND=noninteractive apt-get install -y swaks"
    result = subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(tls_hub.smtp_port),
            "--ehlo",
            "gw.test",
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "alpha",
            "--auth-password",
            PASSWORD,
            "--from",
            "alpha@hub.test",
            "--to",
            "beta@hub.test",
            "--body",
            "over STARTTLS",
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, out
    assert "-> STARTTLS" in out and "<-  220 2.0.0 Ready to start TLS" in out
    assert re.search(r"^=== TLS started with cipher ", out, re.M), out
    assert "~> AUTH LOGIN" in out  # swaks marks commands sent over TLS with ~>
    match = re.search(r"^<~  250 2\.0\.0 Ok: queued as (\S+)$", out, re.M)
    assert match, out
    data = tls_hub.stored(match.group(1))
    assert f"with ESMTPSA id {match.group(1)}".encode() in data and b"over STARTTLS" in data

# SMTP ingress over real loopback sockets with Python's smtplib (and raw sockets where smtplib
# cannot express the case): storage, single instance, every rejection with its exact reply.
import base64
import hashlib
import re
import smtplib
import socket
import time

import pytest

from conftest import ALPHA, BETA, PASSWORD, RawSMTP, make_message, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


def connect(hub, login: str | None = "alpha") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.ehlo("gateway.test")
    if login:
        client.login(login, PASSWORD)
    return client


def stored(hub, queue_id: str) -> bytes:
    return hub.stored(queue_id)


def queue_id_of(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[1]


class Raw:
    """A line-oriented raw SMTP client for pipelining and malformed input."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + repr(b"".join(lines)))
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def close(self) -> None:
        self.file.close()  # the socket's file keeps the connection open until it is closed too
        self.sock.close()


def test_ehlo_advertises_the_extensions(hub):
    client = connect(hub, login=None)
    for ext in ("size", "8bitmime", "pipelining", "chunking", "enhancedstatuscodes", "auth"):
        assert client.has_extn(ext), ext
    assert client.esmtp_features["size"] == str(2 * 1024**3)
    assert "starttls" not in client.esmtp_features  # no certificate configured
    client.quit()


def test_plain_data_is_stored_canonically_with_trace_header_and_index(hub):
    body = make_message(
        5000,
        extra_headers="X-TELEMEDICINE-SETID: 1.2.3.4\r\nX-TELEMEDICINE-SETPART: 7\r\nX-TELEMEDICINE-SETTOTAL: 330\r\n",
    )
    body += b".starts with a dot\r\n..two dots\r\n"
    client = connect(hub)
    client.mail("alpha@hub.test")
    client.rcpt("beta@hub.test")
    code, reply = client.data(body)
    client.quit()
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
    qid = queue_id_of(reply)
    blob = stored(hub, qid)
    assert blob.startswith(b"Received: from gateway.test ([127.0.0.1])\r\n\tby hub.test")
    assert f"with ESMTPA id {qid}".encode() in blob
    assert re.search(rb";\r\n\t\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n", blob[:300])  # UTC: +0000
    assert blob.endswith(body)
    row = hub.query(
        "SELECT size, sha256, dot_lines, set_id, set_part, set_total, message_id, mail_from"
        " FROM messages WHERE queue_id = ?",
        qid,
    )[0]
    assert row[0] == len(blob) and row[1] == hashlib.sha256(blob).hexdigest()
    assert row[2:6] == (1, "1.2.3.4", 7, 330)
    assert row[6].startswith("<") and row[7] == "alpha@hub.test"


def test_multi_recipient_mail_is_stored_once(hub):
    client = connect(hub)
    client.sendmail("alpha@hub.test", ["beta@hub.test", "b2@hub.test", "alpha@hub.test"], make_message(3000))
    client.quit()
    assert len(hub.blob_files()) == 1
    assert hub.query("SELECT refs FROM messages") == [(2,)]
    entries = hub.query("SELECT s.name, b.rcpt FROM mailbox b JOIN sites s ON s.id = b.site_id ORDER BY s.name")
    # beta has two addresses but gets one mailbox entry; alpha gets its own
    assert [name for name, _ in entries] == ["alpha", "beta"]


def test_bdat_chunks_and_mixed_transactions_on_one_connection(hub):
    raw = Raw(hub.smtp_port)
    raw.send(b"EHLO gw\r\n")
    raw.reply()
    raw.send(b"AUTH PLAIN " + base64.b64encode(b"\0alpha\0" + PASSWORD.encode()) + b"\r\n")
    assert raw.reply().startswith(b"235 ")
    message = make_message(70_000)
    raw.send(b"MAIL FROM:<alpha@hub.test> SIZE=%d BODY=8BITMIME\r\nRCPT TO:<beta@hub.test>\r\n" % len(message))
    assert raw.reply().startswith(b"250 2.1.0")
    assert raw.reply().startswith(b"250 2.1.5")
    raw.send(b"BDAT 30000\r\n" + message[:30000])
    assert raw.reply() == b"250 2.0.0 30000 octets received\r\n"
    rest = message[30000:]
    raw.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
    reply = raw.reply()
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    qid = queue_id_of(reply.strip())
    assert stored(hub, qid).endswith(message)
    # DATA after BDAT in a new transaction works; BDAT 0 LAST of an empty message too
    raw.send(b"MAIL FROM:<alpha@hub.test>\r\nRCPT TO:<beta@hub.test>\r\nBDAT 0 LAST\r\n")
    raw.reply(), raw.reply()
    assert raw.reply().startswith(b"250 2.0.0 Ok: queued")
    raw.send(b"BDAT 5\r\nabcde")
    assert raw.reply().startswith(b"503 5.5.1")
    raw.send(b"QUIT\r\n")
    assert raw.reply().startswith(b"221")


def test_pipelined_transactions_in_one_write(hub):
    raw = Raw(hub.smtp_port)
    raw.send(b"EHLO gw\r\n")
    raw.reply()
    raw.send(b"AUTH PLAIN " + base64.b64encode(b"\0alpha\0" + PASSWORD.encode()) + b"\r\n")
    raw.reply()
    bodies = [make_message(1000 + i) for i in range(5)]
    batch = b""
    for _ in bodies:
        batch += b"MAIL FROM:<alpha@hub.test>\r\nRCPT TO:<beta@hub.test>\r\nDATA\r\n"
    raw.send(batch[: batch.index(b"DATA\r\n") + 6])
    queue_ids = []
    for i, body in enumerate(bodies):
        assert raw.reply().startswith(b"250 2.1.0")
        assert raw.reply().startswith(b"250 2.1.5")
        assert raw.reply().startswith(b"354")
        follow = b"MAIL FROM:<alpha@hub.test>\r\nRCPT TO:<beta@hub.test>\r\nDATA\r\n" if i < 4 else b"QUIT\r\n"
        raw.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n" + follow)  # data and next commands together
        reply = raw.reply()
        assert reply.startswith(b"250 2.0.0 Ok: queued as"), reply
        queue_ids.append(queue_id_of(reply.strip()))
    assert raw.reply().startswith(b"221")
    assert [stored(hub, q).split(b"\r\n\r\n", 1)[1] for q in queue_ids] == [b.split(b"\r\n\r\n", 1)[1] for b in bodies]


@pytest.mark.parametrize(
    "login,sender,recipient,expected",
    [
        (None, "x@else.org", "beta@else.org", (554, b"5.7.1 Relay access denied")),
        (None, "x@else.org", "beta@hub.test", (530, b"5.7.0 Authentication required")),
        ("alpha", "alpha@hub.test", "nobody@hub.test", (550, b"5.1.1 No such user here")),
        ("alpha", "alpha@hub.test", "x@else.org", (550, b"5.1.2 No route to that domain")),
    ],
)
def test_recipient_rejections(hub, login, sender, recipient, expected):
    client = connect(hub, login)
    assert client.mail(sender)[0] == 250
    assert client.rcpt(recipient) == expected
    client.quit()


def test_sender_must_belong_to_the_authenticated_site(hub):
    client = connect(hub)
    assert client.mail("beta@hub.test") == (553, b"5.7.1 Sender address not owned by the authenticated site")
    assert client.mail("<>")[0] == 250  # the null sender is allowed (notifications)
    client.quit()


def test_peer_network_may_deliver_without_auth_but_not_relay(make_hub):
    hub = make_hub(sites=BETA, MAILHUB_SMTP_PEER_NETWORKS="127.0.0.0/8")
    hub.start()
    client = connect(hub, None)
    client.mail("x@else.org")
    assert client.rcpt("beta@hub.test")[0] == 250
    assert client.rcpt("y@else.org")[0] == 554
    assert client.data(make_message(500))[0] == 250
    client.quit()


def test_wrong_password_then_too_many_failures_closes(make_hub):
    # the failed logins take turns 0.5 s apart, doubling, by default: 10 ms here, same replies
    hub = make_hub(sites=ALPHA, MAILHUB_AUTH_FAILURE_DELAY="0.01", MAILHUB_AUTH_MAX_FAILURE_DELAY="0.05").start()
    raw = Raw(hub.smtp_port)
    raw.send(b"EHLO gw\r\n")
    raw.reply()
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0alpha\0wrong") + b"\r\n"
    for _ in range(4):
        raw.send(bad)
        assert raw.reply() == b"535 5.7.8 Authentication credentials invalid\r\n"
    raw.send(bad)
    assert raw.reply().startswith(b"535")
    assert raw.reply().startswith(b"421 4.7.0")
    assert raw.file.readline() == b""  # closed


def test_declared_size_over_limit_is_refused_at_mail(make_hub):
    hub = make_hub(sites=ALPHA, MAILHUB_SMTP_MAX_MESSAGE_SIZE="100000")
    hub.start()
    client = connect(hub)
    assert client.mail("alpha@hub.test", ["SIZE=100001"]) == (
        552,
        b"5.3.4 Message size exceeds fixed maximum message size",
    )
    assert client.mail("alpha@hub.test", ["SIZE=99999"])[0] == 250
    client.quit()


def test_oversized_data_is_drained_refused_and_connection_stays_usable(make_hub):
    hub = make_hub(sites=ALPHA, MAILHUB_SMTP_MAX_MESSAGE_SIZE="100000")
    hub.start()
    client = connect(hub)
    client.mail("alpha@hub.test")  # no SIZE= declared: the limit is found while the data streams
    client.rcpt("alpha@hub.test")
    assert client.data(make_message(300_000)) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert client.sendmail("alpha@hub.test", ["alpha@hub.test"], make_message(50_000)) == {}
    client.quit()
    assert hub.query("SELECT count(*) FROM messages") == [(1,)]
    assert not list((hub.data_dir / "spool").iterdir())


def test_disconnect_mid_data_stores_nothing(hub):
    raw = Raw(hub.smtp_port)
    raw.send(b"EHLO gw\r\nMAIL FROM:<x@else.org>\r\n")
    raw.reply(), raw.reply()
    raw.close()
    client = connect(hub)
    client.mail("alpha@hub.test")
    client.rcpt("beta@hub.test")
    client.putcmd("data")
    assert client.getreply()[0] == 354
    client.send(make_message(400_000)[:300_000])
    client.close()
    wait_for(
        lambda: not list((hub.data_dir / "spool").iterdir()),
        timeout=5,
        interval=0.05,
        message="the dropped transaction's spool file removed",
    )
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]
    assert hub.blob_files() == []


def test_garbage_and_overlong_lines_get_replies_not_crashes(hub):
    raw = Raw(hub.smtp_port)
    raw.send(b"\x00\xff\xfe garbage\r\n")
    assert raw.reply()[:1] == b"5"
    raw.send(b"EHLO " + b"a" * 5000 + b"\r\n")
    assert raw.reply().startswith(b"500")
    raw.send(b"X" * 300_000 + b"\r\n")
    assert raw.reply().startswith(b"500")
    raw.send(b"EHLO gw\r\n")
    assert raw.reply().startswith(b"250")
    raw.send(b"MAIL FROM:<<<>>>\r\n")
    assert raw.reply()[:1] == b"5"
    raw.send(b"RCPT TO:<beta@hub.test>\r\n")
    assert raw.reply().startswith(b"503")
    raw.send(b"DATA\r\n")
    assert raw.reply().startswith(b"503")
    raw.send(b"MAIL FROM:<alpha@hub.test> FOO=BAR\r\n")
    assert raw.reply().startswith(b"555")
    raw.send(b"QUIT\r\n")
    assert raw.reply().startswith(b"221")
    # the hub is still serving
    client = connect(hub)
    client.quit()


def test_too_many_connections_from_one_address(make_hub):
    hub = make_hub(MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="3")
    hub.start()
    held = [Raw(hub.smtp_port) for _ in range(3)]
    sock = socket.create_connection(("127.0.0.1", hub.smtp_port), timeout=10)
    assert sock.makefile("rb").readline().startswith(b"421 4.7.0")
    for raw in held:
        raw.close()

    def admitted() -> bool:
        sock = socket.create_connection(("127.0.0.1", hub.smtp_port), timeout=10)
        try:
            return sock.makefile("rb").readline().startswith(b"220")
        finally:
            sock.close()

    wait_for(admitted, interval=0.05, message="a new connection greeted with 220 once the held ones closed")


@pytest.mark.one_engine("about the session's idle timer, not the index")
def test_idle_timeout_closes_with_421(make_hub):
    hub = make_hub(MAILHUB_SMTP_IDLE_TIMEOUT="1.0")
    hub.start()
    raw = Raw(hub.smtp_port)
    assert raw.file.readline().startswith(b"421 4.4.2")
    # a client that is busy is not timed out, however long it stays (NOOPs 0.2 s apart for three
    # times the timeout); once idle, it is, counted from its last command
    raw = Raw(hub.smtp_port)
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        raw.send(b"NOOP\r\n")
        assert raw.reply().startswith(b"250")
        last_reply = time.monotonic()
        time.sleep(0.2)  # pacing: a busy client's NOOPs, the behaviour under test
    assert raw.file.readline().startswith(b"421 4.4.2")
    assert 0.9 < time.monotonic() - last_reply < 2.5


def test_a_site_removed_while_its_session_or_transaction_is_open(make_hub):
    """`mailhub site remove` during a session: never a storage failure, a clear refusal instead."""
    hub = make_hub(sites=ALPHA + BETA + (("gamma", "gamma@hub.test"),)).start()
    message = make_message(2000)

    def session(login: str) -> RawSMTP:
        client = RawSMTP(hub.smtp_port)
        client.ehlo()
        assert client.auth_plain(login).startswith(b"235")
        return client

    to_removed = session("alpha")  # a transaction to a site removed before its end of data
    assert to_removed.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert to_removed.command("RCPT TO:<gamma@hub.test>").startswith(b"250")
    by_removed = session("beta")  # a session (and a transaction) of a site removed meanwhile
    assert by_removed.command("MAIL FROM:<beta@hub.test>").startswith(b"250")
    assert by_removed.command("RCPT TO:<alpha@hub.test>").startswith(b"250")
    hub.cli("site", "remove", "gamma")
    hub.cli("site", "remove", "beta")
    hub.sites_reloaded()
    assert to_removed.command("DATA").startswith(b"354")
    to_removed.send(message + b"\r\n.\r\n")
    assert to_removed.reply().startswith(b"451 4.1.1 A recipient site was removed")
    assert by_removed.command("DATA").startswith(b"354")
    by_removed.send(message + b"\r\n.\r\n")
    assert by_removed.reply().startswith(b"530 5.7.0 Authentication required: this site was removed")
    assert by_removed.command("MAIL FROM:<beta@hub.test>").startswith(b"530 5.7.0")
    assert to_removed.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")  # alpha carries on
    assert to_removed.command("RCPT TO:<gamma@hub.test>").startswith(b"550 5.1.1")
    for client in (to_removed, by_removed):
        client.close()
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]
    assert "failed" not in hub.log_text() and "Traceback" not in hub.log_text()


def test_help_vrfy_and_plain_authorization_identity(make_hub):
    hub = make_hub(sites=ALPHA + BETA).start()
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    commands = client.command("HELP").decode()
    assert commands.startswith("250 2.0.0 Supported commands:")
    assert {"AUTH", "BDAT", "DATA", "EHLO", "MAIL", "RCPT"} <= set(commands.split(":", 1)[1].split())
    assert client.command("HELP MAIL").startswith(b"250 2.0.0 Syntax: MAIL FROM:<address>")
    assert client.command("VRFY beta").startswith(b"252 2.0.0 ")
    # RFC 4616: an authorization identity other than the login is refused; the same one is fine
    token = base64.b64encode(b"beta\0alpha\0" + PASSWORD.encode())
    assert client.command(b"AUTH PLAIN " + token).startswith(b"535 5.7.8")
    token = base64.b64encode(b"alpha\0alpha\0" + PASSWORD.encode())
    assert client.command(b"AUTH PLAIN " + token).startswith(b"235")
    # control bytes of the client are not echoed back (nor anything else of a bad line)
    assert client.command(b"NO\x00OP\x1b[31m") == b"500 5.5.2 Syntax error, command unrecognized\r\n"
    assert client.command(b"NOOP \x1b[31m") == b"500 5.5.2 Syntax error: control characters in the command line\r\n"
    client.close()
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.command("AUTH LOGIN") == b"334 " + base64.b64encode(b"Username:") + b"\r\n"
    assert client.command(base64.b64encode(b"alpha")) == b"334 " + base64.b64encode(b"Password:") + b"\r\n"
    assert client.command(base64.b64encode(PASSWORD.encode())).startswith(b"235")
    client.close()


def test_bdat_with_a_bad_keyword_skips_its_chunk_and_fails_the_transaction(make_hub):
    hub = make_hub(sites=ALPHA + BETA).start()
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    for chunk, expected in (
        (b"BDAT 6\r\nSubjec", b"250"),
        (b"BDAT 5 FIRST\r\nt: x\r", b"501 5.5.4"),  # its 5 bytes are skipped
        (b"BDAT 3 LAST\r\n\nhi", b"503"),
    ):  # the message lost a chunk
        client.send(chunk)
        assert client.reply().startswith(expected)
    assert client.command("RSET").startswith(b"250")
    assert client.command("NOOP").startswith(b"250")  # still in step: no data read as a command
    client.close()
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]

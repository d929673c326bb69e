# POP3 mailbox serving over real loopback sockets against a real hub process: poplib for what an
# ordinary client does, RawPop3 for exact wire bytes, bad input and messages too big for poplib.
# Covers every command and error reply of issue 3, the maildrop snapshot and mailbox lock, byte
# exactness against the stored blob and the sent message, site isolation, download totals,
# STLS/POP3S, limits, and that deletions are crash-safe and free the blob files.
import base64
import json
import poplib
import re
import signal
import smtplib
import socket
import ssl
import struct
import threading
import time

import pytest

from relay.smtp.stream import dot_stuff_bytes

from conftest import ALPHA_BETA, ALPHA_BETA_B2, BETA, PASSWORD, RawSMTP, make_message, wait_for
from pop3util import (
    RawPop3,
    blob_path,
    make_cert,
    message_range,
    non_loopback_ip,
    released,
    send,
    sha256,
    stored_size,
    strip_trace,
    unstuff,
)

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

CHUNK = 1024 * 1024  # relay.pop3.server.CHUNK: dot lines are placed around its multiples


def pop(hub, user: str = "beta", port: int | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port or hub.ports["pop3"], timeout=60)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def retr(client: poplib.POP3, n: int) -> bytes:
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def raw(hub, user: str | None = "beta", port: int | None = None, **kw) -> RawPop3:
    client = RawPop3(port or hub.ports["pop3"], **kw)
    if user:
        reply = client.login(user)
        assert reply.startswith(b"+OK maildrop has "), reply
    return client


def login_when_free(hub, user: str = "beta") -> RawPop3:
    """Log in, retrying while the server has not yet noticed that the previous session ended."""

    def attempt():
        client = RawPop3(hub.ports["pop3"])
        client.command(f"USER {user}")
        reply = client.command(f"PASS {PASSWORD}")
        if reply.startswith(b"+OK"):
            return client
        assert b"[IN-USE]" in reply, reply
        client.close()
        return None

    return wait_for(attempt, interval=0.05, message=f"{user}'s mailbox free again after the previous session")


def site_json(hub, name: str) -> dict:
    return json.loads(hub.cli("site", "show", name, "--json").stdout)


def assert_no_traceback(hub) -> None:
    assert "Traceback" not in hub.log_text(), hub.log_text()[-3000:]


def linger_reset(sock: socket.socket) -> None:
    """Make close() send a RST (an abrupt disconnect)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---- greeting, CAPA, login ---------------------------------------------------------------------


def test_greeting_and_capabilities_before_and_after_login(hub):
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    assert client.getwelcome() == b"+OK hub.test POP3 server ready"
    caps = client.capa()
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER"):
        assert cap in caps, caps
    assert caps["SASL"] == ["PLAIN"] and caps["IMPLEMENTATION"] == ["DICOM-Mail-Hub"]
    assert "STLS" not in caps  # no certificate configured
    client.user("beta")
    assert client.pass_(PASSWORD) == b"+OK maildrop has 0 messages (0 octets)"
    caps = client.capa()
    assert "USER" not in caps and "SASL" not in caps and "TOP" in caps
    assert client.quit() == b"+OK hub.test POP3 server signing off (0 messages left)"


def test_auth_plain_with_initial_response_and_with_challenge(hub):
    send(hub, ["beta@hub.test"], make_message(1000))
    client = raw(hub, user=None)
    assert client.command("AUTH") == b"+OK\r\n" and client.block() == b"PLAIN\r\n"
    assert client.command("AUTH CRAM-MD5") == b"-ERR unsupported authentication mechanism\r\n"
    assert client.command("AUTH PLAIN !!!") == b"-ERR invalid base64\r\n"
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    assert client.command("*") == b"-ERR authentication cancelled\r\n"
    assert client.auth_plain("beta", "wrong") == b"-ERR [AUTH] invalid user name or password\r\n"
    assert client.auth_plain("beta").startswith(b"+OK maildrop has 1 messages")
    assert client.command("QUIT").startswith(b"+OK")

    client = raw(hub, user=None)
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    token = base64.b64encode(b"\0beta\0" + PASSWORD.encode()).decode()
    assert client.command(token).startswith(b"+OK maildrop has 1 messages")
    assert client.command("STAT").startswith(b"+OK 1 ")
    client.close()


def test_failed_logins_are_slowed_down_then_the_connection_is_closed(make_hub):
    # auth.failure_delay 0.1 s instead of 0.5 s: the same doubling, a fifth of the wait
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_AUTH_FAILURE_DELAY="0.1").start()
    client = raw(hub, user=None)
    durations = []
    for password, expected in (
        ("wrong1", b"-ERR [AUTH] invalid user name or password\r\n"),
        ("wrong2", b"-ERR [AUTH] invalid user name or password\r\n"),
        ("wrong3", b"-ERR [AUTH] too many failures\r\n"),
    ):
        assert client.command("USER beta") == b"+OK send PASS\r\n"
        started = time.monotonic()
        assert client.command(f"PASS {password}") == expected
        durations.append(time.monotonic() - started)
    assert client.rest() == b""  # closed by the server
    assert durations[0] >= 0.05 and durations[1] >= 0.1 and durations[2] >= 0.15, durations
    # An unknown name gets the same reply as a wrong password (no probing for site names).
    client = raw(hub, user=None)
    client.command("USER nosuchsite")
    assert client.command("PASS x") == b"-ERR [AUTH] invalid user name or password\r\n"
    client.close()
    assert "failed login as 'nosuchsite'" in hub.log_text()


def test_a_second_session_on_a_mailbox_gets_in_use_and_any_close_releases_it(hub):
    first = raw(hub)
    second = raw(hub, user=None)
    second.command("USER beta")
    assert second.command(f"PASS {PASSWORD}") == b"-ERR [IN-USE] maildrop already locked\r\n"
    second.command("USER beta")  # without the right password the lock is not revealed
    assert second.command("PASS wrong") == b"-ERR [AUTH] invalid user name or password\r\n"
    other = raw(hub, user="alpha")  # another site's mailbox is independent
    assert other.command("QUIT").startswith(b"+OK")
    linger_reset(first.sock)
    first.close()  # abrupt end, no QUIT
    login_when_free(hub).command("QUIT")
    third = raw(hub)  # QUIT released it at once
    assert third.command("QUIT").startswith(b"+OK")
    assert_no_traceback(hub)


# ---- transaction commands ----------------------------------------------------------------------


def test_stat_list_uidl_describe_the_stored_mailbox(hub):
    qids = [send(hub, ["beta@hub.test"], make_message(2000 + 700 * i, subject=f"m{i}")) for i in range(3)]
    sizes = [stored_size(hub, q) for q in qids]
    client = pop(hub)
    assert client.stat() == (3, sum(sizes))
    resp, listing, _ = client.list()
    assert resp == f"+OK maildrop has 3 messages ({sum(sizes)} octets)".encode()
    assert listing == [f"{i} {s}".encode() for i, s in enumerate(sizes, 1)]
    assert client.list(2) == f"+OK 2 {sizes[1]}".encode()
    _, uids, _ = client.uidl()
    assert [u.split()[0] for u in uids] == [b"1", b"2", b"3"] and len({u.split()[1] for u in uids}) == 3
    assert client.uidl(3) == b"+OK " + uids[2]
    assert client.noop() == b"+OK"
    client.quit()
    client = pop(hub)  # UIDs are stable across sessions
    assert client.uidl()[1] == uids
    client.quit()


def test_retr_is_byte_exact_against_the_blob_and_the_sent_message(hub):
    sent = [make_message(500), make_message(70_000), make_message(3 * CHUNK + 12345)]
    qids = [send(hub, ["beta@hub.test"], m) for m in sent]
    client = pop(hub)
    for n, (message, qid) in enumerate(zip(sent, qids), 1):
        got = retr(client, n)
        (indexed_sha,) = hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", qid)[0]
        assert sha256(got) == indexed_sha == sha256(hub.stored(qid))
        assert sha256(strip_trace(got)) == sha256(message)
    client.quit()


def _trace_length(hub) -> int:
    """Length of the Received: field the hub puts on a mail from alpha to beta (fixed width)."""
    probe = make_message(300)
    qid = send(hub, ["beta@hub.test"], probe)
    return stored_size(hub, qid) - len(probe)


def _lines_of(size: int) -> bytes:
    """Exactly `size` bytes of short CRLF lines (poplib refuses lines over 2048 bytes)."""
    count, rest = divmod(size, 78)
    if rest == 1:
        count, rest = count - 1, rest + 78
    return (b"y" * 76 + b"\r\n") * count + (b"y" * (rest - 2) + b"\r\n" if rest else b"")


def test_a_dot_after_a_bare_lf_is_stuffed_too(hub):
    """SMTP takes only CRLF for a line end, so a client never stuffs a "." that follows a bare LF;
    line-reading POP3 clients (poplib) do take it for a line start, and "\\n.\\r\\n" unstuffed
    would end the message there. By DATA and by BDAT it goes out stuffed."""
    message = b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: bare\r\n\r\nsm3\n.\r\nend\r\n"
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    for transfer in (b"DATA\r\n", b"BDAT %d LAST\r\n" % len(message)):
        assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
        assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
        if transfer.startswith(b"DATA"):  # stuffed as SMTP wants it: after CRLF only (smtplib would
            assert client.command("DATA").startswith(b"354")  # also stuff after the bare LF)
            client.send(dot_stuff_bytes(message))
        else:
            client.send(transfer + message)
        assert client.reply().startswith(b"250")
    client.close()
    assert hub.query("SELECT dot_lines FROM messages") == [(1,), (1,)]
    client = pop(hub)
    for n in (1, 2):
        # poplib joins its lines with CRLF: the bare LF comes back as a line end of its own
        assert strip_trace(retr(client, n)) == message.replace(b"3\n.", b"3\r\n.")
    client.quit()  # in step: nothing of the message was left to be read as a reply


def test_lines_starting_with_a_dot_are_stuffed_on_the_wire_and_come_back_exact(hub):
    trace = _trace_length(hub)
    header = b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: dots\r\n\r\n"
    body = bytearray(b".\r\n..\r\n.leading dot\r\n")
    filler = b"x" * 70 + b"\r\n"
    # Lines starting with a dot placed across the 1 MB chunk boundaries of the blob: the dot as the
    # last byte of a chunk, as the first byte of the next, and right after a CRLF split by the boundary.
    targets = (CHUNK - 1, 2 * CHUNK, 3 * CHUNK + 1)
    for target in targets:
        gap = target - (trace + len(header) + len(body))
        body += _lines_of(gap) + b".dot at %d\r\n" % target
    body += filler + b".\r\n" + b".last\r\n"
    message = header + bytes(body)
    qid = send(hub, ["beta@hub.test"], message)
    (dot_lines,) = hub.query("SELECT dot_lines FROM messages WHERE queue_id = ?", qid)[0]
    assert dot_lines == 1
    stored = hub.stored(qid)
    for target in targets:
        assert stored[target - 2 : target + 4] == b"\r\n.dot", target

    client = raw(hub)
    assert client.command("RETR 2") == f"+OK {len(stored)} octets\r\n".encode()
    wire = client.block()
    assert wire == stored.replace(b"\n.", b"\n..")  # every line-leading dot doubled, nothing else
    assert unstuff(wire) == stored and strip_trace(unstuff(wire)) == message
    client.command("QUIT")
    assert strip_trace(retr(pop(hub), 2)) == message  # and poplib agrees


def _bdat(hub, message: bytes) -> str:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.ehlo("gateway.test")
    client.login("alpha", PASSWORD)
    client.mail("alpha@hub.test")
    client.rcpt("beta@hub.test")
    client.putcmd("BDAT", f"{len(message)} LAST")
    client.send(message)
    code, reply = client.getreply()
    assert code == 250, reply
    client.quit()
    return reply.decode().rsplit(" ", 1)[1]


def test_a_message_not_ending_in_crlf_gets_one_before_the_terminator(hub):
    plain = b"Subject: no final newline\r\n\r\nlast line without CRLF"
    dotted = b"Subject: dots, no final newline\r\n\r\n.dot line\r\n.last"
    stored = [hub.stored(_bdat(hub, m)) for m in (plain, dotted)]
    client = raw(hub)
    for n, blob in enumerate(stored, 1):  # the first goes by sendfile, the second is copied
        assert client.command(f"RETR {n}") == f"+OK {len(blob)} octets\r\n".encode()
        assert client.block() == blob.replace(b"\n.", b"\n..") + b"\r\n"
    client.command("QUIT")


def test_top_sends_the_header_and_the_first_body_lines(hub):
    message = (
        b"From: alpha@hub.test\r\nSubject: top\r\n\r\nline 1\r\n.line 2 with a dot\r\nline 3\r\n" + b"z" * 76 + b"\r\n"
    ) + make_message(2 * CHUNK).split(b"\r\n\r\n", 1)[1]
    blob = hub.stored(send(hub, ["beta@hub.test"], message))
    head_end = blob.index(b"\r\n\r\n") + 4
    lines = blob[head_end:].split(b"\r\n")
    client = raw(hub)
    for n in (0, 1, 2, 3):
        assert client.command(f"TOP 1 {n}") == f"+OK {len(blob)} octets\r\n".encode()
        expected = blob[:head_end] + b"".join(line + b"\r\n" for line in lines[:n])
        assert client.block() == expected.replace(b"\n.", b"\n..")
    assert client.command("TOP 1 99999999").startswith(b"+OK")
    assert unstuff(client.block()) == blob  # more lines than the message has: all of it
    client.command("QUIT")
    p = pop(hub)
    _, top_lines, _ = p.top(1, 2)
    assert b"".join(line + b"\r\n" for line in top_lines) == blob[:head_end] + b"line 1\r\n.line 2 with a dot\r\n"
    p.quit()


def test_dele_rset_and_deletion_only_in_the_update_state(hub):
    qids = [send(hub, ["beta@hub.test"], make_message(1500, subject=f"d{i}")) for i in range(3)]
    ranges = [message_range(hub, q) for q in qids]
    client = raw(hub)
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command("STAT").startswith(b"+OK 2 ")
    assert client.command("LIST 1") == b"-ERR message 1 already deleted\r\n"
    assert client.command("RETR 1") == b"-ERR message 1 already deleted\r\n"
    assert client.command("TOP 1 0") == b"-ERR message 1 already deleted\r\n"
    assert client.command("DELE 1") == b"-ERR message 1 already deleted\r\n"
    assert client.command("LIST").startswith(b"+OK maildrop has 2 messages")
    assert client.block().startswith(b"2 ")
    assert client.command("RSET").startswith(b"+OK maildrop has 3 messages")
    client.command("DELE 2")
    client.command("DELE 3")
    client.close()  # no QUIT: no UPDATE, nothing deleted

    client = login_when_free(hub)
    assert client.command("STAT").startswith(b"+OK 3 ")
    assert client.command("DELE 2") == b"+OK message 2 deleted\r\n"
    assert client.command("NOOP") == b"+OK\r\n"
    assert client.command("QUIT") == b"+OK hub.test POP3 server signing off (2 messages left)\r\n"
    assert client.rest() == b""

    client = raw(hub)
    assert client.command("STAT").startswith(b"+OK 2 ")
    client.command("QUIT")
    assert released(ranges[1]) and not released(ranges[0]) and not released(ranges[2])
    assert hub.query("SELECT count(*) FROM messages WHERE queue_id = ?", qids[1]) == [(0,)]
    assert hub.query("SELECT count(*) FROM blob_trash") == [(0,)]
    assert hub.query("SELECT count(*) FROM blob_holes") == [(0,)]


def test_bad_input_gets_err_replies_and_never_a_traceback(hub):
    send(hub, ["beta@hub.test"], make_message(1000))
    client = raw(hub, user=None)
    for line, reply in (
        ("FOO", b"-ERR unknown command"),
        ("", b"-ERR unknown command"),
        ("STAT", b"-ERR STAT not allowed before login"),
        ("RETR 1", b"-ERR RETR not allowed before login"),
        ("PASS x", b"-ERR PASS must follow USER"),
        ("USER", b"-ERR USER requires exactly one argument"),
        ("CAPA x", b"-ERR CAPA takes no arguments"),
        ("STLS", b"-ERR STLS not available"),
        (b"NO\x00OP", b"-ERR invalid characters in command"),
        (b"USER \xff\xfe", b"-ERR user name is not valid UTF-8"),
        (b"NOOP " + b"x" * 5000, b"-ERR line too long"),
    ):
        assert client.command(line) == reply + b"\r\n", line
    assert client.login("beta").startswith(b"+OK maildrop has 1 messages")
    for line, reply in (
        ("USER beta", b"-ERR USER not allowed after login"),
        ("AUTH PLAIN", b"-ERR AUTH not allowed after login"),
        ("RETR 0", b"-ERR no such message"),
        ("RETR 2", b"-ERR no such message"),
        ("RETR x", b"-ERR no such message"),
        ("RETR -1", b"-ERR no such message"),
        ("RETR 99999999999999999999999", b"-ERR no such message"),
        ("RETR", b"-ERR RETR requires one message number"),
        ("RETR 1 2", b"-ERR RETR requires one message number"),
        ("TOP 1", b"-ERR TOP requires a message number and a line count"),
        ("TOP 1 x", b"-ERR invalid line count"),
        ("TOP 9 1", b"-ERR no such message"),
        ("LIST 9", b"-ERR no such message"),
        ("UIDL 0", b"-ERR no such message"),
        ("DELE 9", b"-ERR no such message"),
        ("STAT 1", b"-ERR STAT takes no arguments"),
        ("LIST 1 2", b"-ERR too many arguments"),
        ("QUIT now", b"-ERR QUIT takes no arguments"),
        (b"x" * 100_000, b"-ERR line too long"),
    ):
        assert client.command(line) == reply + b"\r\n", line
    assert client.command("noop") == b"+OK\r\n"  # the session goes on; verbs are case-insensitive
    assert client.command("QUIT").startswith(b"+OK")
    assert_no_traceback(hub)


def test_pipelined_commands_are_answered_in_order(hub):
    message = make_message(5000)
    send(hub, ["beta@hub.test"], message)
    client = raw(hub, user=None)
    client.send(f"USER beta\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nFOO\r\nUIDL 1\r\nDELE 1\r\nQUIT\r\n".encode())
    assert client.line() == b"+OK send PASS\r\n"
    assert client.line().startswith(b"+OK maildrop has 1 messages")
    assert client.line().startswith(b"+OK 1 ")
    assert client.line().startswith(b"+OK ") and strip_trace(unstuff(client.block())) == message
    assert client.line() == b"-ERR unknown command\r\n"
    assert client.line().startswith(b"+OK 1 ")
    assert client.line() == b"+OK message 1 deleted\r\n"
    assert client.line() == b"+OK hub.test POP3 server signing off (0 messages left)\r\n"


def test_the_maildrop_is_a_snapshot_taken_at_login(hub):
    first = make_message(1200, subject="before")
    send(hub, ["beta@hub.test"], first)
    client = pop(hub)
    later = make_message(1300, subject="during")
    send(hub, ["beta@hub.test"], later)
    assert client.stat()[0] == 1 and len(client.list()[1]) == 1
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.retr(2)
    client.dele(1)
    client.quit()
    client = pop(hub)
    assert client.stat()[0] == 1 and strip_trace(retr(client, 1)) == later  # arrived during, kept
    client.quit()


def test_sites_cannot_see_or_delete_each_others_mail(hub):
    to_beta = make_message(2000, subject="for beta")
    to_alpha = make_message(2100, subject="for alpha")
    to_both = make_message(2200, subject="for both")
    send(hub, ["beta@hub.test"], to_beta)
    send(hub, ["alpha@hub.test"], to_alpha, login="beta")
    shared = message_range(hub, send(hub, ["alpha@hub.test", "b2@hub.test"], to_both))

    beta = pop(hub, "beta")
    assert beta.stat()[0] == 2
    assert [strip_trace(retr(beta, n)) for n in (1, 2)] == [to_beta, to_both]
    with pytest.raises(poplib.error_proto):
        beta.dele(3)  # alpha's own mail has no number in beta's maildrop
    beta.dele(1)
    beta.dele(2)
    beta.quit()
    assert not released(shared)  # alpha still refers to the single stored copy

    alpha = pop(hub, "alpha")
    assert alpha.stat()[0] == 2
    assert [strip_trace(retr(alpha, n)) for n in (1, 2)] == [to_alpha, to_both]
    alpha.dele(2)
    alpha.quit()
    assert released(shared)  # the last reference went: the bytes are freed
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]


# ---- download totals ---------------------------------------------------------------------------


def test_download_totals_are_recorded_per_site_and_shown(hub):
    blobs = [hub.stored(send(hub, ["beta@hub.test"], make_message(s))) for s in (4000, 90_000)]
    header_size = blobs[0].index(b"\r\n\r\n") + 4
    assert site_json(hub, "beta")["downloads"] == {
        "sessions": 0,
        "messages": 0,
        "bytes": 0,
        "send_seconds": 0.0,
        "first_poll_at": None,
        "last_poll_at": None,
    }
    before = time.time()
    client = pop(hub)
    retr(client, 1)
    retr(client, 2)
    client.top(1, 0)
    client.dele(1)
    client.quit()
    d = site_json(hub, "beta")["downloads"]
    assert (d["sessions"], d["messages"], d["bytes"]) == (1, 2, len(blobs[0]) + len(blobs[1]) + header_size)
    assert 0 < d["send_seconds"] < 10
    assert d["first_poll_at"] == d["last_poll_at"]
    assert abs(time.mktime(time.strptime(d["last_poll_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone - before) < 5

    client = raw(hub)  # a session that ends without QUIT is counted too
    client.retr(1)
    client.close()
    d = wait_for(
        lambda: (lambda d: d if d["sessions"] == 2 else None)(site_json(hub, "beta")["downloads"]),
        interval=0.05,
        message="2 download sessions counted for beta",
    )
    assert (d["messages"], d["bytes"]) == (3, len(blobs[0]) + 2 * len(blobs[1]) + header_size)
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]  # nothing deleted by that one

    text = hub.cli("site", "show", "beta").stdout
    assert re.search(r"^downloads: 3 mail\(s\), .* in 2 session\(s\), .*/s while sending$", text, re.M), text
    assert re.search(r"^last poll: \d{4}-\d\d-\d\dT", text, re.M), text
    assert "downloads: never polled" in hub.cli("site", "show", "alpha").stdout
    assert site_json(hub, "alpha")["downloads"]["sessions"] == 0


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_hub(make_hub, tmp_path):
    cert, key = make_cert(tmp_path)
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
        MAILHUB_POP3_POP3S_LISTEN="127.0.0.1:0",
    )
    hub.start()
    hub.client_context = ssl.create_default_context(cafile=str(cert))
    return hub


def test_stls_upgrades_the_session_and_messages_come_through_exact(tls_hub):
    hub = tls_hub
    sent = [make_message(3000), make_message(3 * CHUNK), make_message(2 * CHUNK) + b".dotted\r\n"]
    for m in sent:
        send(hub, ["beta@hub.test"], m)
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    assert "STLS" in client.capa()
    assert client.stls(hub.client_context).startswith(b"+OK")
    assert "STLS" not in client.capa() and "USER" in client.capa()
    with pytest.raises(poplib.error_proto, match="TLS already active"):
        client._shortcmd("STLS")
    client.user("beta")
    client.pass_(PASSWORD)
    assert [strip_trace(retr(client, n)) for n in (1, 2, 3)] == sent
    client.quit()
    wait_for(  # TLS: copied
        lambda: re.search(r" retrieved=3 .* direct=0 ", hub.log_text()),
        message=lambda: f"session line with retrieved=3 direct=0\n{hub.log_text()[-2000:]}",
    )
    assert_no_traceback(hub)


def test_commands_pipelined_behind_stls_are_discarded(tls_hub):
    hub = tls_hub
    sock = socket.create_connection(("127.0.0.1", hub.ports["pop3"]), timeout=30)
    sock.recv(1000)
    sock.sendall(b"STLS\r\nUSER beta\r\n")  # injected before the handshake (RFC 2595 sec. 4)
    assert sock.recv(1000) == b"+OK Begin TLS negotiation\r\n"
    tls = hub.client_context.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(f"PASS {PASSWORD}\r\n".encode())
    assert tls.recv(1000) == b"-ERR PASS must follow USER\r\n"
    tls.close()


def test_pop3s_serves_over_implicit_tls(tls_hub):
    hub = tls_hub
    message = make_message(2 * CHUNK + 777) + b"..two dots\r\n"
    send(hub, ["beta@hub.test"], message)
    client = poplib.POP3_SSL("127.0.0.1", hub.ports["pop3s"], context=hub.client_context, timeout=60)
    assert "STLS" not in client.capa() and "USER" in client.capa()
    client.user("beta")
    client.pass_(PASSWORD)
    assert strip_trace(retr(client, 1)) == message
    client.dele(1)
    client.quit()
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]


def test_plaintext_login_is_refused_off_loopback_unless_tls_or_allowed(make_hub, tmp_path):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    cert, key = make_cert(tmp_path)
    hub = make_hub(
        sites=BETA, MAILHUB_TLS_CERT_FILE=str(cert), MAILHUB_TLS_KEY_FILE=str(key), MAILHUB_POP3_LISTEN=f"{ip}:0"
    )
    hub.start()
    client = RawPop3(hub.ports["pop3"], host=ip)
    assert client.command("CAPA") == b"+OK Capability list follows\r\n"
    caps = client.block()
    assert b"STLS\r\n" in caps and b"USER" not in caps and b"SASL" not in caps
    assert client.command("USER beta") == b"-ERR [AUTH] plaintext login refused; use STLS\r\n"
    assert client.auth_plain("beta") == b"-ERR [AUTH] plaintext login refused; use STLS\r\n"
    client.close()
    p = poplib.POP3(ip, hub.ports["pop3"], timeout=30)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names 127.0.0.1, not this address
    p.stls(context)
    p.user("beta")
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()
    hub.stop()

    hub.env["MAILHUB_AUTH_ALLOW_PLAINTEXT"] = "true"
    hub.start()
    client = RawPop3(hub.ports["pop3"], host=ip)
    assert client.login("beta").startswith(b"+OK maildrop has 0 messages")
    client.command("QUIT")


# ---- limits ------------------------------------------------------------------------------------


def test_idle_sessions_are_closed_without_reply_and_release_the_mailbox(make_hub):
    hub = make_hub(sites=BETA, MAILHUB_POP3_IDLE_TIMEOUT="1")
    hub.start()
    client = raw(hub)
    started = time.monotonic()
    assert client.rest(timeout=10) == b""  # RFC 1939: close without a response
    assert 0.9 < time.monotonic() - started < 5
    login_when_free(hub).command("QUIT")
    assert "outcome=idle timeout" in hub.log_text()


def test_connections_over_the_limit_are_refused(make_hub):
    hub = make_hub(MAILHUB_POP3_MAX_CONNECTIONS="2")
    hub.start()
    first, second = RawPop3(hub.ports["pop3"]), RawPop3(hub.ports["pop3"])
    third = RawPop3(hub.ports["pop3"])
    assert third.greeting == b"-ERR [SYS/TEMP] too many connections, try again later\r\n" and third.rest() == b""
    first.command("QUIT")
    wait_for(
        lambda: (lambda c: c if c.greeting.startswith(b"+OK") else None)(RawPop3(hub.ports["pop3"])),
        interval=0.05,
        message="+OK greeting once a session has ended",
    )
    second.close()


@pytest.mark.one_engine("about the socket's flow control, not the index")
def test_a_client_that_stops_reading_mid_message_is_dropped(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_POP3_IDLE_TIMEOUT="1")
    hub.start()
    plain = make_message(12 * CHUNK)  # more than the socket buffers on both sides hold
    dotted = make_message(12 * CHUNK) + b".dot\r\n"
    send(hub, ["beta@hub.test"], plain)
    send(hub, ["beta@hub.test"], dotted)
    for n in (1, 2):  # sendfile worker, then the copying path
        client = raw(hub, rcvbuf=65536)
        client.send(f"RETR {n}\r\n".encode())  # then read nothing
        wait_for(
            lambda: hub.log_text().count("outcome=idle timeout") >= n,
            message=lambda: f"{n} idle timeout(s) logged\n{hub.log_text()[-2000:]}",
        )
        client.close()
    client = login_when_free(hub)
    assert strip_trace(client.retr(1)) == plain and strip_trace(client.retr(2)) == dotted
    client.command("QUIT")
    assert_no_traceback(hub)


def test_a_client_vanishing_mid_message_leaves_the_hub_healthy(hub):
    big = make_message(40 * CHUNK)
    send(hub, ["beta@hub.test"], big)
    send(hub, ["beta@hub.test"], big + b".x\r\n")
    for n in (1, 2):
        client = login_when_free(hub)
        client.send(f"RETR {n}\r\n".encode())
        client.sock.recv(CHUNK)
        linger_reset(client.sock)
        client.close()
    client = login_when_free(hub)
    assert client.retr(1) == client.retr(1)  # twice in one session, same bytes
    client.command("QUIT")
    assert_no_traceback(hub)


@pytest.mark.one_engine("about the serve process's memory, not the index")
def test_sending_stays_within_bounded_memory_whatever_the_message_size(process_hub):
    """Peak RSS of the hub while it sends 2 x 100 MB (zero-copy and dot-stuffed copying)."""
    hub = process_hub
    send(hub, ["beta@hub.test"], make_message(100 * CHUNK))
    send(hub, ["beta@hub.test"], make_message(100 * CHUNK) + b".dot\r\n")
    status = f"/proc/{hub.proc.pid}/status"
    with open(f"/proc/{hub.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    client = raw(hub)
    sizes = [len(client.retr(n)) for n in (1, 2)]
    client.command("QUIT")
    fields = dict(line.split(":", 1) for line in open(status).read().splitlines())
    peak_mb = int(fields["VmHWM"].split()[0]) / 1024
    rss_mb = int(fields["VmRSS"].split()[0]) / 1024
    assert min(sizes) > 100 * CHUNK
    assert peak_mb < rss_mb + 40, (peak_mb, rss_mb)
    wait_for(  # the first only
        lambda: re.search(r" retrieved=2 .* direct=1 ", hub.log_text()),
        message=lambda: f"session line with retrieved=2 direct=1\n{hub.log_text()[-2000:]}",
    )


# ---- shutdown and crashes ----------------------------------------------------------------------


@pytest.mark.one_engine("about the process's SIGTERM handling, not the index")
def test_sigterm_ends_sessions_and_deletes_nothing_without_quit(process_hub):
    hub = process_hub
    message = make_message(2000)
    send(hub, ["beta@hub.test"], message)
    client = raw(hub)
    client.command("DELE 1")
    assert hub.stop(signal.SIGTERM) == 0
    assert client.rest() == b""
    hub.in_process_from_now_on().start()
    client = raw(hub)
    assert client.command("STAT").startswith(b"+OK 1 ")
    assert strip_trace(client.retr(1)) == message
    client.command("QUIT")


def test_a_crash_mid_session_loses_no_mail(process_hub):
    hub = process_hub
    message = make_message(2000)
    send(hub, ["beta@hub.test"], message)
    client = raw(hub)
    client.command("DELE 1")
    hub.kill()
    client.close()
    hub.in_process_from_now_on().start()
    client = raw(hub)
    assert strip_trace(client.retr(1)) == message
    client.command("QUIT")


def test_a_crash_between_the_delete_commit_and_the_unlink_leaves_no_orphan(process_hub):
    """The state after Storage.delete committed (blob in blob_trash) but before the file was removed
    is made with the hub stopped by SIGKILL; the restart must remove the file and keep the rest.
    The deleted mail is large enough for a file of its own (small ones share packs)."""
    hub = process_hub
    gone = send(hub, ["beta@hub.test"], make_message(3 * CHUNK, subject="deleted"))
    kept_message = make_message(3000, subject="kept")
    kept = send(hub, ["beta@hub.test"], kept_message)
    gone_blob, kept_blob = blob_path(hub, gone), blob_path(hub, kept)
    hub.kill()
    conn = hub.db()
    conn.execute("DELETE FROM mailbox WHERE queue_id = ?", (gone,))  # what the UPDATE commits
    conn.commit()
    conn.close()
    assert hub.query("SELECT count(*) FROM blob_trash") == [(1,)] and gone_blob.exists()
    hub.in_process_from_now_on().start()
    assert not gone_blob.exists() and kept_blob.exists()
    assert hub.query("SELECT count(*) FROM blob_trash") == [(0,)]
    assert "1 freed blob(s) removed" in hub.log_text()
    client = raw(hub)
    assert client.command("STAT").startswith(b"+OK 1 ")
    assert strip_trace(client.retr(1)) == kept_message
    client.command("QUIT")
    assert sorted(hub.blob_files()) == [kept_blob]


def test_sessions_and_ingest_run_concurrently_without_losing_or_duplicating_mail(hub):
    """Deletions (UPDATE) and the ingest's commits share one index connection."""
    sent: dict[str, list[bytes]] = {"alpha": [], "beta": []}
    got: dict[str, list[bytes]] = {"alpha": [], "beta": []}
    stop = threading.Event()
    errors = []

    def sender(site: str, other: str):
        try:
            for i in range(25):
                message = make_message(5000 + i, subject=f"{site}-{i}")
                send(hub, [f"{other}@hub.test"], message, login=site)
                sent[other].append(message)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def poller(site: str):
        try:
            while True:
                done = stop.is_set()
                client = login_when_free(hub, site)
                count = int(client.command("STAT").split()[1])
                for n in range(1, count + 1):
                    got[site].append(strip_trace(client.retr(n)))
                    assert client.command(f"DELE {n}").startswith(b"+OK")
                assert client.command("QUIT").startswith(b"+OK")
                client.close()
                if done:
                    return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=sender, args=("alpha", "beta")),
        threading.Thread(target=sender, args=("beta", "alpha")),
    ]
    pollers = [threading.Thread(target=poller, args=(s,)) for s in ("alpha", "beta")]
    for t in threads + pollers:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in pollers:
        t.join()
    assert not errors, errors
    for site in ("alpha", "beta"):
        assert sorted(got[site]) == sorted(sent[site])
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)] and hub.blob_files() == []
    assert_no_traceback(hub)

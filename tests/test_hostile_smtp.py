# Hostile and broken SMTP clients over real loopback sockets: every malformed command, address,
# parameter and AUTH exchange gets its exact 5xx reply with an enhanced code and the session then
# still carries a valid transaction; long body lines are refused at the end of the data; every
# transaction that ends without a reply leaves one log line; a flood of junk leaves a good gateway
# served within 1 s; hundreds of sessions stalled mid-DATA do not grow the hub past its memory budget.
import base64
import concurrent.futures
import hashlib
import poplib
import re
import signal
import socket
import threading
import time
import urllib.request
import zlib

import pytest

from bench.ingest_benchmark import vm_status

from conftest import ALPHA_BETA, PASSWORD, Hub, RawSMTP, hub_env, make_message, queue_id_from, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

MB = 1024 * 1024
PEER = {"MAILHUB_SMTP_PEER_NETWORKS": "127.0.0.0/8"}  # loopback delivers to local sites without AUTH


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory):
    """One hub for the table of malformed inputs (each case on a connection of its own). After the
    last test that used it, whatever the order they ran in, its log shows that nothing reached the
    internal-error path (an error at this fixture's teardown otherwise)."""
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    hub = Hub(data_dir, hub_env(data_dir, MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1000", **PEER))
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.start()
    yield hub
    try:
        text = hub.log_text()
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    finally:
        hub.stop(signal.SIGKILL)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


MAIL = b"MAIL FROM:<alpha@hub.test>"
RCPT = b"RCPT TO:<beta@hub.test>"
LONG_LOCAL = b"a" * 65
# (what is sent, as (bytes, expected reply) steps; the last step is the malformed input; CRLF is
# added to bytes that do not end with one)
CASES = {
    "empty line": [(b"", b"500 5.5.2")],
    "spaces only": [(b"    ", b"500 5.5.2")],
    "NUL alone": [(b"\x00", b"500 5.5.2")],
    "NUL in verb": [(b"NO\x00OP", b"500 5.5.2")],
    "NUL in argument": [(MAIL + b"\x00", b"500 5.5.2")],
    "escape sequence": [(b"NOOP \x1b[2J", b"500 5.5.2")],
    "lone CR inside": [(MAIL + b"\r" + RCPT, b"500 5.5.2")],
    "invalid UTF-8 verb": [(b"\xff\xfe\xfd", b"500 5.5.2")],
    "8-bit address": [(b"MAIL FROM:<\xc3\xa9t\xc3\xa9@hub.test>", b"501 5.5.4")],
    "invalid UTF-8 argument": [(b"HELO \xff\xfe", b"501 5.5.4")],
    "unknown verb": [(b"FOO bar", b"500 5.5.1")],
    "verb too long": [(b"A" * 40, b"500 5.5.2")],
    "verb glued to argument": [(b"MAILFROM:<alpha@hub.test>", b"500 5.5.2")],
    "line over max_line_length": [(b"NOOP " + b"x" * 3000, b"500 5.5.6")],
    "line over the reader buffer": [(b"NOOP " + b"x" * 600_000, b"500 5.5.6")],
    "HELO without name": [(b"HELO", b"501 5.5.4")],
    "EHLO without name": [(b"EHLO", b"501 5.5.4")],
    "EHLO with two words": [(b"EHLO a b", b"501 5.5.4")],
    "EHLO name too long": [(b"EHLO " + b"a" * 300, b"501 5.5.4")],
    "MAIL without argument": [(b"MAIL", b"501 5.5.4")],
    "MAIL TO:": [(b"MAIL TO:<alpha@hub.test>", b"501 5.5.4")],
    "MAIL FROM: empty": [(b"MAIL FROM:", b"501 5.1.3")],
    "path without closing bracket": [(b"MAIL FROM:<alpha@hub.test", b"501 5.1.3")],
    "path without opening bracket": [(b"MAIL FROM:alpha@hub.test>", b"501 5.1.3")],
    "path with parameters glued": [(b"MAIL FROM:<alpha@hub.test>SIZE=10", b"501 5.1.3")],
    "doubled brackets": [(b"MAIL FROM:<<alpha@hub.test>>", b"501 5.1.3")],
    "no domain": [(b"MAIL FROM:<alpha@>", b"501 5.1.3")],
    "no local part": [(b"MAIL FROM:<@hub.test>", b"501 5.1.3")],
    "empty label": [(b"MAIL FROM:<alpha@hub..test>", b"501 5.1.3")],
    "local part too long": [(b"MAIL FROM:<" + LONG_LOCAL + b"@hub.test>", b"501 5.1.3")],
    "path too long": [(b"MAIL FROM:<a@" + b"b." * 130 + b"test>", b"501 5.1.3")],
    "bad address literal": [(b"MAIL FROM:<alpha@[300.1.1.1]>", b"501 5.1.3")],
    "bad IPv6 literal": [(b"MAIL FROM:<alpha@[IPv6:zz::]>", b"501 5.1.3")],
    "unterminated quoted local part": [(b'MAIL FROM:<"alpha@hub.test>', b"501 5.1.3")],
    "SIZE not a number": [(MAIL + b" SIZE=abc", b"501 5.5.4")],
    "SIZE negative": [(MAIL + b" SIZE=-1", b"501 5.5.4")],
    "SIZE without value": [(MAIL + b" SIZE=", b"501 5.5.4")],
    "SIZE of 40 digits": [(MAIL + b" SIZE=" + b"9" * 40, b"501 5.5.4")],
    "SIZE of 5000 digits": [(MAIL + b" SIZE=" + b"9" * 5000, b"500 5.5.6")],
    "SIZE twice": [(MAIL + b" SIZE=1 SIZE=2", b"501 5.5.4")],
    "BODY=BINARYMIME": [(MAIL + b" BODY=BINARYMIME", b"501 5.5.4")],
    "parameter without keyword": [(MAIL + b" =1", b"501 5.5.4")],
    "unknown parameter": [(MAIL + b" FOO=BAR", b"555 5.5.4")],
    "RCPT without argument": [(MAIL, b"250 2.1.0"), (b"RCPT", b"501 5.5.4")],
    "RCPT FROM:": [(MAIL, b"250 2.1.0"), (b"RCPT FROM:<beta@hub.test>", b"501 5.5.4")],
    "RCPT null path": [(MAIL, b"250 2.1.0"), (b"RCPT TO:<>", b"501 5.1.3")],
    "RCPT without closing bracket": [(MAIL, b"250 2.1.0"), (b"RCPT TO:<beta@hub.test", b"501 5.1.3")],
    "RCPT with a parameter": [(MAIL, b"250 2.1.0"), (RCPT + b" NOTIFY=NEVER", b"555 5.5.4")],
    "DATA with an argument": [(MAIL, b"250 2.1.0"), (RCPT, b"250 2.1.5"), (b"DATA now", b"501 5.5.4")],
    "RSET with an argument": [(b"RSET all", b"501 5.5.4")],
    "QUIT with an argument": [(b"QUIT now", b"501 5.5.4")],
    "STARTTLS with an argument": [(b"STARTTLS now", b"501 5.5.4")],
    "VRFY without argument": [(b"VRFY", b"501 5.5.4")],
    "HELP of an unknown command": [(b"HELP FOO", b"501 5.5.4")],
    "BDAT without size": [(b"BDAT", b"501 5.5.4")],
    "BDAT size not a number": [(b"BDAT ten", b"501 5.5.4")],
    "BDAT negative size": [(b"BDAT -5", b"501 5.5.4")],
    "BDAT size out of range": [(b"BDAT " + b"9" * 30, b"501 5.5.4")],
    "BDAT bad keyword (chunk skipped)": [(b"BDAT 5 FIRST\r\nabc\r\n", b"501 5.5.4")],
    "BDAT extra word (chunk skipped)": [(b"BDAT 3 LAST now\r\na\r\n", b"501 5.5.4")],
    "BDAT without transaction": [(b"BDAT 3 LAST\r\na\r\n", b"503 5.5.1")],
    "AUTH without mechanism": [(b"AUTH", b"501 5.5.4")],
    "AUTH unknown mechanism": [(b"AUTH CRAM-MD5", b"504 5.5.4")],
    "AUTH mechanism of junk": [(b"AUTH \x7f\x7f", b"500 5.5.2")],
    "AUTH too many words": [(b"AUTH PLAIN a b", b"501 5.5.4")],
    "AUTH PLAIN garbage base64": [(b"AUTH PLAIN !!!!", b"501 5.5.2")],
    "AUTH PLAIN bad padding": [(b"AUTH PLAIN YQ=", b"501 5.5.2")],
    "AUTH PLAIN empty response": [(b"AUTH PLAIN =", b"501 5.5.2")],
    "AUTH PLAIN two fields": [(b"AUTH PLAIN " + b64(b"alpha\0" + PASSWORD.encode()), b"501 5.5.2")],
    "AUTH PLAIN four fields": [(b"AUTH PLAIN " + b64(b"\0alpha\0pw\0x"), b"501 5.5.2")],
    "AUTH PLAIN cancelled": [(b"AUTH PLAIN", b"334 "), (b"*", b"501 5.0.0")],
    "AUTH PLAIN garbage response": [(b"AUTH PLAIN", b"334 "), (b"%%%%", b"501 5.5.2")],
    "AUTH PLAIN response too long": [(b"AUTH PLAIN", b"334 "), (b"QUFB" * 2000, b"500 5.5.6")],
    "AUTH PLAIN response over the buffer": [(b"AUTH PLAIN", b"334 "), (b"QUFB" * 100_000, b"500 5.5.6")],
    "AUTH LOGIN cancelled at user": [(b"AUTH LOGIN", b"334 "), (b"*", b"501 5.0.0")],
    "AUTH LOGIN cancelled at password": [(b"AUTH LOGIN", b"334 "), (b64(b"alpha"), b"334 "), (b"*", b"501 5.0.0")],
    "AUTH LOGIN garbage password": [(b"AUTH LOGIN " + b64(b"alpha"), b"334 "), (b"\x00\x01", b"501 5.5.2")],
    "AUTH before EHLO": "no-ehlo",
    "pipelined junk": [(b"FOO\r\n\x00\r\nMAIL FROM:<x\r\nNOOP", b"500 5.5.1\r\n500 5.5.2\r\n501 5.1.3\r\n250")],
}


def _steps_for(name):
    steps = CASES[name]
    if steps == "no-ehlo":
        return None
    return steps


def _valid_transaction(client: RawSMTP) -> str:
    """A whole transaction on the session (it must still be usable); the queue ID."""
    assert client.command("RSET").startswith(b"250 2.0.0")
    assert client.command(MAIL).startswith(b"250 2.1.0")
    assert client.command(RCPT).startswith(b"250 2.1.5")
    assert client.command("DATA").startswith(b"354")
    client.send(make_message(3000) + b".\r\n")
    return queue_id_from(client.reply())


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_gets_its_reply_and_the_session_stays_usable(shared_hub, name):
    client = RawSMTP(shared_hub.smtp_port)
    steps = _steps_for(name)
    if steps is None:  # AUTH before EHLO (and after HELO): 503, then the session goes on
        assert client.command("AUTH PLAIN " + b64(b"\0alpha\0" + PASSWORD.encode()).decode()).startswith(b"503 5.5.1")
        assert client.command("HELO gw.test").startswith(b"250")
        assert client.command("AUTH PLAIN").startswith(b"503 5.5.1")
    else:
        client.ehlo()
        for data, expected in steps:
            client.send(data if data.endswith(b"\r\n") else data + b"\r\n")
            reply = b"".join(client.reply() for _ in range(expected.count(b"\r\n") + 1))
            got = [line[: len(want)] for line, want in zip(reply.split(b"\r\n"), expected.split(b"\r\n"))]
            assert got == expected.split(b"\r\n"), (name, reply)
            assert reply.isascii() and not re.search(rb"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]", reply), reply
    client.ehlo()
    _valid_transaction(client)
    client.close()


def test_too_many_errors_close_the_session(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_SMTP_MAX_BAD_COMMANDS="3", **PEER).start()
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.command("FOO").startswith(b"500 5.5.1")
    assert client.command("MAIL FROM:<x").startswith(b"501 5.1.3")
    assert client.command("NOOP").startswith(b"250")  # good commands are not errors
    client.send(b"\x00\r\n")
    assert (
        client.rest() == b"500 5.5.2 Syntax error, command unrecognized\r\n"
        b"421 4.7.0 Too many errors, closing connection\r\n"
    )
    client.close()


# ---- long body lines -----------------------------------------------------------------------


def _lines_message(line_length: int) -> bytes:
    head = b"From: alpha@hub.test\r\nSubject: long line\r\n\r\n"
    return head + b"short\r\n" + b"x" * line_length + b"\r\n" + b"end\r\n"


def test_body_lines_over_998_characters_are_refused_at_the_end_of_data(shared_hub):
    client = RawSMTP(shared_hub.smtp_port)
    client.ehlo()
    for length, expected in ((998, b"250 2.0.0"), (999, b"554 5.6.0"), (200_000, b"554 5.6.0")):
        assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(_lines_message(length) + b".\r\n")
        assert client.reply().startswith(expected), length
    # BDAT: the long line straddles two chunks
    message = _lines_message(1500)
    split = message.index(b"x" * 10) + 700
    assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
    client.send(b"BDAT %d\r\n" % split + message[:split])
    assert client.reply().startswith(b"250 2.0.0 %d octets" % split)
    client.send(b"BDAT %d LAST\r\n" % (len(message) - split) + message[split:])
    assert client.reply().startswith(b"554 5.6.0")
    _valid_transaction(client)
    client.close()
    accepted = shared_hub.query("SELECT count(*) FROM messages WHERE size > 1000 AND size < 1400")
    assert accepted == [(1,)]  # the 998-character line's mail only


def _body_with_long_line(size: int, at: int, line_length: int = 1200) -> bytes:
    """A body of `size` octets of 76-character lines with one line of `line_length` characters
    starting at about offset `at`."""
    line = b"A" * 76 + b"\r\n"
    before = line * (at // len(line))
    long_line = b"L" * line_length + b"\r\n"
    after = line * ((size - len(before) - len(long_line)) // len(line) + 1)
    return (before + long_line + after)[: size - 2] + b"\r\n"


def _data_replies(client: RawSMTP, cases) -> list[str]:
    """Each (size, offset of the long line or None for 998-character lines only, expected reply)
    sent with DATA; the queue IDs of the mails stored (checked: intact, with their digests)."""
    head = b"From: alpha@hub.test\r\nSubject: long line\r\n\r\n"
    stored = []
    for size, at, expected in cases:
        body = _body_with_long_line(size, at) if at is not None else _body_with_long_line(size, 1000, 998)
        assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(head + body + b".\r\n")
        reply = client.reply()
        assert reply.startswith(expected), (size, at, reply)
        if at is None:
            stored.append((queue_id_from(reply), head + body))
    return stored


def _check_stored(hub, stored) -> None:
    for queue_id, data in stored:
        blob = hub.stored(queue_id)
        assert blob.endswith(data)
        assert hub.query("SELECT sha256, crc32 FROM messages WHERE queue_id = ?", queue_id) == [
            (hashlib.sha256(blob).hexdigest(), zlib.crc32(blob))
        ]
    spool = hub.data_dir / "spool"
    wait_for(lambda: not [p for p in spool.iterdir() if p.name.endswith(".tmp")], message="spool files left")


def test_long_lines_in_big_mails_get_the_same_reply_checked_off_the_event_loop(make_hub):
    """A line too long in a mail held in memory, in one streamed to its own file (over 2 MiB), before
    and after the size limit was passed, and at a BDAT chunk that is not the last: the replies of the
    check made as the data comes (a line too long before the limit: 554 even when the mail then
    grows too big)."""
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_SMTP_MAX_MESSAGE_SIZE="3000000", **PEER).start()
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    stored = _data_replies(
        client,
        [
            (1 * MB, 900_000, b"554 5.6.0"),  # held in memory: checked where it is hashed
            (2_900_000, 2_800_000, b"554 5.6.0"),  # streamed to its file: checked in the write jobs
            (2_900_000, 100_000, b"554 5.6.0"),
            (4 * MB, 3_500_000, b"552 5.3.4"),  # too big first: the size's reply
            (2_900_000, None, b"250 2.0.0"),  # 998-character lines only: streamed
            (1 * MB, None, b"250 2.0.0"),  # and held in memory (hashed where its lines were checked)
        ],
    )
    # BDAT: a chunk (not the last) with a line too long is refused at once, as before (a series of
    # several chunks is checked on the loop); one chunk, the last, is checked like DATA
    head = b"Subject: long line\r\n\r\n"
    body = _body_with_long_line(300_000, 150_000)
    assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
    client.send(b"BDAT %d\r\n" % len(head + body) + head + body)
    assert client.reply().startswith(b"554 5.6.0")
    _valid_transaction(client)
    body = _body_with_long_line(1 * MB, 700_000)
    assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
    client.send(b"BDAT %d LAST\r\n" % len(head + body) + head + body)
    assert client.reply().startswith(b"554 5.6.0")
    _valid_transaction(client)
    client.close()
    _check_stored(hub, stored)
    assert hub.query("SELECT count(*) FROM messages") == [(4,)]  # the two 998-character mails, _valid_transaction's
    # held in memory (under 2 MiB) when the size limit is passed: the line before it is the reply
    small = make_hub(sites=ALPHA_BETA, MAILHUB_SMTP_MAX_MESSAGE_SIZE="1500000", **PEER).start()
    client = RawSMTP(small.smtp_port)
    client.ehlo()
    _data_replies(client, [(1_900_000, 500_000, b"554 5.6.0"), (1_900_000, 1_600_000, b"552 5.3.4")])
    client.close()
    _check_stored(small, [])


# ---- transactions that end without a reply leave one log line ------------------------------


def _abort_lines(hub, queue_id=None):
    lines = [line for line in hub.log_text().splitlines() if "outcome=aborted" in line or "outcome=unanswered" in line]
    return [line for line in lines if queue_id is None or f"qid={queue_id}" in line]


@pytest.mark.one_engine("about the serve process's log lines, not the index")
def test_each_transaction_ending_without_a_reply_leaves_one_log_line(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA, process=True, MAILHUB_SMTP_IDLE_TIMEOUT="1", MAILHUB_SHUTDOWN_TIMEOUT="1", **PEER
    ).start()

    def open_transaction() -> RawSMTP:
        client = RawSMTP(hub.smtp_port)
        client.ehlo()
        assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
        return client

    gone = open_transaction()  # client gone mid-DATA
    assert gone.command("DATA").startswith(b"354")
    gone.send(b"Subject: x\r\n\r\n" + b"y" * 5000)
    gone.close()  # the hub reads what was sent before it sees the end
    line = wait_for(
        lambda: [entry for entry in _abort_lines(hub) if "reason='client closed'" in entry],
        message="an aborted line with reason='client closed'",
    )
    assert len(line) == 1 and "site=- from=<alpha@hub.test> rcpts=beta@hub.test received=5014" in line[0], line

    idle = open_transaction()  # idle timeout between two BDAT chunks
    idle.send(b"BDAT 4\r\nabcd")
    assert idle.reply().startswith(b"250 2.0.0 4 octets")
    assert idle.rest(5).startswith(b"421 4.4.2")
    line = wait_for(
        lambda: [entry for entry in _abort_lines(hub) if "reason='idle timeout'" in entry],
        message="an aborted line with reason='idle timeout'",
    )
    assert len(line) == 1 and "received=4 " in line[0]

    reset = open_transaction()  # RSET between BDAT chunks
    reset.send(b"BDAT 3\r\nabc")
    assert reset.reply().startswith(b"250")
    assert reset.command("RSET").startswith(b"250")
    line = wait_for(
        lambda: [entry for entry in _abort_lines(hub) if "reason='reset'" in entry],
        message="an aborted line with reason='reset'",
    )
    assert len(line) == 1 and "received=3 " in line[0]

    busy = open_transaction()  # shutdown while a DATA is being received
    assert busy.command("DATA").startswith(b"354")
    busy.send(b"Subject: x\r\n\r\n")

    def trickle():  # keeps the session busy (never idle) until the shutdown closes it
        try:
            while True:
                busy.send(b"z" * 100 + b"\r\n")
                time.sleep(0.05)
        except OSError:
            pass

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    hub.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: [entry for entry in _abort_lines(hub) if "reason='shutdown'" in entry],
        timeout=15,
        message="an aborted line with reason='shutdown'",
    )
    hub.proc.wait(15)
    sender.join(10)
    for client in (gone, idle, reset, busy):
        client.close()
    assert len(_abort_lines(hub)) == 4, _abort_lines(hub)
    assert "Traceback" not in hub.log_text()


# ---- a flood of junk, and a good gateway on another connection -------------------------------


def _good_gateway_round(hub) -> float:
    """Seconds for a good gateway to log in, submit a mail and download one over POP3. (The first
    login of a site hashes its password, about 0.2 s of CPU; each test makes one before its attack,
    as a gateway that has been working before the attack did.)"""
    started = time.monotonic()
    client = RawSMTP(hub.smtp_port, timeout=10)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(make_message(20_000) + b".\r\n")
    queue_id_from(client.reply())
    client.command("QUIT")
    client.close()
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=10)
    pop.user("beta")
    pop.pass_(PASSWORD)
    count, _ = pop.stat()
    assert count >= 1
    pop.retr(1)
    pop.quit()
    return time.monotonic() - started


JUNK = [
    b"\x00\x01\x02 junk",
    b"MAIL FROM:<" + b"a" * 500,
    b"AUTH PLAIN !!!",
    b"X" * 5000,
    b"RCPT TO:<>",
    b"BDAT x",
    b"EHLO " + b"\xff" * 100,
    b"\r\r\r",
    b"HELP " + b"?" * 200,
]


def test_a_flood_of_malformed_commands_leaves_a_good_gateway_served_within_a_second(make_hub):
    # The hub runs as a process of its own, as it does for real: run in this process, its event loop
    # shared the GIL with the eight flooding threads (a round took up to 1.44 s under two CPU hogs, 2
    # runs in 10 over the bound, where the same rounds without the flood took 0.03-0.16 s).
    hub = make_hub(sites=ALPHA_BETA, process=True, MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1000").start()
    _good_gateway_round(hub)
    stop = threading.Event()
    sent = [0]

    def flood():
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", hub.smtp_port), timeout=5)
                sock.sendall(b"EHLO flood\r\n" + b"\r\n".join(JUNK * 5) + b"\r\n")
                sent[0] += 1
                while sock.recv(65536):  # until the hub closes it (too many errors)
                    pass
                sock.close()
            except OSError:
                pass

    workers = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: sent[0] >= 20, message="20 flood sessions sent")
        rounds = [_good_gateway_round(hub) for _ in range(5)]
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    print(
        "good gateway rounds during the flood (s):",
        ", ".join(f"{r:.3f}" for r in rounds),
        f"; flood sessions: {sent[0]}",
    )
    assert max(rounds) < 1.0, rounds
    assert sent[0] >= 20
    text = hub.log_text()
    assert "Traceback" not in text and "internal error" not in text


def test_a_client_pipelining_thousands_of_commands_does_not_hold_the_event_loop(make_hub):
    hub = make_hub().start()
    count = 50_000  # 300 KB: more than the hub reads at once (256 KB); under smtp.max_commands
    flood = RawSMTP(hub.smtp_port)
    answered = [0]

    def read_replies():
        while answered[0] < count:
            data = flood.sock.recv(1 << 20)
            if not data:
                break
            answered[0] += data.count(b"\n")

    reader = threading.Thread(target=read_replies, daemon=True)
    reader.start()
    good = RawSMTP(hub.smtp_port)
    flood.send(b"NOOP\r\n" * count)
    times = []
    while reader.is_alive() or not times:
        started = time.monotonic()
        assert good.command("NOOP").startswith(b"250")
        times.append(time.monotonic() - started)
    reader.join()
    times.sort()
    median, worst = times[len(times) // 2], times[-1]
    print(
        f"{answered[0]} pipelined NOOPs answered; another session's {len(times)} NOOP round trips meanwhile:"
        f" median {median:.3f} s, worst {worst:.3f} s"
    )
    assert answered[0] == count
    # Without a turn of the loop every few commands each 256 KB read holds the loop ~0.5 s: the few
    # NOOPs of the other session would all wait that long. The median tells that from one round trip
    # slowed by a loaded machine (0.58 s once, with the suite on four workers).
    assert median < 0.1 and worst < 1.5, times


# ---- memory: hundreds of sessions stalled mid-DATA ------------------------------------------


def _rss(pid: int) -> int:
    return vm_status(pid, "VmRSS")


def _ingest_memory(hub) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    values = dict(re.findall(r"^mailhub_ingest_memory_(\w+?)(?:_bytes|_total)? (\S+)$", text, re.M))
    return {name: float(value) for name, value in values.items()}


@pytest.mark.one_engine("about the serve process's memory, not the index")
def test_hundreds_of_sessions_stalled_mid_data_stay_within_the_memory_budget(make_hub):
    sessions, sent_each, budget = 300, MB, 64 * MB
    hub = make_hub(
        sites=ALPHA_BETA,
        process=True,
        MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1000",
        MAILHUB_SMTP_MEMORY_BUDGET=str(budget),
        MAILHUB_THROTTLE_DRAIN_ADMISSION="false",
        MAILHUB_THROTTLE_PACING="false",
        **PEER,
    ).start()
    pid = hub.proc.pid
    _good_gateway_round(hub)
    base = _rss(pid)
    payload = make_message(sent_each)[:sent_each]
    header = b"MAIL FROM:<alpha@hub.test> SIZE=%d\r\n%s\r\nDATA\r\n" % (10 * MB, RCPT)

    def stall() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", hub.smtp_port), timeout=30)
        sock.sendall(b"EHLO stall\r\n" + header)
        replies = b""
        while b"\r\n354 " not in replies:
            chunk = sock.recv(4096)
            assert chunk, replies
            replies += chunk
        sock.sendall(payload)
        return sock

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        socks = list(pool.map(lambda _: stall(), range(sessions)))
    # every session's megabyte has reached the hub (its spool files) before the measure
    spool = hub.data_dir / "spool"
    wait_for(
        lambda: sum(f.stat().st_size for f in spool.iterdir()) >= sessions * sent_each - budget,
        timeout=60,
        message="every stalled session's bytes in the spool",
    )
    peak = vm_status(pid, "VmHWM")
    rss = _rss(pid)
    gauges = _ingest_memory(hub)
    started = time.monotonic()
    good = _good_gateway_round(hub)
    print(
        f"{sessions} stalled sessions x {sent_each // MB} MB: hub RSS {base / MB:.1f} -> {rss / MB:.1f} MB"
        f" (peak {peak / MB:.1f} MB, budget {budget // MB} MB, mail bytes held at most"
        f" {gauges['peak'] / MB:.1f} MB); good gateway served in {good:.3f} s"
    )
    assert gauges["peak"] < budget + sessions * 256 * 1024  # the budget, overshot by one read per session
    bound = base + budget + sessions * 300 * 1024  # RSS: the budget plus per-connection buffers and state
    assert peak < bound, (peak / MB, bound / MB)
    assert good < 1.0 and time.monotonic() - started < 5
    for sock in socks:
        sock.close()
    # each stalled mail is dropped with one log line, its spool file removed
    wait_for(
        lambda: hub.log_text().count("outcome=aborted") >= sessions, timeout=30, message="an aborted line per session"
    )
    wait_for(lambda: len(list(spool.iterdir())) == 0, timeout=30, message="the spool emptied")
    text = hub.log_text()
    assert text.count("outcome=aborted") == sessions and "Traceback" not in text


@pytest.mark.one_engine("about the serve process's memory, not the index")
def test_memory_is_returned_after_a_burst(make_hub):
    # 64 sessions at once from one address: above the default of 20 not yet greeted/authenticated,
    # which would answer some of them 421 instead of the banner.
    hub = make_hub(
        sites=ALPHA_BETA,
        process=True,
        MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1000",
        MAILHUB_SMTP_MAX_UNAUTHENTICATED_PER_IP="1000",
        MAILHUB_THROTTLE_DRAIN_ADMISSION="false",
        MAILHUB_THROTTLE_PACING="false",
        **PEER,
    ).start()
    pid = hub.proc.pid
    _good_gateway_round(hub)
    base = _rss(pid)
    message = make_message(MB)

    def send(_):
        client = RawSMTP(hub.smtp_port, timeout=60)
        assert client.banner.startswith(b"220"), client.banner
        client.ehlo()
        for _ in range(2):
            assert client.command(MAIL).startswith(b"250") and client.command(RCPT).startswith(b"250")
            assert client.command("DATA").startswith(b"354")
            client.send(message + b".\r\n")
            queue_id_from(client.reply())
        client.close()

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(send, range(64)))
    after_burst = _rss(pid)
    peak = vm_status(pid, "VmHWM")
    returned = wait_for(
        lambda: (rss := _rss(pid)) < base + 24 * MB and rss, timeout=15, message="the burst's memory returned"
    )
    print(
        f"burst of 128 x 1 MB mails over 64 sessions: hub RSS {base / MB:.1f} MB before, peak {peak / MB:.1f},"
        f" {after_burst / MB:.1f} right after, {returned / MB:.1f} once memory was returned"
    )
    assert peak > base + 24 * MB  # the burst did take memory (else this test shows nothing)


def test_internal_errors_are_one_line_each_with_tracebacks_rate_limited(caplog):
    from mailhub import metrics
    from relay import internal_errors

    def count():
        return metrics.REGISTRY.get_sample_value("mailhub_internal_errors_total", {"protocol": "smtp"}) or 0

    before = count()
    internal_errors._last_traceback[0] = float("-inf")
    # records only to caplog: a hub of this module running meanwhile (shared_hub) logs the records
    # of this thread too, and must show no traceback
    log = __import__("logging").getLogger("mailhub.test.internal_errors")
    log.propagate = False
    log.addHandler(caplog.handler)
    for n in range(3):
        try:
            raise ValueError(f"bug \x1b[2J number {n}")
        except ValueError as exc:
            internal_errors.report_internal_error(log, "smtp", exc, "qid=Q1 site=alpha")
    internal_errors._last_traceback[0] -= internal_errors.TRACEBACK_INTERVAL  # a minute later
    try:
        raise KeyError("again")
    except KeyError as exc:
        internal_errors.report_internal_error(log, "smtp", exc, "qid=Q2 site=alpha")
    log.removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name == "mailhub.test.internal_errors"]
    assert len(records) == 4 and count() == before + 4
    assert [r.exc_info is not None for r in records] == [True, False, False, True]
    assert records[1].getMessage() == (
        "smtp internal error: ValueError: bug \\x1b[2J number 1 (qid=Q1 site=alpha);"
        " traceback suppressed (one a minute)"
    )

# Hostile IMAP clients against a real hub over loopback (issue 20): pattern explosions in LIST/LSUB,
# FETCH with huge sequence sets, many or repeated items and big header blocks, deep and wide SEARCH
# and text searches over a mailbox larger than the search budget, wide and deep MIME structures,
# over-long command lines and literals before and after login. Each test asserts the protocol reply
# and that a well-behaved gateway on other connections logs in and downloads (IMAP and POP3) within
# 1 s while the attack runs on its own connections, again and again.
import imaplib
import poplib
import re
import socket
import threading
import time

import psutil
import pytest

from relay.imap import limits as imap_limits
from relay.mime import limits as mime_limits

from conftest import PASSWORD, Hub, hub_env, make_message

GOOD_MAIL = make_message(1024 * 1024, subject="good")
GOOD_SECONDS = 1.5  # a login and a 1 MB download: ~0.1-0.2 s alone; the suite shares two cores with 4 workers


class RawImap:
    """An IMAP client on a plain socket that reads whole tagged replies, literals included."""

    def __init__(self, port: int, login: str | None = "beta", timeout: float = 60):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.tags = (f"t{n}" for n in range(1, 10**9))
        if login:
            assert self.command(f"LOGIN {login} {PASSWORD}").endswith(b"OK [CAPABILITY" + self.last[17:])
            assert b" OK " in self.command("SELECT INBOX")

    def command(self, text: str | bytes) -> bytes:
        """Send one command; everything up to and including its tagged status line."""
        tag = next(self.tags)
        self.sock.sendall(tag.encode() + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> bytes:
        out = bytearray()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"closed by the server after {bytes(out[-300:])!r}")
            out += line
            literal = re.search(rb"\{(\d+)\}\r\n$", line)
            if literal:
                out += self.file.read(int(literal.group(1)))
                continue
            if line.startswith(tag.encode() + b" "):
                self.last = line
                return bytes(out)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One hub for the module (the encryption policy off: these mails are about structure), with a
    good 1 MB mail for alpha and the attack mails for beta."""
    data_dir = tmp_path_factory.mktemp("hostile-imap") / "data"
    hub = Hub(data_dir, hub_env(data_dir, MAILHUB_ENCRYPTION_REQUIRED="false"), process=True)  # memory measured
    hub.add_site("alpha")
    hub.add_site("beta")
    hub.start()
    from pop3util import send

    send(hub, ["alpha@hub.test"], GOOD_MAIL, login="beta")
    send(hub, ["beta@hub.test"], make_message(5000, subject="plain one"))
    yield hub
    hub.stop()


def good_gateway(hub) -> float:
    """Seconds a well-behaved gateway needs to log in and download its 1 MB mail, by IMAP and by
    POP3 (held to GOOD_SECONDS by under_attack)."""
    worst = 0.0
    started = time.monotonic()
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
    client.login("alpha", PASSWORD)
    client.select("INBOX", readonly=True)
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1].endswith(GOOD_MAIL)
    client.logout()
    worst = max(worst, time.monotonic() - started)
    started = time.monotonic()
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("alpha")
    pop.pass_(PASSWORD)
    lines = pop.retr(1)[1]
    assert lines[-1] == GOOD_MAIL.split(b"\r\n")[-2]
    pop.quit()
    return max(worst, time.monotonic() - started)


def under_attack(hub, attack, attackers: int = 2, rounds: int = 3) -> list:
    """Run attack(results) on `attackers` threads, each again and again, while the good gateway
    downloads `rounds` times; assert the downloads took under GOOD_SECONDS (see below); return what the first
    attacker collected in its first round."""
    stop = threading.Event()
    started = threading.Barrier(attackers + 1)
    first_rounds: list[list] = [[] for _ in range(attackers)]
    errors: list = []

    def attacker(results):
        first = True
        try:
            while not stop.is_set():
                attack(results if first else [])
                if first:
                    first = False
                    started.wait(timeout=120)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=attacker, args=(first_rounds[n],), daemon=True) for n in range(attackers)]
    for thread in threads:
        thread.start()
    try:
        started.wait(timeout=120)  # every attacker finished a round: the attack is known to work
        times = [good_gateway(hub) for _ in range(rounds)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    # the median round under GOOD_SECONDS and none over three times that: an attack that starves the
    # good gateway slows every round, while one round slowed by the 2-core machine's scheduling is no
    # starvation (CI saw [1.20, 0.08, 0.15] s once on a quiet machine, [0.15, 1.04, 1.12] under load)
    assert sorted(times)[len(times) // 2] < GOOD_SECONDS and max(times) < 3 * GOOD_SECONDS, times
    assert "Traceback" not in hub.log_text()
    return first_rounds[0]


# ---- LIST / LSUB ----------------------------------------------------------------------------------


def test_list_pattern_explosion(hub):
    patterns = [
        ("*%" * 4000 + "x", True),
        ("*%" * 4000 + "z", False),
        ("%" * 30000, True),
        ("*" * 20 + "I" * 20 + "*" * 20, False),
        ("IN*%*%*%*%*%*%*%*%*%*%*%*%*%*%*%*%*%*%BOX", True),
    ]

    def attack(results):
        client = RawImap(hub.ports["imap"])
        for pattern, listed in patterns:
            for verb in ("LIST", "LSUB"):
                reply = client.command(f'{verb} "" "{pattern}"')
                results.append((verb, listed, reply))
        client.close()

    for verb, listed, reply in under_attack(hub, attack):
        assert reply.endswith(b" OK " + verb.encode() + b" completed\r\n"), reply[-200:]
        assert (f'* {verb} (\\HasNoChildren) "/" INBOX'.encode() in reply) == listed


# ---- FETCH ----------------------------------------------------------------------------------------


def test_many_item_and_huge_sequence_set_fetch(hub):
    distinct = "(" + " ".join(f"BODY.PEEK[1]<{n}.1>" for n in range(1000)) + ")"
    repeated = "(" + "BODY.PEEK[HEADER.FIELDS (SUBJECT)] " * 1000 + "UID)"
    numbers = ",".join(str(n) for n in range(1, 12000))

    def attack(results):
        client = RawImap(hub.ports["imap"])
        results.append(("distinct", client.command("FETCH 1:* " + distinct)))
        results.append(("repeated", client.command("FETCH 1:* " + repeated)))
        results.append(("uid range", client.command("UID FETCH 1:4294967295 (UID FLAGS RFC822.SIZE)")))
        results.append(("uid list", client.command(f"UID FETCH {numbers} (FLAGS)")))
        results.append(("seq list", client.command(f"FETCH {numbers} (FLAGS)")))
        client.close()

    replies = {}
    for name, reply in under_attack(hub, attack):
        replies.setdefault(name, reply)
    assert replies["distinct"].endswith(b"NO [LIMIT] too many FETCH data items (at most 64)\r\n")
    # one answer per message of beta's mailbox (other tests of the module may have added some), the
    # item repeated 1000 times in it once
    (messages,) = hub.query("SELECT count(*) FROM mailbox JOIN sites ON sites.id = site_id WHERE name = 'beta'")[0]
    assert replies["repeated"].count(b"BODY[HEADER.FIELDS (SUBJECT)]") == replies["repeated"].count(b"* ") == messages
    assert replies["repeated"].endswith(b"OK FETCH completed\r\n")
    assert re.fullmatch(
        rb"(\* \d+ FETCH \(UID \d+ FLAGS \(.*\) RFC822.SIZE \d+\)\r\n){%d}t\d+ OK.*\r\n" % messages,
        replies["uid range"],
        re.DOTALL,
    ), replies["uid range"][-500:]
    assert replies["uid list"].endswith(b"OK FETCH completed\r\n")
    assert replies["seq list"].endswith(b"BAD invalid message sequence number\r\n")


def peak_rss_during(hub, action) -> int:
    """How far the hub's resident memory rose above its level before, while action() ran."""
    process = psutil.Process(hub.proc.pid)
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return peak[0] - base


def test_fetch_of_big_header_blocks_in_bounded_memory(hub):
    from pop3util import send

    folded = "X-Filler: start\r\n" + " filler line of a header folded without end\r\n" * 5000
    inner = f"Subject: inner\r\n{folded}\r\nbody\r\n"
    mail = (
        f"Subject: big header\r\n{folded}Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + "".join(f"--b\r\nContent-Type: message/rfc822\r\n\r\n{inner}" for _ in range(60))
        + "--b--\r\n"
    ).encode()
    send(hub, ["beta@hub.test"], mail)
    items = " ".join(f"BODY.PEEK[{n}.HEADER.FIELDS (X-FILLER)]" for n in range(1, 61))
    request = f"FETCH 1:* (BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)] {items})"

    def attack(results):
        client = RawImap(hub.ports["imap"])
        results.append(client.command(request))
        client.close()

    def run_attack():
        results.extend(under_attack(hub, attack, attackers=4, rounds=2))

    results: list = []
    growth = peak_rss_during(hub, run_attack)
    reply = results[0]
    assert reply.endswith(b"OK FETCH completed\r\n")
    assert reply.count(b"X-Filler: start\r\n") >= 61  # 60 parts and the top of the big mail
    # 4 connections, each holding at most two header blocks (256 KB) and a 64 KB response chunk at once
    assert growth < 48 * 1024 * 1024, growth


# ---- SEARCH ---------------------------------------------------------------------------------------


def test_deep_and_wide_search_keys(hub):
    depth, keys = imap_limits.MAX_SEARCH_DEPTH, imap_limits.MAX_SEARCH_KEYS
    too_many_tokens = f"BAD too many tokens in one command (at most {imap_limits.MAX_TOKENS})".encode()
    requests = [
        ("SEARCH " + "NOT " * 1000 + "ALL", b"BAD search keys nested too deeply (at most 32 levels)"),
        ("SEARCH " + "(" * 2000 + "ALL" + ")" * 2000, b"BAD parentheses nested too deeply (at most 64)"),
        ("SEARCH " + "OR " * 1000 + "SEEN " * 1001, b"BAD search keys nested too deeply"),
        ("SEARCH " + "SEEN " * 1000, f"BAD too many search keys (at most {keys})".encode()),
        ("SEARCH " + "NOT " * (depth - 1) + "DELETED", b"OK SEARCH completed"),
        ("UID SEARCH " + ",".join(str(n) for n in range(1, 9000)) + " UNDELETED", b"OK SEARCH completed"),
        ("SEARCH UNDELETED", b"OK SEARCH completed"),
        ("SEARCH " + "NOT " * 10000 + "ALL", too_many_tokens),
        ("SEARCH " + "OR " * 5000 + "SEEN " * 5001, too_many_tokens),
        ("SEARCH " + "SEEN " * 12000, too_many_tokens),
        ("NOOP " + '"x" ' * 12000, too_many_tokens),
    ]

    def attack(results):
        client = RawImap(hub.ports["imap"])
        for request, _ in requests:
            results.append(client.command(request))
        client.close()

    replies = under_attack(hub, attack)
    for (request, expected), reply in zip(requests, replies):
        assert expected in reply.splitlines()[-1], (request[:40], reply[-200:])
    # depth - 1 NOTs around DELETED: the same answer as UNDELETED (every mail here)
    undeleted = re.search(rb"\* SEARCH [\d ]+\r\n", replies[6]).group(0)
    assert undeleted.startswith(b"* SEARCH 1") and re.search(rb"\* SEARCH [\d ]+\r\n", replies[4]).group(0) == undeleted


def send_big(hub, rcpt: str, body_octets: int, marker: bytes) -> None:
    """A mail of about body_octets (base64-like lines) with `marker` in its first line, streamed."""
    from conftest import RawSMTP

    client = RawSMTP(hub.smtp_port, timeout=300)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command(f"RCPT TO:<{rcpt}>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(b"Subject: big scan\r\nFrom: alpha@hub.test\r\n\r\n" + marker + b"\r\n")
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    block = line * (1024 * 1024 // len(line))
    for _ in range(body_octets // len(block)):
        client.send(block)
    assert client.command(".").startswith(b"250")
    client.close()


def test_text_search_bounded_by_bytes_and_off_the_loop(hub):
    over = imap_limits.SEARCH_MAX_BYTES + 16 * 1024 * 1024
    send_big(hub, "beta@hub.test", over, b"findme early")
    from pop3util import send

    send(hub, ["beta@hub.test"], b"Subject: folded\r\nX-Filler: start\r\n header folded here\r\n\r\nbody\r\n")
    requests = [
        ("SEARCH BODY absent-text", b"NO [LIMIT] SEARCH would read more than 256 MB"),
        ("SEARCH TEXT FINDME", b"OK SEARCH completed"),
        ("SEARCH SUBJECT scan", b"OK SEARCH completed"),
        ('SEARCH HEADER X-Filler "header folded"', b"OK SEARCH completed"),
    ]

    def attack(results):
        client = RawImap(hub.ports["imap"])
        for request, _ in requests:
            results.append(client.command(request))
        client.close()

    replies = under_attack(hub, attack, attackers=2, rounds=3)
    for (request, expected), reply in zip(requests, replies):
        assert expected in reply.splitlines()[-1], (request, reply[-300:])
    big = re.search(rb"\* SEARCH (\d+)\r\n", replies[1]).group(1)
    assert re.search(rb"\* SEARCH .*\b" + big + rb"\b", replies[2])
    assert re.search(rb"\* SEARCH (\d+ )*\d+\r\n", replies[3])  # the folded X-Filler mail sent above


# ---- MIME structure -------------------------------------------------------------------------------


def test_wide_and_deep_mime_structures(hub):
    from pop3util import send

    wide = (
        "Subject: wide\r\nContent-Type: multipart/mixed; boundary=w\r\n\r\n"
        + '--w\r\nContent-Type: text/plain; name="part.txt"\r\n\r\nx\r\n' * 5000
        + "--w--\r\n"
    )
    deep = "Subject: deep\r\n"
    for level in range(40):
        deep += f"Content-Type: multipart/mixed; boundary=d{level}\r\n\r\n--d{level}\r\n"
    deep += "Content-Type: text/plain\r\n\r\ndeepest\r\n" + "".join(f"--d{n}--\r\n" for n in reversed(range(40)))
    # big header fields, folded: SMTP refuses lines over 998 characters (554 5.6.0)
    to, subject = "\r\n ".join(["x@y.example,"] * 150), "\r\n ".join(["s" * 70] * 43)
    envelope = "".join(
        f"--e\r\nContent-Type: message/rfc822\r\n\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nbody\r\n" for _ in range(300)
    )
    envelopes = f"Subject: envelopes\r\nContent-Type: multipart/mixed; boundary=e\r\n\r\n{envelope}--e--\r\n"
    for mail in (wide, deep, envelopes):
        send(hub, ["beta@hub.test"], mail.encode())
    limit = mime_limits.STRUCTURE_MAX_PARTS

    def attack(results):
        client = RawImap(hub.ports["imap"])
        results.append(client.command('SEARCH SUBJECT "wide"'))
        for subject in ("wide", "deep", "envelopes"):
            number = re.search(rb"\* SEARCH (\d+)", client.command(f"SEARCH SUBJECT {subject}")).group(1).decode()
            results.append(client.command(f"FETCH {number} (BODYSTRUCTURE ENVELOPE BODY)"))
            results.append(client.command(f"FETCH {number} (BODY.PEEK[{limit}] BODY.PEEK[{limit}.MIME])"))
        client.close()

    results = under_attack(hub, attack)
    wide_structure, wide_tail, deep_structure, _, envelopes_structure, _ = results[1:7]
    for reply in (wide_structure, deep_structure, envelopes_structure):
        assert reply.endswith(b"OK FETCH completed\r\n") and len(reply) < 2_000_000
    # BODYSTRUCTURE and BODY each describe limit - 1 parts (the top level counts as one)
    assert wide_structure.count(b'"part.txt"') == 2 * (limit - 1)
    assert b'("application" "octet-stream" NIL NIL NIL "7bit" ' in wide_structure
    # the opaque last part is the rest of the multipart: the parts not described, as they were sent
    tail = re.search(rb"BODY\[%d\] \{(\d+)\}\r\n" % limit, wide_tail)
    assert int(tail.group(1)) > 4000 * len(b'--w\r\nContent-Type: text/plain; name="part.txt"\r\n\r\nx\r\n') - 100
    assert deep_structure.count(b'"mixed"') == 2 * (mime_limits.STRUCTURE_MAX_DEPTH + 1)  # levels 0..16
    assert b"deepest" not in deep_structure


# ---- command lines and literals -------------------------------------------------------------------


def test_command_and_literal_limits_before_and_after_login(hub):
    def attack(results):
        pre = RawImap(hub.ports["imap"], login=None)
        results.append(pre.command(b"NOOP " + b"x" * 9000))
        results.append(pre.command(b"LOGIN {100000}"))
        results.append(pre.command(b"NOOP"))
        pre.close()
        flood = RawImap(hub.ports["imap"], login=None)
        flood.sock.sendall(b"x LOGIN {100000+}\r\n" + b"y" * 20000)
        results.append(flood.file.read())
        flood.close()
        after = RawImap(hub.ports["imap"])
        results.append(after.command(b"NOOP " + b"x" * 60000))
        results.append(after.command(b"NOOP " + b"x" * 70000))
        after.sock.sendall(b"t90 APPEND INBOX {10}\r\n")
        results.append(after.until("t90"))
        results.append(after.command(b"NOOP"))
        after.close()

    results = under_attack(hub, attack)
    assert results[0].endswith(b"BAD command line too long (at most 8192 octets with its literals before login)\r\n")
    assert results[1].endswith(b"BAD command line too long (at most 8192 octets with its literals before login)\r\n")
    assert results[2].endswith(b"OK NOOP completed\r\n")
    assert results[3] == b"* BYE too much input\r\n"
    assert results[4].endswith(b"BAD unexpected character 'x'\r\n") or results[4].endswith(b"OK NOOP completed\r\n")
    assert results[5].endswith(b"BAD command line too long (at most 65536 octets with its literals)\r\n")
    assert results[6] == b"t90 NO [CANNOT] APPEND is not offered: mail comes in over SMTP only\r\n"
    assert results[7].endswith(b"OK NOOP completed\r\n")

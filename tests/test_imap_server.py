# IMAP mailbox serving over real loopback sockets against a real hub process, with Python's imaplib
# (raw socket lines where imaplib has no method, e.g. IDLE): every command of issue 6, byte exactness
# of body literals against what was sent, flags kept in the index, expunges seen by a second session,
# IDLE push within a second of delivery, POP3 and IMAP on one mailbox, download totals, STARTTLS and
# IMAPS, limits and bad input.
import base64
import hashlib
import imaplib
import json
import re
import socket
import ssl
import time

import pytest

from conftest import ALPHA_BETA_B2, BETA, PASSWORD, make_message, wait_for
from pop3util import RawPop3, make_cert, non_loopback_ip, send, strip_trace

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


def imap(hub, user: str = "beta", port: int | None = None) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port or hub.ports["imap"], timeout=60)
    client.login(user, PASSWORD)
    return client


def ok(result):
    typ, data = result
    assert typ == "OK", data
    return data


def literal(data) -> bytes:
    """The literal of a one-message FETCH reply."""
    return next(item[1] for item in data if isinstance(item, tuple))


def site_json(hub, name: str) -> dict:
    return json.loads(hub.cli("site", "show", name, "--json").stdout)


def assert_no_traceback(hub) -> None:
    assert "Traceback" not in hub.log_text(), hub.log_text()[-3000:]


def test_login_select_fetch_bodies_byte_exact(hub):
    mails = [
        make_message(3000, subject="one"),
        make_message(5 * 1024 * 1024, subject="big"),
        make_message(800, subject="dots") + b".\r\n..\r\n",
    ]
    for mail in mails:
        send(hub, ["beta@hub.test"], mail)
    client = imap(hub)
    assert "IDLE" in client.capabilities and "UIDPLUS" in client.capabilities
    assert ok(client.select("INBOX")) == [b"3"]
    assert client.untagged_responses["UIDVALIDITY"][0].isdigit()
    for n, mail in enumerate(mails, 1):
        stored = literal(ok(client.fetch(str(n), "(BODY.PEEK[])")))
        assert strip_trace(stored) == mail
        data = ok(client.fetch(str(n), "(RFC822.SIZE)"))
        assert int(re.search(rb"RFC822.SIZE (\d+)", data[0]).group(1)) == len(stored)
    # nothing fetched with PEEK is \Seen; RFC822 and BODY[] set it
    assert ok(client.search(None, "SEEN")) == [b""]
    whole = literal(ok(client.fetch("1", "(RFC822)")))
    assert strip_trace(whole) == mails[0]
    assert ok(client.search(None, "SEEN")) == [b"1"]
    assert ok(client.search(None, "UNSEEN")) == [b"2 3"]
    # partial, header, text
    part = literal(ok(client.fetch("2", "(BODY.PEEK[]<100.1000>)")))
    assert part == whole_of(client, 2)[100:1100]
    header = literal(ok(client.fetch("1", "(BODY.PEEK[HEADER])")))
    text = literal(ok(client.fetch("1", "(BODY.PEEK[TEXT])")))
    assert header + text == whole and header.endswith(b"\r\n\r\n") and b"Subject: one\r\n" in header
    assert literal(ok(client.fetch("1", "(RFC822.HEADER)"))) == header
    fields = literal(ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (Subject TO)])")))
    assert fields == b"To: beta@hub.test\r\nSubject: one\r\n\r\n"
    notfields = literal(ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS.NOT (Subject TO Received)])")))
    assert b"Subject" not in notfields and notfields.startswith(b"From: alpha@hub.test\r\n")
    data = ok(client.fetch("1:3", "(FLAGS UID INTERNALDATE RFC822.SIZE)"))
    assert len(data) == 3 and all(
        re.search(rb'INTERNALDATE "[ \d]\d-\w{3}-\d{4} \d\d:\d\d:\d\d \+0000"', d) for d in data
    )
    client.logout()
    assert_no_traceback(hub)


def whole_of(client, n: int) -> bytes:
    return literal(ok(client.fetch(str(n), "(BODY.PEEK[])")))


def test_uid_commands_store_search_expunge(hub):
    for subject in ("a", "b", "c", "d"):
        send(hub, ["beta@hub.test"], make_message(500, subject=subject))
    client = imap(hub)
    ok(client.select("INBOX"))
    uids = ok(client.uid("SEARCH", "ALL"))[0].split()
    assert len(uids) == 4 and uids == sorted(uids, key=int)
    data = ok(client.uid("FETCH", uids[1], "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert b"UID " + uids[1] in data[0][0] and data[0][1] == b"Subject: b\r\n\r\n"
    assert ok(client.store("1:2", "+FLAGS", "(\\Flagged \\Answered)")) == [
        b"1 (FLAGS (\\Answered \\Flagged))",
        b"2 (FLAGS (\\Answered \\Flagged))",
    ]
    assert ok(client.store("2", "-FLAGS.SILENT", "(\\Answered)")) == [None]
    assert ok(client.uid("STORE", uids[2], "FLAGS", "(\\Draft)")) == [b"3 (UID " + uids[2] + b" FLAGS (\\Draft))"]
    assert ok(client.search(None, "FLAGGED")) == [b"1 2"]
    assert ok(client.search(None, "ANSWERED")) == [b"1"]
    assert ok(client.search(None, "OR", "DRAFT", "ANSWERED")) == [b"1 3"]
    assert ok(client.search(None, "NOT", "FLAGGED", "UNDRAFT")) == [b"4"]
    assert ok(client.search(None, "HEADER", "Subject", "c")) == [b"3"]
    assert ok(client.search(None, "SUBJECT", "D")) == [b"4"]
    assert ok(client.search(None, "SINCE", "1-Jan-2020", "BEFORE", "1-Jan-2200")) == [b"1 2 3 4"]
    assert ok(client.search(None, "BEFORE", "1-Jan-2020")) == [b""]
    assert ok(client.search(None, "UID", b",".join(uids[1:3]).decode())) == [b"2 3"]
    assert ok(client.search(None, "2:3")) == [b"2 3"]
    assert ok(client.search(None, "LARGER", "100", "SMALLER", "5")) == [b""]
    # flags are kept in the index
    rows = hub.query(
        "SELECT uid, flags FROM mailbox WHERE site_id = (SELECT id FROM sites WHERE name = 'beta') ORDER BY uid"
    )
    assert [flags for _, flags in rows] == [2 | 4, 4, 16, 0]
    # UID EXPUNGE removes only the given \Deleted messages; EXPUNGE the rest
    ok(client.store("1:4", "+FLAGS.SILENT", "(\\Deleted)"))
    typ, data = client.uid("EXPUNGE", uids[1].decode())
    assert typ == "OK" and client.untagged_responses.pop("EXPUNGE", None) == [b"2"]
    assert ok(client.search(None, "ALL")) == [b"1 2 3"]
    ok(client.store("3", "-FLAGS", "(\\Deleted)"))
    assert ok(client.expunge()) == [b"2", b"1"]
    assert ok(client.uid("SEARCH", "ALL")) == [uids[3]]
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]
    # CLOSE expunges silently; UNSELECT does not
    ok(client.store("1", "+FLAGS", "(\\Deleted)"))
    ok(client.unselect()) if hasattr(client, "unselect") else ok(client._simple_command("UNSELECT"))
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]
    ok(client.select("INBOX"))
    ok(client.check())
    ok(client.close())
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]
    # UIDNEXT never goes down, UIDVALIDITY stays
    status = ok(client.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)"))[0]
    assert re.search(rb"MESSAGES 0 .*UIDNEXT %d " % (int(uids[3]) + 1), status), status
    client.logout()
    assert_no_traceback(hub)


def test_examine_is_read_only_and_other_commands(hub):
    send(hub, ["beta@hub.test"], make_message(500))
    client = imap(hub)
    typ, data = client.select("INBOX", readonly=True)
    assert typ == "OK" and client.untagged_responses.get("READ-ONLY")
    ok(client.fetch("1", "(BODY[])"))  # no \Seen in EXAMINE
    assert ok(client.search(None, "UNSEEN")) == [b"1"]
    typ, data = client.store("1", "+FLAGS", "(\\Deleted)")
    assert typ == "NO" and b"READ-ONLY" in data[0]
    assert ok(client.list()) == [b'(\\HasNoChildren) "/" INBOX']
    assert ok(client.list('""', "%")) == [b'(\\HasNoChildren) "/" INBOX']
    assert ok(client.list('""', "Sent*")) == [None]
    assert ok(client.list('""', '""')) == [b'(\\Noselect) "/" ""']
    assert ok(client.lsub()) == [b'(\\HasNoChildren) "/" INBOX']
    assert ok(client.namespace()) == [b'(("" "/")) NIL NIL']
    typ, data = client.xatom("ID", "NIL")
    assert typ == "OK" and client.untagged_responses["ID"] == [b'("name" "DICOM-Mail-Hub")']
    typ, data = client.select("Archive")
    assert typ == "NO" and b"NONEXISTENT" in data[0]
    assert client.state == "AUTH"
    typ, data = client.create("Archive")
    assert typ == "NO"
    typ, data = client.status("INBOX", "(MESSAGES UNSEEN)")
    assert data == [b"INBOX (MESSAGES 1 UNSEEN 1)"]
    ok(client.noop())
    assert client.logout()[0] == "BYE"


def test_authenticate_plain_and_failures(hub):
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
    typ, data = client.authenticate("PLAIN", lambda _: b"\0beta\0" + PASSWORD.encode())
    assert typ == "OK"
    client.logout()
    raw = socket.create_connection(("127.0.0.1", hub.ports["imap"]), timeout=30)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    token = base64.b64encode(b"\0beta\0wrong")
    raw.sendall(b"a AUTHENTICATE PLAIN " + token + b"\r\n")
    assert f.readline() == b"a NO [AUTHENTICATIONFAILED] authentication failed\r\n"
    raw.sendall(b"b LOGIN beta wrong\r\nc LOGIN nobody wrong\r\n")
    assert f.readline() == b"b NO [AUTHENTICATIONFAILED] authentication failed\r\n"
    assert f.readline() == b"c NO [AUTHENTICATIONFAILED] authentication failed\r\n"
    assert f.readline() == b"* BYE too many failures\r\n"
    assert f.readline() == b""
    raw.close()


def test_bad_input_gets_bad_and_session_goes_on(hub):
    raw = socket.create_connection(("127.0.0.1", hub.ports["imap"]), timeout=30)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"a LOGIN beta " + PASSWORD.encode() + b"\r\nb SELECT INBOX\r\n")
    while not f.readline().startswith(b"b OK"):
        pass
    for line, reply in (
        (b"c FETCH 1:x FLAGS", b"c BAD invalid sequence set"),
        (b"d FETCH 1 (FLAGS", b"d BAD unbalanced parenthesis"),
        (b"e FROBNICATE", b"e BAD unknown command"),
        (b"f FETCH 5 FLAGS", b"f BAD invalid message sequence number"),
        (b"g SEARCH BODY x (", b"g BAD unbalanced parenthesis"),
        (b"\x00\xff\xfe", b"* BAD unexpected character '\\x00'"),
        (b"h STORE 1 FLAGS (\\Bogus)", b"h BAD unknown system flag \\Bogus"),
        (b"i LOGIN x y", b"i BAD LOGIN not allowed in the selected state"),
        (b"j UID FETCH 1:* BODY[HEADER.FIELDS ()]", b"j BAD invalid header field names"),
    ):
        raw.sendall(line + b"\r\n")
        assert f.readline().rstrip(b"\r\n") == reply, line
    raw.sendall(b"k NOOP " + b"x" * 100_000 + b"\r\nl NOOP\r\n")
    assert f.readline() == b"k BAD command line too long (at most 65536 octets with its literals)\r\n"
    assert f.readline() == b"l OK NOOP completed\r\n"
    raw.close()
    assert_no_traceback(hub)


def idle_start(client: imaplib.IMAP4) -> None:
    client.send(b"I1 IDLE\r\n")
    assert client.readline() == b"+ idling\r\n"


def test_idle_push_within_a_second_and_two_sessions(hub):
    send(hub, ["beta@hub.test"], make_message(500, subject="first"))
    watcher, other = imap(hub), imap(hub)
    ok(watcher.select("INBOX"))
    ok(other.select("INBOX"))
    idle_start(watcher)
    watcher.sock.settimeout(5)
    for expected in (2, 3):
        send(hub, ["beta@hub.test", "alpha@hub.test"], make_message(500, subject="news"))
        delivered = time.monotonic()  # the 250 came after the commit
        line = watcher.readline()
        assert line == b"* %d EXISTS\r\n" % expected
        assert time.monotonic() - delivered < 1.0
    # an expunge by the other session shows in the idling one at once
    ok(other.store("1", "+FLAGS", "(\\Deleted)"))
    assert watcher.readline() == b"* 1 FETCH (UID %s FLAGS (\\Deleted))\r\n" % ok(other.uid("SEARCH", "1"))[0]
    ok(other.expunge())
    assert watcher.readline() == b"* 1 EXPUNGE\r\n"
    watcher.send(b"DONE\r\n")
    assert watcher.readline() == b"I1 OK IDLE terminated\r\n"
    assert ok(watcher.search(None, "ALL")) == [b"1 2"]
    # without IDLE, the next command reports what changed
    send(hub, ["beta@hub.test"], make_message(500, subject="later"))
    ok(other.store("1", "+FLAGS", "(\\Deleted)"))
    ok(other.expunge())
    typ, data = watcher.noop()
    assert watcher.untagged_responses.get("EXISTS") and watcher.untagged_responses.get("EXPUNGE") == [b"1"]
    watcher.logout()
    other.logout()
    assert_no_traceback(hub)


def test_shutdown_says_bye_to_idling_sessions(hub):
    client = imap(hub)
    ok(client.select("INBOX"))
    idle_start(client)
    started = time.monotonic()
    assert hub.stop() == 0
    assert time.monotonic() - started < 10
    assert client.readline() == b"* BYE server shutting down\r\n"
    assert client.readline() == b""


def test_pop3_and_imap_on_one_mailbox(hub):
    for subject in ("p1", "p2", "p3"):
        send(hub, ["beta@hub.test"], make_message(700, subject=subject))
    client = imap(hub)
    ok(client.select("INBOX"))
    pop = RawPop3(hub.ports["pop3"])
    assert pop.login("beta").startswith(b"+OK maildrop has 3 messages")
    # while POP3 holds the mailbox, IMAP may read and flag but not expunge
    ok(client.store("3", "+FLAGS", "(\\Deleted)"))
    typ, data = client.expunge()
    assert typ == "NO" and b"[INUSE]" in data[0]
    assert pop.command("DELE 1").startswith(b"+OK")
    assert pop.command("QUIT").startswith(b"+OK")
    pop.close()
    # POP3's deletion shows as EXPUNGE; now the IMAP expunge goes through
    typ, data = client.noop()
    assert client.untagged_responses.pop("EXPUNGE", None) == [b"1"]
    result = wait_for(  # the POP3 lock goes when the server has finished the session
        lambda: (r := client.expunge())[0] == "OK" and r,
        timeout=5,
        interval=0.1,
        message="the IMAP expunge accepted once the POP3 session ended",
    )
    assert result == ("OK", [b"2"])
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]
    client.logout()


def test_downloads_feed_site_totals_and_metrics(hub):
    mails = [make_message(4000), make_message(9000)]
    for mail in mails:
        send(hub, ["beta@hub.test"], mail)
    assert site_json(hub, "beta")["waiting_messages"] == 2
    client = imap(hub)
    ok(client.select("INBOX"))
    sizes = [len(literal(ok(client.fetch(str(n), "(BODY.PEEK[])")))) for n in (1, 2)]
    # an expunge records what was downloaded so far (a gateway may stay in IDLE for hours), and
    # the index learns that both mails were downloaded (no longer waiting: the drain measurement)
    ok(client.store("1", "+FLAGS", "(\\Deleted)"))
    ok(client.expunge())
    shown = site_json(hub, "beta")
    d = shown["downloads"]
    assert (d["sessions"], d["messages"], d["bytes"]) == (1, 2, sum(sizes))
    assert (shown["waiting_messages"], shown["waiting_bytes"]) == (0, 0)
    ok(client.fetch("1", "(BODY.PEEK[]<0.100>)"))
    client.logout()
    d = wait_for(
        lambda: (d := site_json(hub, "beta")["downloads"])["bytes"] != sum(sizes) and d,
        timeout=5,
        interval=0.1,
        message="the partial fetch counted in beta's downloads at logout",
    )
    assert (d["sessions"], d["messages"], d["bytes"]) == (1, 2, sum(sizes) + 100)
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    assert 'mailhub_imap_messages_served_total{site="beta"} 2.0' in text
    assert f'mailhub_imap_served_bytes_total{{site="beta"}} {float(sum(sizes) + 100)}' in text
    assert 'mailhub_imap_sessions_total{outcome="logout"} 1.0' in text
    assert "mailhub_imap_sessions_active" in text


def test_starttls_and_imaps(make_hub, tmp_path):
    cert, key = make_cert(tmp_path)
    hub = make_hub(
        sites=BETA,
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
        MAILHUB_IMAP_IMAPS_LISTEN="127.0.0.1:0",
    )
    hub.start()
    mail = make_message(3 * 1024 * 1024)
    send(hub, ["beta@hub.test"], mail, login="beta")
    context = ssl.create_default_context(cafile=str(cert))
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
    assert "STARTTLS" in client.capabilities
    ok(client.starttls(context))
    client.login("beta", PASSWORD)
    ok(client.select("INBOX"))
    assert strip_trace(literal(ok(client.fetch("1", "(BODY.PEEK[])")))) == mail
    client.logout()
    client = imaplib.IMAP4_SSL("127.0.0.1", hub.ports["imaps"], ssl_context=context, timeout=60)
    assert "STARTTLS" not in client.capabilities
    client.login("beta", PASSWORD)
    ok(client.select("INBOX"))
    assert (
        hashlib.sha256(strip_trace(literal(ok(client.fetch("1", "(RFC822)"))))).digest()
        == hashlib.sha256(mail).digest()
    )
    client.logout()
    assert_no_traceback(hub)


def test_plaintext_login_refused_off_loopback_until_starttls(make_hub, tmp_path):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    cert, key = make_cert(tmp_path)
    hub = make_hub(
        sites=BETA, MAILHUB_TLS_CERT_FILE=str(cert), MAILHUB_TLS_KEY_FILE=str(key), MAILHUB_IMAP_LISTEN=f"{ip}:0"
    )
    hub.start()
    client = imaplib.IMAP4(ip, hub.ports["imap"], timeout=30)
    assert "LOGINDISABLED" in client.capabilities and "AUTH=PLAIN" not in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login("beta", PASSWORD)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names 127.0.0.1, not this address
    ok(client.starttls(context))
    assert "AUTH=PLAIN" in client.capabilities and "STARTTLS" not in client.capabilities
    ok(client.login("beta", PASSWORD))
    client.logout()


def test_connection_limit_and_idle_timeout(make_hub):
    hub = make_hub(sites=BETA, MAILHUB_IMAP_MAX_CONNECTIONS="1", MAILHUB_IMAP_IDLE_TIMEOUT="1")
    hub.start()
    first = socket.create_connection(("127.0.0.1", hub.ports["imap"]), timeout=10)
    assert first.recv(1000).startswith(b"* OK")
    second = socket.create_connection(("127.0.0.1", hub.ports["imap"]), timeout=10)
    assert second.recv(1000) == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    second.close()
    assert first.recv(1000) == b"* BYE autologout; idle for too long\r\n"  # within the socket's 10 s
    first.close()


# PGP/MIME-like parts in a multipart/mixed whose armor is not real OpenPGP: the encryption policy
# refuses it (its own tests are test_policy_*), so the test's hub has it off: the structure matters here
MIME_MAIL = (
    b"From: Alpha Gateway <alpha@hub.test>\r\nTo: beta@hub.test\r\nSubject: study 1.2.840\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <study-1@hub.test>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    b'--b1\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
    b"-----BEGIN PGP MESSAGE-----\r\n"
    + b"hQIMA0xyz0123456789abcdefABCDEF+/\r\n"
    * 2000
    + b"-----END PGP MESSAGE-----\r\n"
    b"--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: x@y\r\n\r\ninner body\r\n"
    b"--b1--\r\n"
)


def test_envelope_bodystructure_and_parts_from_the_recorded_structure(make_hub):
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_ENCRYPTION_REQUIRED="false").start()
    send(hub, ["beta@hub.test"], MIME_MAIL)
    client = imap(hub)
    ok(client.select("INBOX"))

    def fetch_parts():
        data = ok(client.fetch("1", "(ENVELOPE BODYSTRUCTURE BODY)"))[0]
        text = data if isinstance(data, bytes) else b"".join(data)
        parts = {
            section: literal(ok(client.fetch("1", f"(BODY.PEEK[{section}])")))
            for section in ("1", "1.MIME", "2", "3.HEADER", "3.TEXT")
        }
        fields = literal(ok(client.fetch("1", "(BODY.PEEK[3.HEADER.FIELDS (SUBJECT)])")))
        return text, parts, fields

    text, parts, fields = fetch_parts()
    upper = text.upper()
    assert b'"STUDY 1.2.840"' in upper and b'(("ALPHA GATEWAY" NIL "ALPHA" "HUB.TEST"))' in upper
    assert b'"<STUDY-1@HUB.TEST>"' in upper
    assert b'BODYSTRUCTURE (("APPLICATION" "PGP-ENCRYPTED"' in upper and b'"MIXED" ("BOUNDARY" "B1")' in upper
    assert b'"MESSAGE" "RFC822"' in upper
    assert parts["1"] == b"Version: 1"
    assert parts["1.MIME"] == b"Content-Type: application/pgp-encrypted\r\n\r\n"
    assert parts["2"].startswith(b"-----BEGIN PGP MESSAGE-----\r\n") and parts["2"].endswith(
        b"-----END PGP MESSAGE-----"
    )
    assert parts["3.HEADER"] == b"Subject: inner\r\nFrom: x@y\r\n\r\n" and parts["3.TEXT"] == b"inner body"
    assert fields == b"Subject: inner\r\n\r\n"
    # a message stored without a structure record (before recording existed) gets it from its blob
    conn = hub.db()
    with conn:
        conn.execute("UPDATE messages SET structure = NULL")
    conn.close()
    assert hub.query("SELECT count(*) FROM messages WHERE structure IS NULL") == [(1,)]
    assert fetch_parts() == (text, parts, fields)
    client.logout()
    assert_no_traceback(hub)


def test_uidnext_never_passes_a_uid_the_session_has_not_seen(hub):
    """SELECT reads the mailbox, then UIDNEXT: a mail committed between the two reads was counted in
    UIDNEXT but not listed - the client was told UIDNEXT n+1, then saw UID n appear (one that
    resumes with 'UID FETCH <UIDNEXT>:*' never fetched it). UIDNEXT is read first, then raised to
    the listing's highest UID + 1."""
    import asyncio

    storage = hub._hub.storage
    listing = storage.mailbox
    armed = [True]

    async def mailbox_then_a_mail(site_id):
        entries = await listing(site_id)
        if armed[0]:
            armed[0] = False
            await asyncio.get_running_loop().run_in_executor(
                None, send, hub, ["beta@hub.test"], make_message(1000, subject="between the reads")
            )
        return entries

    storage.mailbox = mailbox_then_a_mail
    client = imap(hub)
    try:
        ok(client.select("INBOX"))
        (uid_next,) = client.untagged_responses["UIDNEXT"]
        ok(client.noop())
        (uids,) = ok(client.uid("SEARCH", "ALL"))
        assert not armed[0] and uids, "the mail was sent between the reads"
        assert all(int(uid) >= int(uid_next) for uid in uids.split()), (uid_next, uids)
    finally:
        client.logout()
        del storage.mailbox

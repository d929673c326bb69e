# Verify on the way out (docs/integrity.md): a mail whose blob is cut short is refused before any
# byte of it (POP3 -ERR [SYS/PERM], IMAP tagged NO [CORRUPTION] without its FETCH response); one
# with changed bytes of the right size is found while it is sent (its CRC-32: the connection is
# reset before the POP3 end line or the end of the IMAP FETCH response, and an IMAP FETCH does not
# leave it \Seen), by `mailhub storage verify` (exit status 1, beside the running hub and with the
# hub stopped) and by the background scrub, then refused likewise; damaged mails are copied to the
# quarantine, listed by `mailhub storage damaged`, counted, and can still be deleted; a blob cut
# while it is being sent ends the connection without the terminating line. Counts printed.
import imaplib
import json
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import urllib.request

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from, wait_for

VERIFYING = {"MAILHUB_STORAGE_VERIFY_WHILE_SERVING": "true"}  # off by default (its cost: docs/integrity.md)


def send(hub, sizes: list[int]) -> dict[str, bytes]:
    sent = {}
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
        client.login("beta", PASSWORD)
        for i, size in enumerate(sizes):
            body = make_message(size, subject=f"mail {i}")
            client.mail("beta@hub.test")
            client.rcpt("alpha@hub.test")
            code, reply = client.data(body)
            assert code == 250, reply
            sent[queue_id_from(reply)] = body
    return sent


def where(hub, queue_id: str) -> tuple:
    (row,) = hub.query("SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", queue_id)
    return hub.data_dir / "blobs" / row[0], row[1], row[2]


def flip_byte(hub, queue_id: str) -> None:
    path, offset, size = where(hub, queue_id)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x20]))


def cut_short(hub, queue_id: str) -> None:
    path, offset, size = where(hub, queue_id)
    os.truncate(path, offset + size - 1000)


CLOSED = "connection closed before the end line"


def pop3_login(hub) -> poplib.POP3:
    """A session of alpha's (a mailbox still held by a session just cut off is tried again)."""

    def attempt() -> poplib.POP3 | None:
        client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
        client.user("alpha")
        try:
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto as exc:
            client.close()
            assert "[IN-USE]" in str(exc), exc
            return None

    return wait_for(attempt, interval=0.05, message="alpha's mailbox free again after the session cut off")


def pop3_retrieve_all(hub) -> dict[str, bytes | str]:
    """queue ID (by order) -> the mail's bytes, the -ERR reply, or CLOSED (the hub ended the
    session in the middle of the mail: a new session goes on with the next one)."""
    client = pop3_login(hub)
    uids = [line.split()[1].decode() for line in client.uidl()[1]]
    order = [
        qid
        for (qid,) in hub.query(
            "SELECT b.queue_id FROM mailbox b JOIN sites s ON s.id = b.site_id WHERE s.name = 'alpha' ORDER BY b.uid"
        )
    ]
    got = {}
    for n, qid in enumerate(order, 1):
        try:
            got[qid] = b"\r\n".join(client.retr(n)[1]) + b"\r\n"
        except poplib.error_proto as exc:
            got[qid] = CLOSED if exc.args[0] == "-ERR EOF" else str(exc)  # poplib's words for a cut reply
        except ConnectionError:
            got[qid] = CLOSED
        if got[qid] == CLOSED:
            client.close()
            client = pop3_login(hub)
    assert client.noop().startswith(b"+OK")  # the session goes on after a refusal
    client.quit()
    assert len(uids) == len(order)
    return got


def whole(data: bytes, body: bytes) -> bool:
    return data.endswith(body) and data.startswith(b"Received: ")


def test_damaged_mails_are_refused_found_listed_and_deletable(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0", **VERIFYING).start()
    sent = send(hub, [5_000, 6_000, 7_000, 400_000, 500_000, 600_000])
    qids = list(sent)
    small_flipped, unfetched_flipped, big_flipped, big_cut = qids[1], qids[3], qids[4], qids[5]
    assert where(hub, small_flipped)[1] > 0, "the small mail lives in a pack"
    flip_byte(hub, small_flipped)
    flip_byte(hub, big_flipped)
    cut_short(hub, big_cut)

    got = pop3_retrieve_all(hub)
    assert got[big_cut].startswith("b'-ERR [SYS/PERM] message 6 is damaged on the server (blob file cut short")
    assert all(whole(got[q], sent[q]) for q in (qids[0], qids[2], qids[3]))
    # changed bytes of the right size pass the size check; their CRC-32, checked as they are sent,
    # does not: the session ends without the end line, no client takes them as whole
    assert got[small_flipped] == CLOSED and got[big_flipped] == CLOSED
    wait_for(  # marked in the background
        lambda: hub.query("SELECT count(*) FROM damaged") == [(3,)], interval=0.05, message="3 mails marked damaged"
    )
    assert hub.query("SELECT DISTINCT found_by FROM damaged") == [("serving",)]

    flip_byte(hub, unfetched_flipped)  # not fetched since: found by the SHA-256 check of verify
    result = hub.cli("storage", "verify", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(
        line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("DAMAGED")
    ) == sorted([small_flipped, unfetched_flipped, big_flipped, big_cut])
    assert "1 newly damaged mail(s) marked by the running hub" in result.stdout
    assert "verify: 6/6 mail(s)" in result.stderr
    assert hub.cli("storage", "verify", "--site", "beta").returncode == 0  # nothing in beta's mailbox

    got = pop3_retrieve_all(hub)
    refused = [q for q in qids if isinstance(got[q], str)]
    assert sorted(refused) == sorted([small_flipped, unfetched_flipped, big_flipped, big_cut])
    assert all("[SYS/PERM]" in got[q] for q in refused)  # refused before any byte now
    served = [q for q in qids if q not in refused and whole(got[q], sent[q])]
    assert len(served) == 2

    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("alpha", PASSWORD)
    imap.select("INBOX")
    status, data = imap.fetch("1:6", "(BODY[])")  # not PEEK: the damaged ones do not become \Seen
    assert status == "NO" and "[CORRUPTION] message(s) 2,4,5,6 damaged" in str(data)
    flags = dict(hub.query("SELECT queue_id, flags & 1 FROM mailbox"))
    assert flags == {q: int(q not in refused) for q in qids}
    status, data = imap.fetch("1", "(BODY.PEEK[])")
    assert status == "OK" and data[0][1].endswith(sent[qids[0]])
    status, data = imap.fetch("2", "(RFC822.SIZE FLAGS)")  # no body: answered
    assert status == "OK"
    imap.logout()

    listing = json.loads(hub.cli("storage", "damaged", "--json").stdout)
    assert sorted(d["queue_id"] for d in listing) == sorted(refused)
    assert {d["found_by"] for d in listing} == {"serving", "verify"}
    assert all(d["mailboxes"] == ["alpha"] and d["quarantine"] for d in listing)
    quarantined = json.loads(hub.cli("storage", "quarantine", "--json").stdout)
    assert sorted(e["queue_id"] for e in quarantined if e["reason"] == "damaged") == sorted(refused)

    client = pop3_login(hub)  # the receiver deletes them
    for n in (2, 4, 5, 6):
        client.dele(n)
    assert client.quit().startswith(b"+OK")
    assert hub.query("SELECT count(*) FROM mailbox") == [(2,)]
    print(
        f"verify on the way out: acknowledged={len(sent)} served whole={len(served)} damaged detected="
        f"{len(refused)} (1 by size before serving, 2 by CRC-32 while serving, 1 by SHA-256 in `storage"
        f" verify`); damaged mails taken as whole by a client: 0; lost=0"
    )
    hub.stop()
    assert "Traceback" not in hub.log_text()


def test_the_scrub_and_a_verify_with_the_hub_stopped_find_changed_bytes(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0", **VERIFYING).start()
    qids = list(send(hub, [3_000, 4_000, 300_000, 5_000]))
    hub.stop()
    flip_byte(hub, qids[1])
    result = hub.cli("storage", "verify", "--quiet", check=False)  # hub stopped: it marks them itself
    assert result.returncode == 1 and "1 newly damaged mail(s) marked (hub stopped)" in result.stdout
    assert result.stderr == ""
    flip_byte(hub, qids[2])
    hub.env["MAILHUB_STORAGE_SCRUB_RATE"] = "50M"
    hub.start()
    wait_for(
        lambda: hub.query("SELECT count(*) FROM damaged WHERE found_by = 'scrub'") == [(1,)],
        timeout=20,
        interval=0.1,
        message=lambda: f"a mail marked damaged by the scrub\n{hub.log_text()[-2000:]}",
    )
    assert hub.query("SELECT queue_id FROM damaged ORDER BY found_at") == [(qids[1],), (qids[2],)]
    got = pop3_retrieve_all(hub)
    assert [q for q in qids if isinstance(got[q], str)] == qids[1:3]
    print(
        "scrub: acknowledged=4 damaged detected=2 (1 by verify with the hub stopped, 1 by the scrub)"
        " served damaged=0 lost=0"
    )
    hub.stop()
    assert "scrub" in hub.log_text() and "Traceback" not in hub.log_text()


def test_a_blob_cut_while_it_is_sent_ends_the_connection_without_the_end_line(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0", **VERIFYING).start()
    (qid,) = send(hub, [40_000_000])
    path, offset, size = where(hub, qid)
    sock = socket.create_connection(("127.0.0.1", hub.ports["pop3"]), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    reader = sock.makefile("rb")
    reader.readline()
    for line in (b"USER alpha\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"):
        sock.sendall(line)
        assert reader.readline().startswith(b"+OK")
    sock.sendall(b"RETR 1\r\n")
    assert reader.readline() == f"+OK {size} octets\r\n".encode()
    received = len(reader.read(100_000))
    os.truncate(path, offset + 5_000_000)  # damaged mid-transfer
    tail = b""
    while chunk := reader.read1(1 << 20):
        received += len(chunk)
        tail = (tail + chunk)[-5:]
    sock.close()
    assert received < size and tail != b"\r\n.\r\n"  # the client cannot take it as whole
    print(f"cut mid-transfer: {received} of {size} octets sent, connection closed without the end line")
    hub.stop()


def damaged_metric(hub, found_by: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'mailhub_damaged_mails_total{{found_by="{found_by}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_damaged(hub, count: int) -> None:
    wait_for(
        lambda: hub.query("SELECT count(*) FROM damaged") == [(count,)],
        interval=0.05,
        message=lambda: f"{count} mail(s) marked damaged\n{hub.log_text()[-2000:]}",
    )


def test_changed_bytes_found_while_serving_over_pop3_and_imap(make_hub):
    """A byte flipped in the middle of a mail (its size unchanged) is found by the CRC-32 checked
    while it is sent: POP3 (sendfile-sized mails and the dot-stuffing copy path) and IMAP FETCH
    BODY[] (not PEEK) end the connection before the mail's end; \\Seen is not left set; the mail is
    listed damaged, counted, quarantined and refused from then on, before any byte."""
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0", **VERIFYING).start()
    dotted = make_message(300_000, subject="dotted").replace(b"\r\n\r\n", b"\r\n\r\n.dot line\r\n", 1)
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
        client.login("beta", PASSWORD)
        client.mail("beta@hub.test")
        client.rcpt("alpha@hub.test")
        code, reply = client.data(dotted)
        assert code == 250, reply
    dotted_qid = queue_id_from(reply)
    sent = send(hub, [8_000, 3_000_000, 9_000])
    qids = [dotted_qid, *sent]
    assert hub.query("SELECT dot_lines FROM messages WHERE queue_id = ?", dotted_qid) == [(1,)]
    for qid in (dotted_qid, qids[2]):
        flip_byte(hub, qid)

    got = pop3_retrieve_all(hub)
    assert got[dotted_qid] == CLOSED and got[qids[2]] == CLOSED
    assert whole(got[qids[1]], sent[qids[1]]) and whole(got[qids[3]], sent[qids[3]])
    wait_damaged(hub, 2)

    flip_byte(hub, qids[3])  # a packed mail, fetched over IMAP (sendfile-able: checked while sent)
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("alpha", PASSWORD)
    imap.select("INBOX")
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        imap.fetch("4", "(BODY[])")
    wait_damaged(hub, 3)
    wait_for(  # the \Seen this FETCH set is taken back
        lambda: hub.query("SELECT flags & 1 FROM mailbox WHERE queue_id = ?", qids[3]) == [(0,)],
        interval=0.05,
        message="the \\Seen flag of the damaged mail taken back",
    )

    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("alpha", PASSWORD)
    imap.select("INBOX")
    status, data = imap.fetch("1:4", "(BODY[])")
    assert status == "NO" and "[CORRUPTION] message(s) 1,3,4 damaged" in str(data)
    imap.logout()
    assert dict(hub.query("SELECT queue_id, flags & 1 FROM mailbox")) == {q: int(q == qids[1]) for q in qids}

    listing = json.loads(hub.cli("storage", "damaged", "--json").stdout)
    assert sorted(d["queue_id"] for d in listing) == sorted([dotted_qid, qids[2], qids[3]])
    assert {d["found_by"] for d in listing} == {"serving"}
    assert all("CRC-32" in d["reason"] and d["quarantine"] for d in listing)
    assert damaged_metric(hub, "serving") == 3
    assert len([line for line in hub.log_text().splitlines() if "is damaged: checksum (CRC-32)" in line]) == 3
    print(
        "changed bytes while serving: acknowledged=4 damaged=3 (POP3 sendfile-size, POP3 dot-stuffed copy,"
        " IMAP BODY[]) taken as whole by a client=0, left \\Seen=0, whole mails served=1 per pass, lost=0"
    )
    hub.stop()
    assert "Traceback" not in hub.log_text()


def test_changed_bytes_found_while_serving_over_imap_with_tls(make_hub, tmp_path, self_signed_certificate):
    """The copying path (TLS) checks the CRC-32 too: the connection ends inside the literal."""
    cert, key = self_signed_certificate
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_STORAGE_SCRUB_RATE="0",
        **VERIFYING,
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
    ).start()
    sent = send(hub, [2_500_000, 4_000])
    qids = list(sent)
    flip_byte(hub, qids[0])
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.starttls(context)
    imap.login("alpha", PASSWORD)
    imap.select("INBOX")
    status, data = imap.fetch("2", "(BODY.PEEK[])")
    assert status == "OK" and data[0][1].endswith(sent[qids[1]])
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        imap.fetch("1", "(BODY.PEEK[])")
    wait_damaged(hub, 1)
    assert hub.query("SELECT queue_id, found_by FROM damaged") == [(qids[0], "serving")]
    hub.stop()
    assert "Traceback" not in hub.log_text()


@pytest.mark.parametrize("index", ["older", "lost"])
def test_rebuild_index_makes_the_damaged_table_again(make_hub, index):
    """An older index (a backup's, taken before the damage was found) or none at all: rebuild-index
    marks the damaged mails again from the quarantine's records, so the hub keeps refusing them."""
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0", **VERIFYING).start()
    sent = send(hub, [4_000, 5_000, 300_000])
    qids = list(sent)
    backup = hub.data_dir.parent / f"{hub.data_dir.name}-backup"
    hub.cli("storage", "backup", str(backup))
    flip_byte(hub, qids[1])
    flip_byte(hub, qids[2])
    got = pop3_retrieve_all(hub)
    assert got[qids[1]] == CLOSED and got[qids[2]] == CLOSED and whole(got[qids[0]], sent[qids[0]])
    wait_damaged(hub, 2)
    before = hub.query("SELECT queue_id, reason, found_by, quarantine FROM damaged ORDER BY queue_id")
    hub.stop()

    for suffix in ("", "-wal", "-shm"):
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    if index == "older":
        shutil.copy(backup / "index.sqlite3", hub.data_dir / "index.sqlite3")
    result = hub.cli("storage", "rebuild-index", "--json")
    report = json.loads(result.stdout)
    assert report["damaged_marked"] == 2, report
    assert hub.query("SELECT queue_id, reason, found_by, quarantine FROM damaged ORDER BY queue_id") == before
    assert hub.cli("storage", "rebuild-index", "--json").stdout.count('"damaged_marked": 0') == 1  # again: none
    if index == "lost":  # sites made again from the mails' records have no password
        hub.cli("site", "passwd", "alpha", "--password-stdin", stdin=PASSWORD + "\n")

    hub.start()
    got = pop3_retrieve_all(hub)
    assert whole(got[qids[0]], sent[qids[0]])
    if index == "older":  # still in the mailbox (its receiver can delete it), refused before any byte
        assert [q for q in qids if isinstance(got[q], str) and "[SYS/PERM]" in got[q]] == qids[1:]
    else:  # made again from the blobs: a mail whose bytes differ from its record is not put back
        assert list(got) == qids[:1] and len(report["damaged"]) == 2
        assert hub.query("SELECT count(*) FROM messages WHERE crc32 IS NULL") == [(0,)]  # from the records
    print(f"rebuild-index from {index} index: damaged rows made again=2 of 2, refused before any byte=2")
    hub.stop()
    shutil.rmtree(backup)
    assert "Traceback" not in hub.log_text()


def test_verify_while_serving_off_sends_with_sendfile_and_leaves_changed_bytes_to_the_scrub(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()  # the default: off
    sent = send(hub, [300_000, 4_000])
    qids = list(sent)
    flip_byte(hub, qids[0])
    got = pop3_retrieve_all(hub)
    assert isinstance(got[qids[0]], bytes) and not whole(got[qids[0]], sent[qids[0]])  # served, changed
    assert whole(got[qids[1]], sent[qids[1]])
    assert hub.query("SELECT count(*) FROM damaged") == [(0,)]
    wait_for(
        lambda: " direct=2 checked=0 " in hub.log_text(),
        interval=0.05,
        message=lambda: f"a session line with direct=2 checked=0\n{hub.log_text()[-2000:]}",
    )
    hub.stop()

# Verify on the way out (docs/integrity.md): a mail whose blob is cut short is refused before any
# byte of it (POP3 -ERR [SYS/PERM], IMAP tagged NO [CORRUPTION] without its FETCH response); one
# with changed bytes is found by `mailhub storage verify` (exit status 1, beside the running hub
# and with the hub stopped) and by the background scrub, then refused likewise; damaged mails are
# copied to the quarantine, listed by `mailhub storage damaged`, counted, and can still be deleted;
# a blob cut while it is being sent ends the connection without the terminating line. Counts printed.
import hashlib
import imaplib
import json
import os
import poplib
import socket
import time

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from

import smtplib


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


def pop3_retrieve_all(hub) -> dict[str, bytes | str]:
    """queue ID (by order) -> the mail's bytes, or the -ERR reply."""
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    client.user("alpha")
    client.pass_(PASSWORD)
    uids = [line.split()[1].decode() for line in client.uidl()[1]]
    order = [qid for (qid,) in hub.query(
        "SELECT b.queue_id FROM mailbox b JOIN sites s ON s.id = b.site_id WHERE s.name = 'alpha' ORDER BY b.uid")]
    got = {}
    for n, qid in enumerate(order, 1):
        try:
            got[qid] = b"\r\n".join(client.retr(n)[1]) + b"\r\n"
        except poplib.error_proto as exc:
            got[qid] = str(exc)
    assert client.noop().startswith(b"+OK")   # the session goes on after a refusal
    client.quit()
    assert len(uids) == len(order)
    return got


def whole(data: bytes, body: bytes) -> bool:
    return data.endswith(body) and data.startswith(b"Received: ")


def test_damaged_mails_are_refused_found_listed_and_deletable(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()
    sent = send(hub, [5_000, 6_000, 7_000, 400_000, 500_000, 600_000])
    qids = list(sent)
    small_flipped, big_flipped, big_cut = qids[1], qids[4], qids[5]
    assert where(hub, small_flipped)[1] > 0, "the small mail lives in a pack"
    flip_byte(hub, small_flipped)
    flip_byte(hub, big_flipped)
    cut_short(hub, big_cut)

    got = pop3_retrieve_all(hub)
    assert got[big_cut].startswith("b'-ERR [SYS/PERM] message 6 is damaged on the server (blob file cut short")
    assert all(whole(got[q], sent[q]) for q in (qids[0], qids[2], qids[3]))
    # changed bytes of the right size pass the size check: the SHA-256 checks (verify, scrub) find them
    assert all(isinstance(got[q], bytes) and not whole(got[q], sent[q]) for q in (small_flipped, big_flipped))
    deadline = time.monotonic() + 10
    while hub.query("SELECT count(*) FROM damaged") != [(1,)]:   # marked in the background
        assert time.monotonic() < deadline
        time.sleep(0.05)

    result = hub.cli("storage", "verify", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                  if line.startswith("DAMAGED")) == sorted([small_flipped, big_flipped, big_cut])
    assert "2 newly damaged mail(s) marked by the running hub" in result.stdout
    assert "verify: 6/6 mail(s)" in result.stderr
    assert hub.cli("storage", "verify", "--site", "beta").returncode == 0   # nothing in beta's mailbox

    got = pop3_retrieve_all(hub)
    refused = [q for q in qids if isinstance(got[q], str)]
    assert sorted(refused) == sorted([small_flipped, big_flipped, big_cut])
    assert all("[SYS/PERM]" in got[q] for q in refused)
    served = [q for q in qids if q not in refused and whole(got[q], sent[q])]
    assert len(served) == 3

    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("alpha", PASSWORD)
    imap.select("INBOX")
    status, data = imap.fetch("1:6", "(BODY.PEEK[])")
    assert status == "NO" and "[CORRUPTION] message(s) 2,5,6 damaged" in str(data)
    status, data = imap.fetch("1", "(BODY.PEEK[])")
    assert status == "OK" and data[0][1].endswith(sent[qids[0]])
    status, data = imap.fetch("2", "(RFC822.SIZE FLAGS)")   # no body: answered
    assert status == "OK"
    imap.logout()

    listing = json.loads(hub.cli("storage", "damaged", "--json").stdout)
    assert sorted(d["queue_id"] for d in listing) == sorted(refused)
    assert {d["found_by"] for d in listing} == {"serving", "verify"}
    assert all(d["mailboxes"] == ["alpha"] and d["quarantine"] for d in listing)
    quarantined = json.loads(hub.cli("storage", "quarantine", "--json").stdout)
    assert sorted(e["queue_id"] for e in quarantined if e["reason"] == "damaged") == sorted(refused)

    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)   # the receiver deletes them
    client.user("alpha")
    client.pass_(PASSWORD)
    for n in (2, 5, 6):
        client.dele(n)
    assert client.quit().startswith(b"+OK")
    assert hub.query("SELECT count(*) FROM mailbox") == [(3,)]
    print(f"verify on the way out: acknowledged={len(sent)} served whole={len(served)} damaged detected="
          f"{len(refused)} (1 by size while serving, 2 by SHA-256 in `storage verify`); served damaged: 2 before"
          f" the SHA-256 check (same size, bytes changed), 0 after it; cut mails served: 0; lost=0")
    hub.stop()
    assert "Traceback" not in hub.log_text()


def test_the_scrub_and_a_verify_with_the_hub_stopped_find_changed_bytes(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()
    qids = list(send(hub, [3_000, 4_000, 300_000, 5_000]))
    hub.stop()
    flip_byte(hub, qids[1])
    result = hub.cli("storage", "verify", "--quiet", check=False)   # hub stopped: it marks them itself
    assert result.returncode == 1 and "1 newly damaged mail(s) marked (hub stopped)" in result.stdout
    assert result.stderr == ""
    flip_byte(hub, qids[2])
    hub.env["MAILHUB_STORAGE_SCRUB_RATE"] = "50M"
    hub.start()
    deadline = time.monotonic() + 20
    while hub.query("SELECT count(*) FROM damaged WHERE found_by = 'scrub'") != [(1,)]:
        assert time.monotonic() < deadline, hub.log_text()[-2000:]
        time.sleep(0.1)
    assert hub.query("SELECT queue_id FROM damaged ORDER BY found_at") == [(qids[1],), (qids[2],)]
    got = pop3_retrieve_all(hub)
    assert [q for q in qids if isinstance(got[q], str)] == qids[1:3]
    print(f"scrub: acknowledged=4 damaged detected=2 (1 by verify with the hub stopped, 1 by the scrub)"
          f" served damaged=0 lost=0")
    hub.stop()
    assert "scrub" in hub.log_text() and "Traceback" not in hub.log_text()


def test_a_blob_cut_while_it_is_sent_ends_the_connection_without_the_end_line(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()
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
    os.truncate(path, offset + 5_000_000)            # damaged mid-transfer
    tail = b""
    while chunk := reader.read1(1 << 20):
        received += len(chunk)
        tail = (tail + chunk)[-5:]
    sock.close()
    assert received < size and tail != b"\r\n.\r\n"   # the client cannot take it as whole
    print(f"cut mid-transfer: {received} of {size} octets sent, connection closed without the end line")
    hub.stop()

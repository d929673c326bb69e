# Backup, restore and rebuild of the index (issue 21): an online backup taken while mail flows;
# an index restored from it (or lost, or damaged, or its WAL deleted) stops the start with the
# command to run; `mailhub storage rebuild-index` then puts back every acknowledged mail not deleted
# by its receiver, once, and no mail deleted after the backup comes back. Counts are printed and
# asserted (acknowledged, restored, lost = 0, duplicated = 0, resurrected = 0).
import hashlib
import json
import os
import poplib
import re
import smtplib
import threading
from pathlib import Path

from conftest import ALPHA_BETA, PASSWORD, make_message, wait_for

SMALL, LARGE = 6_000, 2_600_000  # packed, and a file of its own (over storage.spool.SMALL_MESSAGE)
MID_RE = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


class Sender:
    """Sends mails from alpha and keeps the ledger of what got a 250: Message-ID -> (sites, digest)."""

    def __init__(self, hub):
        self.hub = hub
        self.acknowledged: dict[str, tuple[set[str], str]] = {}
        self.count = 0

    def send(self, rcpts=("beta@hub.test",), size=SMALL) -> str:
        self.count += 1
        message = make_message(size, subject=f"mail {self.count}")
        mid = MID_RE.search(message).group(1).decode()
        client = smtplib.SMTP("127.0.0.1", self.hub.smtp_port, timeout=60)
        try:
            client.login("alpha", PASSWORD)
            client.sendmail("alpha@hub.test", list(rcpts), message)
        finally:
            client.close()
        sites = {r.split("@")[0] for r in rcpts}
        self.acknowledged[mid] = (sites, hashlib.sha256(message).hexdigest())
        return mid

    def send_many(self, n: int) -> list[str]:
        sent = []
        for i in range(n):
            rcpts = ("beta@hub.test", "alpha@hub.test") if i % 3 == 0 else ("beta@hub.test",)
            sent.append(self.send(rcpts, LARGE if i % 5 == 4 else SMALL))
        return sent


def mailbox(hub, site: str) -> dict[str, tuple[int, str]]:
    """Message-ID -> (count, sha256 of the sent bytes) of a site's mailbox, over POP3 (the hub's
    Received: line stripped)."""
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    try:
        client.user(site)
        client.pass_(PASSWORD)
        found: dict[str, tuple[int, str]] = {}
        for number in range(1, len(client.list()[1]) + 1):
            data = b"\r\n".join(client.retr(number)[1]) + b"\r\n"
            body = data[data.index(b"\r\nFrom: ") + 2 :]
            mid = MID_RE.search(body).group(1).decode()
            count = found.get(mid, (0, ""))[0]
            found[mid] = (count + 1, hashlib.sha256(body).hexdigest())
        return found
    finally:
        client.quit()


def delete_mails(hub, site: str, mids: set[str]) -> None:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    client.user(site)
    client.pass_(PASSWORD)
    for number in range(1, len(client.list()[1]) + 1):
        top = b"\r\n".join(client.top(number, 0)[1])
        if MID_RE.search(top).group(1).decode() in mids:
            client.dele(number)
    client.quit()


def expected(sender: Sender, site: str, deleted: set[str]) -> dict[str, str]:
    return {
        mid: digest
        for mid, (sites, digest) in sender.acknowledged.items()
        if site in sites and (site, mid) not in deleted
    }


def compare(hub, sender: Sender, deleted: set[tuple[str, str]]) -> dict[str, int]:
    counts = {
        "acknowledged": len(sender.acknowledged),
        "lost": 0,
        "duplicated": 0,
        "resurrected": 0,
        "damaged": 0,
        "entries": 0,
    }
    for site in ("alpha", "beta"):
        want = expected(sender, site, deleted)
        have = mailbox(hub, site)
        counts["entries"] += sum(n for n, _ in have.values())
        counts["lost"] += len(set(want) - set(have))
        counts["resurrected"] += len({mid for mid in have if (site, mid) in deleted})
        counts["duplicated"] += sum(n - 1 for n, _ in have.values())
        counts["damaged"] += sum(1 for mid, (_, digest) in have.items() if mid in want and want[mid] != digest)
        unknown = set(have) - set(want) - {mid for s, mid in deleted if s == site}
        assert not unknown, f"{site}: mails nobody acknowledged: {unknown}"
    return counts


def restore_index(hub, backup_dir) -> None:
    for suffix in ("", "-wal", "-shm"):
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    (hub.data_dir / "index.sqlite3").write_bytes((backup_dir / "index.sqlite3").read_bytes())


def refused_start(hub) -> str:
    result = hub.cli("serve", check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_backup_while_mail_flows_then_restore_and_rebuild(make_hub, tmp_path):
    # freed bytes of packs stay for an hour: a mail deleted after the backup still has its bytes
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_RELEASE_FREED_AFTER="3600").start()
    sender = Sender(hub)
    before = sender.send_many(15)
    deleted: set[tuple[str, str]] = set()
    gone_before = {before[1], before[4]}  # one packed, one file of its own
    delete_mails(hub, "beta", gone_before)
    deleted |= {("beta", mid) for mid in gone_before}

    flowing = threading.Event()
    during: list[str] = []

    def keep_sending():
        while not flowing.is_set():
            during.append(sender.send(size=SMALL if len(during) % 4 else LARGE))

    thread = threading.Thread(target=keep_sending)
    thread.start()
    try:
        wait_for(lambda: len(during) >= 3)  # mails flowing when the backup starts...
        backup_dir = tmp_path / "backup"
        result = hub.cli("storage", "backup", str(backup_dir))
        print(result.stdout.strip())
        sent_by_then = len(during)
        wait_for(lambda: len(during) >= sent_by_then + 3)  # ...and still after it
    finally:
        flowing.set()
        thread.join(60)
    after = sender.send_many(10)
    # deleted after the backup: a packed mail (its bytes stay in the pack), a file of its own (unlinked),
    # one of two entries of a mail to two sites (the file stays for the other), and a mail sent after
    gone_after = {before[2], before[9], before[0], after[1]}
    delete_mails(hub, "beta", gone_after)
    deleted |= {("beta", mid) for mid in gone_after}
    assert hub.stop() == 0

    restore_index(hub, backup_dir)
    message = refused_start(hub)
    assert "rebuild-index" in message and "older" in message, message

    result = hub.cli("storage", "rebuild-index")
    print(result.stdout.strip())
    hub.start()
    counts = compare(hub, sender, deleted)
    print(
        f"acknowledged {counts['acknowledged']} (before the backup {len(before)}, during {len(during)},"
        f" after {len(after)}), deleted {len(deleted)} (after the backup {len(gone_after)}): {counts}"
    )
    assert counts["lost"] == counts["duplicated"] == counts["resurrected"] == counts["damaged"] == 0, counts
    assert len(during) >= 2, "no mail flowed while the backup ran"
    assert hub.cli("storage", "check").returncode == 0


def test_a_lost_index_is_rebuilt_with_its_sites(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    sender = Sender(hub)
    sender.send_many(8)
    gone = {next(iter(sender.acknowledged))}
    delete_mails(hub, "beta", gone)
    assert hub.stop() == 0
    for suffix in ("", "-wal", "-shm"):
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    message = refused_start(hub)  # the ledger remembers commits this new, empty index never saw
    assert "rebuild-index" in message
    result = hub.cli("storage", "rebuild-index")
    assert "site alpha made again" in result.stdout and "site beta made again" in result.stdout, result.stdout
    # the audit trail went with the index; the mails put back get an accepted record saying so
    ((entries,),) = hub.query("SELECT count(*) FROM mailbox")
    assert entries > 0
    assert hub.query(
        "SELECT count(*) FROM audit WHERE event = 'accepted' AND detail = 'restored by rebuild-index'"
    ) == [(entries,)]
    for site in ("alpha", "beta"):
        hub.cli("site", "passwd", site, "--password-stdin", stdin=PASSWORD + "\n")
    hub.start()
    counts = compare(hub, sender, {("beta", mid) for mid in gone})
    print(counts)
    assert counts["lost"] == counts["duplicated"] == counts["resurrected"] == 0, counts


def test_a_deleted_wal_is_noticed_and_rebuilt(make_hub):
    hub = make_hub(sites=ALPHA_BETA, process=True).start()
    sender = Sender(hub)
    sender.send_many(6)
    hub.kill(writer_too=True)  # no checkpoint, not even the writer's close: the commits are in the WAL only
    wal = hub.data_dir / "index.sqlite3-wal"
    assert wal.stat().st_size > 0
    wal.unlink()
    (hub.data_dir / "index.sqlite3-shm").unlink(missing_ok=True)
    message = refused_start(hub)
    assert "rebuild-index" in message
    hub.cli("storage", "rebuild-index")
    hub.start()
    counts = compare(hub, sender, set())
    print(counts)
    assert counts["lost"] == counts["duplicated"] == 0, counts


def test_a_damaged_index_stops_the_start_with_one_line_and_is_rebuilt(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    sender = Sender(hub)
    sender.send_many(5)
    assert hub.stop() == 0
    index = hub.data_dir / "index.sqlite3"
    with open(index, "r+b") as f:  # the header and the first pages: not a database any more
        f.write(os.urandom(8192))
    message = refused_start(hub)
    assert str(index) in message and "damaged" in message and "mailhub storage rebuild-index" in message
    result = hub.cli("storage", "check", check=False)
    assert result.returncode == 1 and "rebuild-index" in result.stdout, result.stdout
    result = hub.cli("storage", "rebuild-index")
    print(result.stdout)
    for site in ("alpha", "beta"):  # whatever could not be salvaged is made again, without a password
        hub.cli("site", "passwd", site, "--password-stdin", stdin=PASSWORD + "\n")
    hub.start()
    counts = compare(hub, sender, set())
    print(counts)
    assert counts["lost"] == counts["duplicated"] == 0, counts
    damaged = [e for e in hub.cli("storage", "quarantine", "--json").stdout.split('"reason": ')[1:]]
    assert any(e.startswith('"damaged_index"') for e in damaged)


def test_stray_files_are_reported_and_left_alone(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    sender = Sender(hub)
    sender.send_many(3)
    assert hub.stop() == 0
    strays = [
        hub.data_dir / "spool" / "notes.txt",
        hub.data_dir / "spool" / "folder" / "x",
        hub.data_dir / "blobs" / "README",
        hub.data_dir / "blobs" / "lost+found" / "y",
    ]
    hour = next(p for p in (hub.data_dir / "blobs").iterdir() if p.is_dir() and p.name.isdigit())
    strays += [hour / "copy of a blob", hour / "sub" / "z"]
    for path in strays:
        path.parent.mkdir(exist_ok=True)
        path.write_text("operator's file")
    hub.start()
    assert compare(hub, sender, set())["lost"] == 0
    for path in strays:
        assert path.read_text() == "operator's file"
    log = hub.log_text()
    assert "stray spool/notes.txt left alone" in log and "stray blobs/README left alone" in log
    result = hub.cli("storage", "check", check=False)
    assert result.returncode == 1 and "stray" in result.stdout
    assert hub.stop() == 0


def test_bit_flipped_blobs_and_packs_found_by_a_rebuild_are_quarantined_not_served(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    sender = Sender(hub)
    sent = [sender.send(size=SMALL) for _ in range(6)] + [sender.send(size=LARGE) for _ in range(2)]
    assert hub.stop() == 0
    rows = {
        mid.strip("<>"): (qid, blob, offset, size)
        for qid, blob, offset, size, mid in hub.query(
            "SELECT queue_id, blob, blob_offset, size, message_id FROM messages"
        )
    }

    def flip(mid: str, at: int) -> None:
        _qid, blob, offset, _size = rows[mid]
        with open(hub.data_dir / "blobs" / blob, "r+b") as f:
            f.seek(offset + at)
            byte = f.read(1)
            f.seek(offset + at)
            f.write(bytes([byte[0] ^ 0x10]))

    in_pack, bad_record, large = sent[2], sent[4], sent[6]
    flip(in_pack, rows[in_pack][3] // 2)  # a packed mail's bytes
    flip(bad_record, -10)  # a packed mail's envelope record (its CRC no longer matches)
    flip(large, rows[large][3] // 2)  # a file of its own
    for suffix in ("", "-wal", "-shm"):  # the index is lost: the blobs must speak for themselves
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    report = json.loads(hub.cli("storage", "rebuild-index", "--json").stdout)
    damaged_qids = {rows[in_pack][0], rows[large][0]}
    assert {d.split()[0] for d in report["damaged"]} == damaged_qids, report
    assert len(report["unreadable"]) == 1 and rows[bad_record][1] in report["unreadable"][0], report
    assert len(report["quarantined"]) == 3 and report["restored"] == 5, report
    again = json.loads(hub.cli("storage", "rebuild-index", "--json").stdout)
    assert again["quarantined"] == [] and again["restored"] == 0, again  # nothing copied twice
    for site in ("alpha", "beta"):
        hub.cli("site", "passwd", site, "--password-stdin", stdin=PASSWORD + "\n")
    hub.start()
    have = mailbox(hub, "beta")
    damaged = sum(1 for mid, (_, digest) in have.items() if sender.acknowledged[mid][1] != digest)
    duplicated = sum(n - 1 for n, _ in have.values())
    lost = set(sent) - set(have)
    entries = json.loads(hub.cli("storage", "quarantine", "--json").stdout)
    by_reason: dict[str, list] = {}
    for entry in entries:
        by_reason.setdefault(entry["reason"], []).append(entry)
    print(
        f"\n8 acknowledged, 3 bit-flipped, index lost: {len(have)} served intact, damaged served {damaged},"
        f" duplicated {duplicated}, not restored {len(lost)} (quarantined"
        f" {len(by_reason.get('damaged_mail', []))} damaged, {len(by_reason.get('unreadable_record', []))}"
        f" unreadable)"
    )
    assert damaged == duplicated == 0
    assert lost == {in_pack, bad_record, large}
    assert {q for e in by_reason["damaged_mail"] for q in e["queue_ids"]} == damaged_qids
    (unreadable,) = by_reason["unreadable_record"]
    copy = next(p for p in Path(unreadable["path"]).iterdir() if p.name != "reason.json")
    assert f"<{bad_record}>".encode() in copy.read_bytes()  # its bytes are kept for the operator
    assert not (hub.data_dir / "blobs" / rows[large][1]).exists()  # moved, not served as if whole
    check = hub.cli("storage", "check")  # dealt with: listed, no longer a problem of the index
    assert "2 damaged_mail" in check.stdout and "1 unreadable_record" in check.stdout, check.stdout
    assert hub.stop() == 0

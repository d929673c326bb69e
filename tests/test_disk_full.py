# A full disk while the hub runs: every write that runs out of space (spool file, single-file
# blob, pack, index and its WAL) answers 452 4.3.1 and leaves nothing half-written (no spool file,
# no blob or pack bytes without an index row), mails acknowledged before stay intact, gateways can
# still delete (POP3 DELE + QUIT, IMAP STORE \Deleted + EXPUNGE) on a disk filled to the last byte,
# since that is what frees space (the reserve, storage/reserve.py, given back for a deletion that
# found the disk full), and mail flows again once they have, without a restart. Small tmpfs mounts
# (needs root, as in CI); counts are printed.
import hashlib
import imaplib
import os
import poplib
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from, wait_for


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to its last byte with a filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError:
                break
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(f.fileno(), b"\0" * size)
            except OSError:
                pass
    assert os.statvfs(folder).f_bavail == 0
    return filler


def submit(port: int, login: str, rcpt: str, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.login(login, PASSWORD)
        code, reply = client.mail(f"{login}@hub.test")
        if code != 250:
            return code, reply
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(body)


def unexplained_bytes(hub) -> list[str]:
    """Blob files the index does not account for, and pack tails past their last message."""
    found = []
    ends: dict[str, int] = {}
    for blob, offset, size in hub.query("SELECT blob, blob_offset, size FROM messages"):
        ends[blob] = max(ends.get(blob, 0), offset + size)
    for path in hub.blob_files():
        name = str(path.relative_to(hub.data_dir / "blobs"))
        if name not in ends:
            found.append(f"{name}: no index row")
        elif path.stat().st_size != ends[name]:
            found.append(f"{name}: {path.stat().st_size} bytes, its messages end at {ends[name]}")
    return found


def pop3_delete_all(hub, site: str) -> int:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    client.user(site)
    client.pass_(PASSWORD)
    count, _ = client.stat()
    for n in range(1, count + 1):
        client.dele(n)
    assert client.quit().startswith(b"+OK")
    return count


def test_full_disk_refuses_temporarily_deletes_and_recovers(make_hub, mount):
    """Everything on a 12 MB file system: big mails (spool, single-file blobs) then small ones
    (packs) until it is full; then the disk is filled to the last byte; gateways delete by POP3
    and IMAP; mail flows again."""
    disk = mount("small", "12m")
    hub = make_hub(
        MAILHUB_DATA_DIR=str(disk / "data"), MAILHUB_STORAGE_RESERVE_BYTES="1M", MAILHUB_STORAGE_MIN_FREE_BYTES="0"
    )
    hub.data_dir = disk / "data"
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.start()
    accepted, refusals = {}, []
    for i, size in enumerate([1_500_000] * 10 + [30_000] * 80):
        body = make_message(size, subject=f"fill {i}")
        code, reply = submit(hub.smtp_port, "alpha", "beta@hub.test" if i % 2 else "alpha@hub.test", body)
        if code == 250:
            accepted[queue_id_from(reply)] = (hashlib.sha256(body).hexdigest(), len(body))
        else:
            refusals.append((size, code, reply))
    assert accepted, "nothing fitted at all"
    assert {size for size, _, _ in refusals} == {1_500_000, 30_000}, "a big and a small mail each ran out of space"
    assert all(code == 452 and reply.startswith(b"4.3.1") for _, code, reply in refusals), refusals
    for qid, (digest, size) in accepted.items():
        data = hub.stored(qid)
        assert data.startswith(b"Received: ") and hashlib.sha256(data[-size:]).hexdigest() == digest
    assert not list((hub.data_dir / "spool").iterdir())
    assert unexplained_bytes(hub) == []
    filler = fill(disk)  # not a byte left
    assert submit(hub.smtp_port, "alpha", "beta@hub.test", make_message(5000))[0] == 452
    deleted = pop3_delete_all(hub, "alpha")  # POP3 DELE + QUIT on a full disk
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("beta", PASSWORD)
    imap.select("INBOX")
    assert imap.store("1:*", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert imap.expunge()[0] == "OK"  # IMAP EXPUNGE on a full disk
    imap.logout()
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]
    os.unlink(filler)

    def taken() -> bool:
        code = submit(hub.smtp_port, "alpha", "beta@hub.test", make_message(1_000_000))[0]
        assert code in (250, 452), code
        return code == 250

    wait_for(
        taken, timeout=20, interval=0.1, message="a mail taken again once the space returned"
    )  # read once a second
    print(
        f"full disk: acknowledged={len(accepted)} refused={len(refusals)} (all 452 4.3.1) lost=0"
        f" half-written=0; deleted on a disk full to the last byte: {deleted} by POP3,"
        f" {len(accepted) - deleted} by IMAP"
    )
    hub.stop()
    assert "Traceback" not in hub.log_text()
    assert "reserve" in hub.log_text() and "for a gateway's deletion" in hub.log_text()


def test_full_index_file_system(make_hub, mount):
    """The index (and its WAL) alone on a small file system, filled to the last byte while blobs
    have room: commits fail in SQLite, answer 452 4.3.1 and leave no blob or pack bytes behind;
    mail flows again once the index has room."""
    index_disk = mount("index", "4m")
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_RESERVE_BYTES="0", MAILHUB_STORAGE_MIN_FREE_BYTES="0")
    index = hub.data_dir / "index.sqlite3"
    (index_disk / "index.sqlite3").write_bytes(index.read_bytes())
    index.unlink()
    index.symlink_to(index_disk / "index.sqlite3")
    hub.start()
    for i in range(5):
        assert submit(hub.smtp_port, "alpha", "alpha@hub.test", make_message(20_000, subject=f"before {i}"))[0] == 250
    filler = fill(index_disk)
    accepted, refusals = [], []
    for i in range(400):
        body = make_message(20_000 if i % 3 else 2_500_000, subject=f"index full {i}")
        code, reply = submit(hub.smtp_port, "alpha", "beta@hub.test", body)
        (accepted if code == 250 else refusals).append((code, reply))
        if len(refusals) >= 6:
            break
    assert refusals, "the index never ran out of space"
    assert all(code == 452 and reply.startswith(b"4.3.1") for code, reply in refusals), refusals
    stored = {qid for (qid,) in hub.query("SELECT queue_id FROM messages")}
    assert all(queue_id_from(reply) in stored for _, reply in accepted)
    assert unexplained_bytes(hub) == []  # packed and single-file mails alike
    assert not list((hub.data_dir / "spool").iterdir())
    os.unlink(filler)
    assert pop3_delete_all(hub, "alpha") == 5
    assert submit(hub.smtp_port, "alpha", "beta@hub.test", make_message(20_000))[0] == 250
    print(f"full index: acknowledged={len(accepted) + 5} refused={len(refusals)} (all 452 4.3.1) lost=0 half-written=0")
    hub.stop()
    assert "Traceback" not in hub.log_text()

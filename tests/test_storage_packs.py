# Small mails share blob files (packs; storage/packs.py): every mail still reads back byte-exact
# over POP3 and IMAP and is relayed byte-exact, a freed message's bytes are released (a hole) while
# its pack lives on, a pack is freed with its last message and not before (also while it is the open
# one), and start-up recovery accepts packs. Real hub process, real loopback clients and next hop;
# the race of a freed open pack is played on a real Storage.
import asyncio
import contextlib
import hashlib
import imaplib
import os
import poplib
import threading
import zlib

from test_relay_outbound import CountingHop, log_tail, relay_hub

from storage import db, outbound, store
from storage.store import MessageMeta, Storage

from conftest import ALPHA_BETA_B2, PASSWORD, make_message, wait_for
from pop3util import message_range, released, send

SENDERS = 8
MAILS_EACH = 15


def send_concurrently(hub, rcpt: str = "beta@hub.test") -> dict[str, bytes]:
    """SENDERS sessions at once, MAILS_EACH small mails each: queue ID -> the mail as sent."""
    sent: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for i in range(MAILS_EACH):
                mail = make_message(3000 + 97 * n + i, subject=f"pack {n}.{i}")
                sent[send(hub, [rcpt], mail)] = mail
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(sent) == SENDERS * MAILS_EACH
    return sent


def packs_of(hub) -> dict[str, list[str]]:
    """Blob file -> queue IDs in it, for blob files holding more than one message."""
    rows = hub.query("SELECT blob, queue_id FROM messages ORDER BY blob, blob_offset")
    members: dict[str, list[str]] = {}
    for blob, qid in rows:
        members.setdefault(blob, []).append(qid)
    return {blob: qids for blob, qids in members.items() if len(qids) > 1}


def test_packed_mails_hashed_as_they_end_have_the_digests_of_their_bytes(hub):
    """Mails of 64 KB and more held in memory are hashed as they end, in threads of their own
    (store.HASH_AHEAD_AT), and the pack writer takes those digests: the index's SHA-256 and CRC-32
    are those of the bytes in the pack, mail by mail, also when many end at once."""
    sent: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for i in range(4):
                mail = make_message(store.HASH_AHEAD_AT + 40_000 * n + 7 * i, subject=f"ahead {n}.{i}")
                sent[send(hub, ["beta@hub.test"], mail)] = mail
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(sent) == 24
    for qid, mail in sent.items():
        data = hub.stored(qid)
        assert data.endswith(mail), qid
        ((sha, crc, offset),) = hub.query("SELECT sha256, crc32, blob_offset FROM messages WHERE queue_id = ?", qid)
        assert offset > 0, f"{qid} of {len(mail)} bytes was not packed"
        assert (sha, crc) == (hashlib.sha256(data).hexdigest(), zlib.crc32(data)), qid


def test_packed_mails_read_back_exactly_and_are_freed_with_their_last_message(hub):
    sent = send_concurrently(hub)
    packs = packs_of(hub)
    assert packs, "concurrent small mails were never committed together"
    for qid, mail in sent.items():
        data = hub.stored(qid)
        assert data.endswith(mail), qid
        ((sha,),) = hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", qid)
        assert hashlib.sha256(data).hexdigest() == sha, qid

    # POP3: every message byte-exact (the trace header first, then the mail as sent)
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    numbers = {uid.decode(): int(n) for n, uid in (line.split() for line in pop.uidl()[1])}
    assert len(numbers) == len(sent)
    for qid in sent:
        ((uid,),) = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", qid)
        lines = pop.retr(numbers[str(uid)])[1]
        assert b"\r\n".join(lines) + b"\r\n" == hub.stored(qid), qid
    pop.quit()

    # IMAP: the body of a packed message that is not first in its pack
    blob, members = next(iter(packs.items()))
    later = members[-1]
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
    imap.login("beta", PASSWORD)
    imap.select("INBOX")
    uid = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", later)[0][0]
    typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == hub.stored(later) and data[0][1].endswith(sent[later])
    imap.logout()

    # deleting all but one message of a pack keeps its file and releases their bytes; deleting the
    # last one frees the file
    path = hub.data_dir / "blobs" / blob
    ranges = [message_range(hub, qid) for qid in members[:-1]]
    delete_over_pop3(hub, members[:-1])
    assert path.exists() and all(released(r) for r in ranges)
    assert hub.query("SELECT count(*) FROM blob_holes") == [(0,)]
    assert hub.stored(members[-1]).endswith(sent[members[-1]])
    delete_over_pop3(hub, members[-1:])
    assert not path.exists()

    # a restart's recovery finds every remaining pack whole: nothing to report
    hub.stop()
    mark = len(hub.log_text())
    hub.start()
    assert "recovery:" not in hub.log_text()[mark:]
    for qid in set(sent) - set(members):
        assert hub.stored(qid).endswith(sent[qid])


def delete_over_pop3(hub, queue_ids: list[str]) -> None:
    """Delete the mailbox entries of these messages in one POP3 session (UIDL is the mailbox UID)."""
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    numbers = {uid.decode(): n for n, uid in (line.split() for line in pop.uidl()[1])}
    for qid in queue_ids:
        ((uid,),) = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", qid)
        pop.dele(int(numbers[str(uid)]))
    pop.quit()


def test_packed_mails_are_relayed_intact(make_hub):
    hop = CountingHop(mode="450")  # deferred at first: the packs are still there to look at
    hub = relay_hub(
        make_hub,
        f"remote.test=127.0.0.1:{hop.port}",
        MAILHUB_RELAY_MIN_BACKOFF="3600",
        MAILHUB_RELAY_MAX_BACKOFF="3600",
    )
    try:
        sent = send_concurrently(hub, "someone@remote.test")
        assert packs_of(hub), "concurrent small mails were never committed together"
        hop.mode = "ok"
        wait_for(
            lambda: hub.query("SELECT count(*) FROM outbound WHERE attempts = 0") == [(0,)],
            timeout=30,
            interval=0.1,
            message=lambda: f"every first attempt\n{log_tail(hub)}",
        )
        hub.cli("queue", "retry", "--all")
        wait_for(
            lambda: len(hop.messages) == len(sent),
            timeout=30,
            interval=0.1,
            message=lambda: f"every mail at the next hop\n{log_tail(hub)}",
        )
    finally:
        hop.shutdown()
        hop.server_close()
    assert hub.query("SELECT count(*) FROM outbound") == [(0,)]
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]  # relayed, so freed
    assert not hub.blob_files()  # packs included
    delivered = {qid: m for qid, mail in sent.items() for m in hop.messages if f"id {qid}".encode() in m}
    assert len(delivered) == len(sent)
    for qid, mail in sent.items():
        assert delivered[qid].endswith(mail), qid


def test_mail_after_a_freed_pack_goes_into_a_new_one_and_stays(hub):
    """Sequential mails share the open pack; once all of them are deleted the pack is closed and
    removed, and later mails go into a new pack that a later deletion does not take with it."""
    first = [send(hub, ["beta@hub.test"], make_message(2000 + i, subject=f"first {i}")) for i in range(2)]
    ((old_blob,),) = hub.query("SELECT DISTINCT blob FROM messages")
    delete_over_pop3(hub, first)
    assert not (hub.data_dir / "blobs" / old_blob).exists()
    later = {
        send(hub, ["beta@hub.test"], mail): mail
        for mail in (make_message(2500 + i, subject=f"later {i}") for i in range(3))
    }
    blobs = {blob for (blob,) in hub.query("SELECT blob FROM messages")}
    assert len(blobs) == 1 and old_blob not in blobs
    gone, *kept = later
    where = message_range(hub, gone)
    delete_over_pop3(hub, [gone])
    assert released(where)
    for qid in kept:
        assert hub.stored(qid).endswith(later[qid])
    hub.stop()
    mark = len(hub.log_text())
    hub.start()
    assert "recovery:" not in hub.log_text()[mark:]
    for qid in kept:
        assert hub.stored(qid).endswith(later[qid])


def test_a_pack_freed_while_open_is_not_removed_once_it_takes_new_mail(tmp_path):
    """The open pack's last message is freed (the pack goes into the trash) and a new message is
    appended to it before the trash is emptied: emptying must keep the pack and the new message."""

    async def play() -> tuple[bytes, bytes, list]:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            first = await store_small(storage, b"Subject: one\r\n\r\nfirst\r\n")
            await storage.queue_op(outbound.delete, first, None)  # the relay is done with it
            second = await store_small(storage, b"Subject: two\r\n\r\nsecond\r\n")
            await storage.empty_trash()
            with contextlib.closing(db.connect(tmp_path)) as conn:
                trash = conn.execute("SELECT blob FROM blob_trash").fetchall()
                blob, offset, size = conn.execute(
                    "SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", (second,)
                ).fetchone()
            with open(storage.blob_dir / blob, "rb") as f:
                f.seek(offset)
                return f.read(size), blob, trash
        finally:
            await storage.close()

    data, blob, trash = asyncio.run(play())
    assert data == b"Subject: two\r\n\r\nsecond\r\n" and trash == []


async def store_small(storage: Storage, data: bytes) -> str:
    spool = storage.new_spool()
    spool.write(data)
    await storage.commit(spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
    return spool.queue_id


def test_mails_under_two_megabytes_are_packed_and_larger_ones_get_a_file_of_their_own(hub):
    small = make_message(5000, subject="small")
    image = make_message(1_500_000, subject="one image")  # a typical single-image DICOM mail
    study = make_message(3_000_000, subject="a whole series")  # streamed to a file of its own
    qids = [send(hub, ["beta@hub.test"], mail) for mail in (small, image, study)]
    rows = {qid: hub.query("SELECT blob, blob_offset FROM messages WHERE queue_id = ?", qid)[0] for qid in qids}
    assert rows[qids[1]][0] == rows[qids[0]][0] and rows[qids[1]][1] > 0  # appended to the same pack
    assert rows[qids[2]][1] == 0 and rows[qids[2]][0] != rows[qids[0]][0]
    assert hub.query("SELECT count(*) FROM messages WHERE blob = ?", rows[qids[2]][0]) == [(1,)]
    for qid, mail in zip(qids, (small, image, study)):
        assert hub.stored(qid).endswith(mail), qid


def test_freed_bytes_in_a_pack_are_released_only_after_the_configured_delay(make_hub):
    """A reader may still be sending a message that another session just deleted: its range of
    the pack is punched only once storage.release_freed_after has passed since it was freed."""
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_STORAGE_RELEASE_FREED_AFTER="3600").start()
    sent = [make_message(4000 + i, subject=f"delay {i}") for i in range(3)]
    first, second, third = qids = [send(hub, ["beta@hub.test"], mail) for mail in sent]
    ranges = {qid: message_range(hub, qid) for qid in qids}
    assert len({path for path, _offset, _size in ranges.values()}) == 1  # one pack
    delete_over_pop3(hub, [first])
    assert not released(ranges[first])  # still readable
    blob = f"{ranges[first][0].parent.name}/{ranges[first][0].name}"
    assert hub.query("SELECT blob, start, size FROM blob_holes") == [(blob, ranges[first][1], ranges[first][2])]
    conn = hub.db()
    conn.execute("UPDATE blob_holes SET freed_at = freed_at - 3601")  # as if an hour had passed
    conn.commit()
    conn.close()
    delete_over_pop3(hub, [second])  # the next emptying of the trash
    assert released(ranges[first]) and not released(ranges[second])
    assert hub.query("SELECT count(*) FROM blob_holes") == [(1,)]
    assert hub.stored(third).endswith(sent[2])


def resident_pages(path, start: int, end: int) -> int:
    """Pages of the byte range [start, end) of a file that are in the page cache (mmap + mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    page = mmap.PAGESIZE
    first = start // page * page
    length = end - first
    with open(path, "rb") as f:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), first)
    assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    try:
        vector = (ctypes.c_ubyte * ((length + page - 1) // page))()
        assert libc.mincore(address, length, vector) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vector)
    finally:
        libc.munmap(address, length)


def test_only_the_latest_committed_mail_stays_in_the_page_cache(tmp_path, monkeypatch):
    """Issue 24: a backlog of many GB must not grow the page cache: past KEEP_CACHED bytes of
    committed mail, the oldest mails' pages are dropped (they read back intact, from the disk)."""
    monkeypatch.setattr(store, "KEEP_CACHED", 2_500_000)  # the last two of these mails
    mails = [b"Subject: c%d\r\n\r\n" % i + bytes([65 + i]) * 1_000_000 + b"\r\n" for i in range(8)]

    async def play():
        storage = Storage(tmp_path)
        await storage.open()
        try:
            qids = [await store_small(storage, mail) for mail in mails]  # one batch each, one pack
            storage.executor.shutdown(wait=True)  # the drops it was given are done
            found = await storage._index.fetchall("SELECT queue_id, blob, blob_offset, size FROM messages")
            return qids, {row[0]: row[1:] for row in found}
        finally:
            await storage.close()

    qids, rows = asyncio.run(play())
    assert len({rows[qid][0] for qid in qids}) == 1
    paths = {qid: (tmp_path / "blobs" / rows[qid][0], rows[qid][1], rows[qid][2]) for qid in qids}
    resident = [resident_pages(path, offset + 4096, offset + size - 4096) for path, offset, size in paths.values()]
    assert resident[:3] == [0, 0, 0], resident  # the oldest: dropped (up to the 4 MiB boundary)
    assert all(n > 0 for n in resident[-2:]), resident  # the latest 2.5 MB: still cached
    for qid, mail in zip(qids, mails):
        path, offset, size = paths[qid]
        with open(path, "rb") as f:
            assert os.pread(f.fileno(), size, offset) == mail

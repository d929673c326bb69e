# The storage facade used by the network code: spool a message, commit it durably (group commit),
# list and delete mailbox entries, free blobs with their last reference, keep per-site download totals.
# Order of a commit: spool fsync -> rename into blobs/ -> folder fsync -> SQLite commit -> caller
# may reply 250. Must never report success before all four are done. Small messages go as a
# group: the writer thread appends a batch of them to the open pack file with one fdatasync
# (storage/packs.py), then commits. A blob file is unlinked only after the commit that put it
# into blob_trash (start-up recovery finishes what a crash cut short); an open pack is closed
# first. A freed message's range of a pack that lives on is punched after a delay (blob_holes).
# The tracking events (storage/events.py) are rows in the same transactions: accepted + delivered
# with the group commit, downloaded + deleted with a session's deletions; SMTP refusals are queued
# without waiting and ride along with the next transaction (or get one of their own after a second).
# Every index write (commits, deletions, download totals, trash) runs on the one writer thread and
# its connection: one writer means no SQLite lock contention (a second writing connection starved
# for its busy_timeout under steady ingest) and no interleaved transactions. aiosqlite only reads.
# Remote recipients get outbound queue rows in the same transaction as the message (storage.outbound).
import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite

from . import db, events
from .errors import StorageError
from .recovery import recover
from .packs import PackWriter, punch_hole
from .spool import SpoolFile, blob_name, blob_of, new_queue_id, unlink_quietly
from .usage import (DOWNLOADS_SQL, USAGE_SQL, VOLUME_SQL, UsageSnapshot, periods, rebuild_usage,
                    snapshot_from_rows, write_throttle_states)

log = logging.getLogger("mailhub.storage")
_EVENT_DELAY = 1.0           # seconds a queued refusal waits for a commit to ride along with
_MAX_QUEUED_EVENTS = 10000   # refusals queued beyond this are dropped (and counted in the log)


@dataclass(slots=True)
class MessageMeta:
    """What the ingest learnt about a message while it streamed."""
    mail_from: str
    sender_site: int | None
    dot_lines: bool
    message_id: str | None = None
    set_id: str | None = None
    set_part: int | None = None
    set_total: int | None = None
    sender_name: str | None = None   # the sending site's name (for the tracking record)
    peer: str | None = None          # the client's IP address
    structure: dict | None = None   # MIME structure record (relay.mime_structure), offsets in the blob


@dataclass(slots=True)
class Delivery:
    site_id: int
    rcpt: str
    site_name: str | None = None   # for the tracking record


@dataclass(slots=True)
class MailboxEntry:
    uid: int
    queue_id: str
    size: int
    dot_lines: bool
    path: Path
    sha256: str
    sender_site: int | None = None
    fetched: bool = False     # downloaded before (by an earlier session)
    flags: int = 0            # IMAP flag bits (relay.imap_fetch: \Seen 1, \Answered 2, ...)
    delivered_at: float = 0.0
    offset: int = 0           # where the message starts in its blob file (a pack of small messages)


@dataclass(slots=True)
class Downloads:
    """What one mailbox session sent to its site (added to running totals per site)."""
    polled_at: float          # login time (time.time())
    messages: int = 0         # whole messages (RETR)
    bytes: int = 0            # message octets (RETR and TOP)
    send_seconds: float = 0.0
    fetched_uids: list[int] = field(default_factory=list)   # entries downloaded for the first time
    protocol: str = "pop3"
    peer: str | None = None   # the client's IP address
    retrieved: dict[str, tuple[float, int]] = field(default_factory=dict)   # queue ID -> (time, octets)
    sessions: int = 1         # 0 for a later part of a session already counted (IMAP records at each expunge)


@dataclass(slots=True)
class _Pending:
    spool: SpoolFile
    meta: MessageMeta
    deliveries: list[Delivery]
    remote: list[str]
    received_at: float
    done: asyncio.Future
    mark: tuple[str, int] | None = None  # a meta (key, value) set in the same transaction
    data: list[bytes] | None = None      # a small message's chunks, still to be written by the batch
    target: Path | None = None           # its blob path if it begins a pack (set for packed messages)


class Storage:
    def __init__(self, data_dir: Path, release_freed_after: float = 3600):
        self.data_dir = Path(data_dir)
        self.release_freed_after = release_freed_after   # seconds before a freed range of a pack is punched
        self.spool_dir = self.data_dir / "spool"
        self.blob_dir = self.data_dir / "blobs"
        self._db: aiosqlite.Connection | None = None
        self._pending: list[_Pending] = []
        self._queued_events: list[events.Event] = []
        self._dropped_events = 0
        self._event_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task | None = None
        # Disk work (file creation, writes, fsyncs) runs here, off the event loop; mostly I/O waits.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage")
        # Group commits run in one thread on a plain sqlite3 connection: renames, folder fsync and
        # the index transaction in a single hop (aiosqlite would cost one loop round trip per
        # statement, which measurably lengthened every commit under load).
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self._writer_conn = None
        self._packs = PackWriter()   # used on the writer thread only
        self._listeners: list = []
        self.on_outbound = None  # called after a commit that queued remote recipients (wakes the relay)

    def add_listener(self, listener) -> None:
        """Tell `listener` of every change to the mailboxes once it is committed, on the event
        loop: committed(sender_site, receiver_site_ids, size, at) per message,
        fetched_committed(site_id, uid, sender_site, size) when an entry is first marked downloaded,
        removed(site_id, uid, sender_site, size, was_waiting) per deleted entry."""
        self._listeners.append(listener)

    async def open(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        conn = db.connect(self.data_dir)  # creates the schema
        try:
            report = recover(conn, self.spool_dir, self.blob_dir)
            rebuild_usage(conn)
        finally:
            conn.close()
        if report.anything():
            log.warning("recovery: %s", report)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._open_writer)
        self._db = await aiosqlite.connect(db.index_path(self.data_dir), isolation_level=None)
        for pragma in db.pragma_statements():
            await self._db.execute(pragma)

    async def close(self) -> None:
        if self._event_timer is not None:
            self._event_timer.cancel()
        if self._queued_events:
            self._start_flusher()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._db is not None:
            await self._db.close()
            self._db = None
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close_writer)
        self._writer.shutdown(wait=True)
        self.executor.shutdown(wait=True)

    def _open_writer(self) -> None:
        self._writer_conn = db.connect(self.data_dir)

    def _close_writer(self) -> None:
        self._packs.close()
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    def new_spool(self) -> SpoolFile:
        return SpoolFile(self.spool_dir, new_queue_id(), self.executor)

    async def commit(self, spool: SpoolFile, meta: MessageMeta, deliveries: list[Delivery],
                     mark: tuple[str, int] | None = None, remote: list[str] = ()) -> None:
        """Make the spooled message durable, put it into the local recipients' mailboxes, queue it
        for the remote recipients (and set the meta row `mark`), all in one index transaction."""
        received_at = time.time()
        target = self.blob_dir / blob_name(spool.queue_id, received_at)
        done = asyncio.get_running_loop().create_future()
        if spool.in_memory:
            item = _Pending(spool, meta, deliveries, list(remote), received_at, done, mark,
                            spool.take_chunks(), target)
        else:
            await spool.sync(target)
            spool.handed_over = True
            item = _Pending(spool, meta, deliveries, list(remote), received_at, done, mark)
        self._pending.append(item)
        self._start_flusher()
        await asyncio.shield(item.done)
        if item.remote and self.on_outbound is not None:
            self.on_outbound()

    def record_event(self, event: events.Event) -> None:
        """Queue a tracking event that changes no state (an SMTP refusal) without waiting: it is
        written with the next commit, or within _EVENT_DELAY seconds. Lost if the hub crashes first."""
        if len(self._queued_events) >= _MAX_QUEUED_EVENTS:
            self._dropped_events += 1
            return
        self._queued_events.append(event)
        if self._event_timer is None and (self._flusher is None or self._flusher.done()):
            self._event_timer = asyncio.get_running_loop().call_later(_EVENT_DELAY, self._start_flusher)

    def _start_flusher(self) -> None:
        self._event_timer = None
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    async def queue_op(self, function, *args):
        """Run a storage.outbound function (conn, *args) in one transaction on the writer thread."""
        return await self._write(self._in_transaction, function, *args)

    def _in_transaction(self, function, *args):
        conn = self._writer_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = function(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    async def store_generated(self, data: bytes, meta: MessageMeta, deliveries: list[Delivery],
                              mark: tuple[str, int] | None = None) -> str:
        """Put a small message made by the hub itself (CRLF, not dot-stuffed) into mailboxes through
        the same spool -> sync -> commit path as received mail; returns its queue ID."""
        spool = self.new_spool()
        spool.write(data)
        try:
            await self.commit(spool, meta, deliveries, mark)
        except BaseException:
            spool.discard()
            raise
        return spool.queue_id

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._queued_events:
            batch, self._pending = self._pending, []
            loose, self._queued_events = self._queued_events, []
            if self._dropped_events:
                log.warning("%d refusal event(s) not recorded: too many queued", self._dropped_events)
                self._dropped_events = 0
            try:
                await loop.run_in_executor(self._writer, self._commit_batch, batch, loose)
            except BaseException as exc:  # the batch is lost as a whole; nothing was acknowledged
                log.error("commit of %d message(s) and %d event(s) failed: %s", len(batch), len(loose), exc)
                await loop.run_in_executor(self.executor, self._remove_blobs, batch)
                error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                for item in batch:
                    for listener in self._listeners:
                        listener.committed(item.meta.sender_site, [d.site_id for d in item.deliveries],
                                           item.spool.size, item.received_at)
                    if not item.done.done():
                        item.done.set_result(None)

    def _remove_blobs(self, batch: list[_Pending]) -> None:
        """The single-file blobs of a failed batch (its packed messages went with PackWriter.abandon)."""
        for item in batch:
            if item.target is None:
                unlink_quietly(item.spool.path)

    def _commit_batch(self, batch: list[_Pending], loose: list[events.Event]) -> None:
        """Writer thread: one index transaction for a batch of durable blobs, with their tracking
        events and the queued refusal events."""
        packed = [item for item in batch if item.data is not None]
        try:
            self._write_small(packed)
            self._index_batch(batch, loose)
        except BaseException:
            if packed:
                self._packs.abandon()
            raise

    def _index_batch(self, batch: list[_Pending], loose: list[events.Event]) -> None:
        messages = []
        entries = []
        queued = []
        tracked = [events.row(e) for e in loose]
        for item in batch:
            m = item.meta
            qid, size, at = item.spool.queue_id, item.spool.size, item.received_at
            structure = None if m.structure is None else json.dumps(m.structure, separators=(",", ":"))
            messages.append((qid, blob_of(item.spool.path), item.spool.offset, size, item.spool.sha256,
                             int(m.dot_lines), at, m.mail_from, m.sender_site,
                             m.message_id, m.set_id, m.set_part, m.set_total,
                             len(item.deliveries) + len(item.remote), structure))
            tracked.append((at, events.ACCEPTED, qid, m.sender_name, None, m.mail_from, None, m.peer, size,
                            m.message_id, m.set_id, m.set_part, m.set_total, item.spool.sha256))
            for d in item.deliveries:
                entries.append((d.site_id, qid, d.rcpt, at))
                tracked.append((at, events.DELIVERED, qid, d.site_name, m.sender_name, None, d.rcpt, None, size,
                                None, None, None, None, None))
            queued.extend((qid, rcpt, at, at) for rcpt in item.remote)
        conn = self._writer_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO messages (queue_id, blob, blob_offset, size, sha256, dot_lines, received_at,"
                " mail_from, sender_site, message_id, set_id, set_part, set_total, refs, structure)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", messages)
            conn.executemany(
                "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (?, ?, ?, ?)", entries)
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [item.mark for item in batch if item.mark is not None])
            conn.executemany(events.INSERT, tracked)
            if queued:
                conn.executemany("INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at)"
                                 " VALUES (?, ?, ?, ?)", queued)
            # a pack that was freed while open is referenced again
            conn.executemany("DELETE FROM blob_trash WHERE blob = ?",
                             [(blob,) for blob in {blob_of(i.spool.path) for i in batch if i.target is not None}])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write_small(self, items: list[_Pending]) -> None:
        """Writer thread: append a batch of small messages to the open pack (storage/packs.py)."""
        self._packs.write([(item.spool, item.data, item.target) for item in items])
        for item in items:
            item.data = None

    async def mailbox(self, site_id: int) -> list[MailboxEntry]:
        """The site's mailbox entries in delivery order."""
        async with self._db.execute(
                "SELECT b.uid, m.queue_id, m.size, m.dot_lines, m.blob, m.sha256, m.sender_site,"
                " b.fetched_at IS NOT NULL, b.flags, b.delivered_at, m.blob_offset FROM mailbox b"
                " JOIN messages m ON m.queue_id = b.queue_id WHERE b.site_id = ? ORDER BY b.uid",
                (site_id,)) as cursor:
            rows = await cursor.fetchall()
        return [MailboxEntry(uid, qid, size, bool(dots), self.blob_dir / blob, sha, sender, bool(fetched), flags,
                             delivered, offset)
                for uid, qid, size, dots, blob, sha, sender, fetched, flags, delivered, offset in rows]

    async def message_structure(self, queue_id: str) -> dict | None:
        """The MIME structure recorded at ingest (relay.mime_structure), or None (unknown message,
        or stored before structures were recorded)."""
        async with self._db.execute("SELECT structure FROM messages WHERE queue_id = ?", (queue_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None or row[0] is None:
            return None
        return json.loads(row[0])

    async def uid_next(self, site_id: int) -> int:
        """A UID above every UID the site's mailbox ever had (IMAP UIDNEXT)."""
        async with self._db.execute(
                "SELECT max(coalesce((SELECT uid_next FROM imap_uid_next WHERE site_id = ?), 1),"
                " coalesce((SELECT max(uid) + 1 FROM mailbox WHERE site_id = ?), 1))", (site_id, site_id)) as cursor:
            (value,) = await cursor.fetchone()
        return value

    async def set_flags(self, site_id: int, uids: list[int], add: int, remove: int) -> None:
        """Set the `add` and clear the `remove` flag bits of mailbox entries (one transaction)."""
        await self._write(self._update_flags, site_id, uids, add, remove)

    def _update_flags(self, site_id: int, uids: list[int], add: int, remove: int) -> None:
        """Writer thread."""
        conn = self._writer_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE mailbox SET flags = (flags | ?) & ~? WHERE site_id = ? AND uid = ?",
                             [(add, remove, site_id, uid) for uid in uids])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def usage_snapshot(self, now: float) -> UsageSnapshot:
        """Mailbox usage, this day's and month's volumes and download counters (for the quotas)."""
        usage = await self._db.execute_fetchall(USAGE_SQL)
        volumes = await self._db.execute_fetchall(VOLUME_SQL, periods(now))
        downloads = await self._db.execute_fetchall(DOWNLOADS_SQL)
        return snapshot_from_rows(now, usage, volumes, downloads)

    async def save_throttle_states(self, states: dict[int, dict], now: float) -> None:
        """The server's live throttle state per site, for `mailhub site show` (one transaction)."""
        await self._write(self._save_throttle_states, states, now)

    def _save_throttle_states(self, states: dict[int, dict], now: float) -> None:
        conn = self._writer_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            write_throttle_states(conn, states, now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def delete(self, site_id: int, uids: list[int], downloads: Downloads | None = None,
                     site_name: str | None = None) -> None:
        """Remove mailbox entries (and add a session's downloads to the site's totals) in one
        transaction with their tracking events; blobs whose last reference goes are freed after the
        commit."""
        await self._write_entries(site_id, uids, downloads, site_name)
        await self.empty_trash()

    async def record_downloads(self, site_id: int, downloads: Downloads, site_name: str | None = None) -> None:
        """Add a session's downloads to the site's totals (for a session that ended without UPDATE)."""
        await self._write_entries(site_id, [], downloads, site_name)

    async def _write_entries(self, site_id: int, uids: list[int], downloads: Downloads | None,
                             site_name: str | None) -> None:
        fetched, removed = await self._write(self._delete_entries, site_id, uids, downloads, site_name)
        for listener in self._listeners:
            for row in fetched:
                listener.fetched_committed(site_id, *row)
            for row in removed:
                listener.removed(site_id, *row)

    async def _write(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._writer, function, *args)

    def _delete_entries(self, site_id: int, uids: list[int], downloads: Downloads | None, site_name: str | None):
        """Writer thread: one transaction, with the tracking events. Returns what changed: ([(uid,
        sender_site, size)] newly marked downloaded, [(uid, sender_site, size, was_waiting)] removed)."""
        conn = self._writer_conn
        fetched, removed, tracked = [], [], []
        now = time.time()
        protocol = downloads.protocol if downloads is not None else None
        peer = downloads.peer if downloads is not None else None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for uid in (downloads.fetched_uids if downloads is not None else ()):
                row = conn.execute(_ENTRY_SQL, (site_id, uid)).fetchone()
                if row is not None and row[3]:
                    conn.execute("UPDATE mailbox SET fetched_at = ? WHERE uid = ?", (now, uid))
                    fetched.append(row[:3])
            for uid in uids:
                row = conn.execute(_ENTRY_SQL, (site_id, uid)).fetchone()
                if row is not None:
                    gone = conn.execute("DELETE FROM mailbox WHERE uid = ? RETURNING queue_id", (uid,)).fetchall()
                    removed.append(row)
                    tracked.append(events.row(events.Event(now, events.DELETED, gone[0][0], site_name, peer=peer,
                                                           detail=protocol)))
            if downloads is not None:
                _add_downloads(conn, site_id, downloads)
                tracked[:0] = [events.row(events.Event(at, events.DOWNLOADED, qid, site_name, peer=peer, size=size,
                                                       detail=protocol))
                               for qid, (at, size) in downloads.retrieved.items()]
            conn.executemany(events.INSERT, tracked)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return fetched, removed

    async def prune_events(self, before: float) -> int:
        """Delete tracking events older than `before` in short transactions (commits run between
        them); the count."""
        total = 0
        while (deleted := await self._write(events.prune_batch, self._writer_conn, before)) > 0:
            total += deleted
            if deleted < events.PRUNE_BATCH:
                break
        return total

    def _freed(self) -> tuple[list[str], list[tuple[str, int, int]]]:
        """Writer thread: the freed blobs, and the ranges of packs that live on freed at least
        release_freed_after seconds ago (a reader may still be sending a message freed meanwhile:
        a hole would turn its bytes into zeros, while an unlinked file stays readable). A freed
        open pack is closed first: no more messages go into it (a pack is never reopened, so what
        is listed here stays free)."""
        blobs = [blob for (blob,) in self._writer_conn.execute("SELECT blob FROM blob_trash")]
        if self._packs.open_blob in blobs:
            self._packs.close()
        holes = self._writer_conn.execute("SELECT blob, start, size FROM blob_holes WHERE freed_at <= ?",
                                          (time.time() - self.release_freed_after,)).fetchall()
        return blobs, holes

    def _forget_freed(self, blobs: list[str], holes: list[tuple[str, int, int]]) -> None:
        """Writer thread."""
        self._writer_conn.executemany("DELETE FROM blob_trash WHERE blob = ?", [(b,) for b in blobs])
        self._writer_conn.executemany("DELETE FROM blob_holes WHERE blob = ? AND start = ?",
                                      [(blob, start) for blob, start, _size in holes])

    async def empty_trash(self) -> None:
        """Remove the files of freed blobs and release the space of freed messages in packs."""
        blobs, holes = await self._write(self._freed)
        if not blobs and not holes:
            return
        await asyncio.get_running_loop().run_in_executor(self.executor, self._release, blobs, holes)
        await self._write(self._forget_freed, blobs, holes)

    def _release(self, blobs: list[str], holes: list[tuple[str, int, int]]) -> None:
        for blob in blobs:
            unlink_quietly(self.blob_dir / blob)
        gone = set(blobs)
        for blob, start, size in holes:
            if blob not in gone:
                try:
                    punch_hole(self.blob_dir / blob, start, size)
                except OSError as exc:   # the space comes back with the whole pack
                    log.warning("could not release freed bytes of %s: %s", blob, exc)


_ENTRY_SQL = ("SELECT b.uid, m.sender_site, m.size, b.fetched_at IS NULL FROM mailbox b"
              " JOIN messages m ON m.queue_id = b.queue_id WHERE b.site_id = ? AND b.uid = ?")


def _add_downloads(conn, site_id: int, d: Downloads) -> None:
    conn.execute(
        "INSERT INTO site_downloads (site_id, sessions, messages, bytes, send_seconds, first_poll_at,"
        " last_poll_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site_id) DO UPDATE SET"
        " sessions = sessions + excluded.sessions, messages = messages + excluded.messages,"
        " bytes = bytes + excluded.bytes, send_seconds = send_seconds + excluded.send_seconds,"
        " last_poll_at = max(last_poll_at, excluded.last_poll_at)",
        (site_id, d.sessions, d.messages, d.bytes, d.send_seconds, d.polled_at, d.polled_at))

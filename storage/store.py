# The storage facade used by the network code: spool a message, commit it durably (group commit),
# list and delete mailbox entries, free blobs with their last reference, keep per-site download totals.
# Order of a commit: spool fsync -> rename into blobs/ -> folder fsync (one per folder for all the
# files of a group commit) -> index commit -> caller may reply 250. Must never report success
# before all four are done. Small messages go as a
# group: one of 64 KB or more is hashed as it ends in a hashing thread (no one on the loop waits for
# it), then a batch of them is appended to the open pack with one fdatasync (storage/packs.py, in
# a worker thread of this process, which collects those digests and hashes the smaller mails: one
# hand-off from the loop per batch), then the index writer commits their rows: message bytes never
# cross to the writer.
# Batches are pipelined: the next batch is written to the pack while the index commits the one
# before, and is committed only after that one is (if it fails, the next fails with it). A record
# names as its predecessor only a group commit known to be committed (storage/rebuild.py takes that
# as proof), so start-up recovery allows two uncommitted group commits past the index's last.
# A blob file is unlinked only after the commit that put it into blob_trash (start-up recovery
# finishes what a crash cut short); an open pack is closed first (never while a batch writes to
# it: _batch_lock). A freed message's range of a pack that lives on is punched after a delay (blob_holes).
# The tracking events (storage/events.py) are rows in the same transactions: accepted + delivered
# with the group commit, downloaded + deleted with a session's deletions; SMTP refusals are queued
# without waiting and ride along with the next transaction (or get one of their own after a second).
# Every index write (commits, deletions, download totals, trash) runs in the index writer process
# (storage/writer_process.py, storage/index_writer.py) on its one connection: one writer means no
# SQLite lock contention (a second writing connection starved for its busy_timeout under steady
# ingest) and no interleaved transactions. The event loop only reads (storage/index_reader.py: aiosqlite, or
# a few read-only PostgreSQL connections in a thread pool; storage.index = "postgresql://...").
# Remote recipients get outbound queue rows in the same transaction as the message (storage.outbound).
# With the blobs on object storage (storage/object_blobs.py, `objects`), every mail is a file of
# its own (no packs), uploaded after its rename into blobs/ and before the index commit; blobs/ is
# then a cache, and serving first makes sure the mail is in it (ready()).
import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import audit, blob_layout, db, envelope, events, faults, reserve, sql, verify
from .errors import CommitUnknown, MailboxLimitReached, StorageError, StorageFull, WriterDied, refusal
from .files import drop_cached, fsync_dir, storage_error, unlink_quietly
from .folder_lock import lock_data_folder
from .index import IndexLocation
from .index_reader import AsyncReader, open_reader
from .index_writer import BatchItem, IndexWriter
from .ledger import next_seq
from .memory_budget import MemoryBudget
from .object_blobs import ObjectBlobs, ObjectStoreError
from .packs import PackWriter, digest, punch_hole
from .records import Delivery, Downloads, MailboxEntry, MessageMeta, Removal
from .recovery import quarantine_uncommitted, recover
from .spool import SpoolFile, blob_name, new_queue_id
from .usage import DOWNLOADS_SQL, USAGE_SQL, VOLUME_SQL, UsageSnapshot, rebuild_usage, snapshot_from_rows, window_start
from .writer_process import WriterProcess

log = logging.getLogger("mailhub.storage")
_EVENT_DELAY = 1.0  # seconds a queued refusal waits for a commit to ride along with
_MAX_QUEUED_EVENTS = 10000  # refusals queued beyond this are dropped (and counted in the log)
# Bytes of the latest committed mail left in the page cache: an eighth of the machine's memory (at
# least 256 MiB). A gateway that fetches within that much newer mail reads it from memory (POP3 and
# IMAP send from the cache, as the download benchmarks measure); older mail is dropped from the
# cache after its commit, so that a backlog of many GB does not keep growing the page cache
# (measured: growing it into memory the machine never used cost the writing threads 1-2 ms of
# system time per MB; docs/benchmarks.md, issue 24).
KEEP_CACHED = max(256 * 1024 * 1024, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
_FOLIO = 2 * 1024 * 1024  # the largest page-cache folio: a dropped range of a pack covers whole ones
HASH_AHEAD_AT = 64 * 1024  # a mail held in memory at least this big is hashed as it ends, beside the
# loop and the pack writer (who collects the digest in its thread); a smaller one by the pack writer


class MailboxListener(Protocol):
    """Hears of every committed change to the mailboxes (Storage.add_listener)."""

    def committed(self, sender_site: int | None, receiver_site_ids: list[int], size: int, at: float, /) -> None: ...

    def fetched_committed(self, site_id: int, uid: int, sender_site: int | None, size: int, /) -> None: ...

    def removed(self, site_id: int, uid: int, sender_site: int | None, size: int, was_waiting: bool, /) -> None: ...


@dataclass(slots=True)
class _Pending:
    spool: SpoolFile
    meta: MessageMeta
    deliveries: list[Delivery]
    remote: list[str]
    received_at: float
    done: asyncio.Future[None]
    blob: str  # its blob ('<hour folder>/<name>'), or the one a pack it begins takes
    mark: tuple[str, int] | None = None  # a meta (key, value) set in the same transaction
    data: list[bytes] | None = None  # a small message's chunks, still to be written by the batch
    on_committed: Callable[[], None] | None = None  # called right after the listeners heard of the commit
    hashing: concurrent.futures.Future[tuple[str, int]] | None = None  # its (SHA-256, CRC-32), if hashed ahead


@dataclass
class _Written:
    """A batch after phase one of its group commit (its small messages' frames durable in the pack)."""

    items: list[BatchItem]
    loose: list[tuple[Any, ...]]  # event rows riding along
    seq: int
    attempt: int
    ends: dict[str, int]  # pack -> end of its last frame (empty: it wrote no frames)


class Storage:
    def __init__(
        self,
        data_dir: Path,
        release_freed_after: float = 3600,
        reserve_bytes: int = 0,
        memory_budget: int = 256 * 1024**2,
        min_free_bytes: int = 0,
        blobs: Path | None = None,
        node: str = "",
        index_url: str = "",
        objects: ObjectBlobs | None = None,
    ):
        self.data_dir = Path(data_dir).absolute()  # the index writer process gets it as it is
        self.index = IndexLocation(self.data_dir, index_url)  # SQLite in data_dir, or PostgreSQL
        # storage.blobs (a shared folder, storage/blob_layout.py) and this node's name in it
        self.shared_blobs = Path(blobs).absolute() if blobs is not None else None
        self.node = node or blob_layout.default_node_name()
        self.layout = blob_layout.BlobLayout(self.data_dir)  # set by open()
        self.release_freed_after = release_freed_after  # seconds before a freed range of a pack is punched
        self.reserve_bytes = reserve_bytes  # space set aside for a full disk (storage.reserve)
        self._disk_full = False  # the hub started short of space: no mail taken until the reserve is back
        self._full_checked = 0.0
        self.damaged: dict[str, str] = {}  # queue ID -> why (table damaged): never served again
        self.on_damaged: Callable[[str], None] | None = None
        self._marking: set[asyncio.Task[bool]] = (
            set()
        )  # called with found_by for each mail newly found damaged (metrics)
        self.min_free_bytes = min_free_bytes  # below this much free space new mail is refused at MAIL FROM
        self._free: tuple[float, int] = (float("-inf"), 0)  # (monotonic time read, free bytes)
        self.spool_dir = self.data_dir / "spool"
        self.blob_dir = self.data_dir / "blobs"
        self._spool_folder = str(self.spool_dir)  # paths per message are plain strings (cheaper)
        self._blob_folder = str(self.blob_dir)
        self._db: AsyncReader | None = None
        self._pending: list[_Pending] = []
        self._queued_events: list[events.Event] = []
        self._dropped_events = 0
        self._event_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Disk work (file creation, writes, fsyncs) runs here, off the event loop; mostly I/O waits.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage")
        # Mails held in memory hashed as they end (HASH_AHEAD_AT): nobody on the loop waits for one;
        # the pack writer's thread takes each digest when it writes that mail.
        self._hasher = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="storage-hash")
        # Group commits and every other index write: one request (a transaction) per hop.
        self._writer = WriterProcess(self.data_dir, release_freed_after, index_url)
        self._writer.node = self.node  # named in the mailbox changes told to other nodes (PostgreSQL index)
        self._packs = PackWriter(self._blob_folder)  # small messages' frames, written by the batch
        self._last_commit: tuple[int, int] | None = None  # (seq, attempt) of the writer's last group commit
        # the last group commit whose mails the listeners counted (their reservations ended): named
        # in this node's reservations snapshots (storage/cluster_events.py)
        self.counted_seq: int | None = None
        self._batch_lock = asyncio.Lock()  # batches (pack writes and commits) vs emptying the trash
        self._trash_waiting = 0  # empty_trash calls waiting for _batch_lock: the pipeline lets go
        self._in_flight_seq: int | None = None  # the number of the group commit under way
        self._arrival: asyncio.Future[None] | None = None  # woken by a mail joining the pending batch
        self._trash_seen: dict[str, float] = {}  # shared blob folder: freed file -> first seen (monotonic)
        self.monotonic: Callable[[], float] = time.monotonic  # (tests step it)
        # committed mails not yet dropped from the page cache: (path, end in the file, size, packed)
        self._cached: collections.deque[tuple[str, int, int, bool]] = collections.deque()
        self._cached_bytes = 0  # in self._cached
        self._listeners: list[MailboxListener] = []
        self.on_outbound: Callable[[], None] | None = (
            None  # called after a commit that queued remote recipients (wakes the relay)
        )
        self._folder_lock: int | None = None  # held from open() to close() (storage.folder_lock)
        self.memory_budget = MemoryBudget(memory_budget)  # bytes of mails in flight held in memory
        self.objects = objects  # the blobs' object store (blobs/ its cache), or None: blobs/ holds them
        if objects is not None:
            objects.executor = self.executor
            objects.min_free_bytes = min_free_bytes

    @property
    def listeners(self) -> list[MailboxListener]:
        """The listeners added so far (a cluster link feeds other nodes' changes to the same ones)."""
        return list(self._listeners)

    def add_listener(self, listener: MailboxListener) -> None:
        """Tell `listener` of every change to the mailboxes once it is committed, on the event
        loop: committed(sender_site, receiver_site_ids, size, at) per message,
        fetched_committed(site_id, uid, sender_site, size) when an entry is first marked downloaded,
        removed(site_id, uid, sender_site, size, was_waiting) per deleted entry."""
        self._listeners.append(listener)

    @property
    def _index(self) -> AsyncReader:
        """The event loop's read connection to the index (made by open())."""
        assert self._db is not None, "storage not open"
        return self._db

    async def open(self) -> None:
        """Take the data folder (one serving hub per folder), recover, start the index writer."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._folder_lock = lock_data_folder(self.data_dir)
        try:
            self._disk_full = reserve.release_if_short(self.data_dir, self.reserve_bytes)
            self.index.prepare()  # PostgreSQL: the schema migrated (once per database and process)
            # a shared blob folder: checked, the node's number and links made (before spool/ and blobs/)
            self.layout = blob_layout.prepare(
                self.data_dir, self.shared_blobs, self.node, lambda: _open_index(self.index)
            )
            if self.objects is not None and self.index.is_postgresql:
                self.layout = self._object_store_layout()
                self.objects.node_number = self.layout.number  # its own multipart uploads: its queue IDs
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            conn = _open_index(self.index)
            try:
                if isinstance(conn, sqlite3.Connection):
                    db.check(conn)  # the file's quick integrity check (PostgreSQL checks its own pages)
                if self.shared_blobs is None and self.objects is None:
                    blob_layout.refuse_cluster_index(conn)  # a node that forgot storage.blobs
                report = recover(conn, self.data_dir, self.layout, cache=self.objects is not None)
                try:
                    rebuild_usage(conn)
                except sqlite3.OperationalError as exc:  # a full disk: the triggers kept it anyway
                    report.skipped.append(f"recomputing the mailbox usage: {exc}")
            finally:
                conn.close()
        except BaseException:
            self.layout.close()
            os.close(self._folder_lock)
            self._folder_lock = None
            raise
        if report.anything():
            log.warning("recovery: %s", report)
        self._writer.commit_stream = self.layout.number  # several nodes: a stream of numbers each
        try:
            await self._writer.start()
            self._last_commit = await self._writer.call(IndexWriter.last_commit)
            self.counted_seq = self._last_commit[0] if self._last_commit else None
            await self.keep_reserve()
            self._db = await open_reader(self.index)
            self.damaged = dict(await self._db.fetchall("SELECT queue_id, reason FROM damaged"))
            if self.objects is not None:
                await self._start_objects(self.objects, report.uncommitted)
        except BaseException:  # no writer, or the store unreachable or not the index's: nothing may stay open
            await self.close()
            raise

    def _object_store_layout(self) -> blob_layout.BlobLayout:
        """Several nodes on one index with the mail on object storage: the node's number from the
        index, so that its queue IDs (the objects' names) and group commits are its own."""
        conn = _open_index(self.index)
        try:
            number = blob_layout.register_node(conn, self.node)
        finally:
            conn.close()
        return blob_layout.BlobLayout(self.data_dir, node=self.node, number=number)

    async def _start_objects(self, objects: ObjectBlobs, uncommitted: list[str]) -> None:
        """Blobs on object storage: what the cache holds, freed objects deleted, then the store's
        start-up check (storage/object_blobs.py); a mail whose object is missing is marked damaged.
        `uncommitted`: the cached files recovery found no index row for (left in place)."""
        loop = asyncio.get_running_loop()
        uncommitted = await objects.leftovers(uncommitted)  # the others were copies of freed mail
        for text in await loop.run_in_executor(self.executor, quarantine_uncommitted, self.data_dir, uncommitted):
            log.warning("recovery: quarantined %s", text)
        await loop.run_in_executor(self.executor, objects.scan_cache)
        try:
            await self.empty_trash()
        except StorageError as exc:  # housekeeping tries again
            log.warning("freeing the objects of deleted mail failed (housekeeping tries again): %s", exc)
        newest = list(
            await self._index.fetchall("SELECT blob, received_at FROM messages ORDER BY queue_id DESC LIMIT ?", (200,))
        )

        async def indexed_between(low: str, high: str) -> set[str]:
            rows = await self._index.fetchall("SELECT blob FROM messages WHERE blob >= ? AND blob < ?", (low, high))
            return {blob for (blob,) in rows}

        report = await objects.start([(b, t) for b, t in newest], indexed_between, uncommitted=uncommitted)
        log.info("object store %s: %s", objects.location, report)
        for blob in report.orphans_deleted:
            log.warning("object store: deleted the object of uncommitted mail %s (its sender got no 250)", blob)
        for blob in report.orphans_kept[:_ORPHANS_LOGGED]:
            log.warning(
                "object store: object %s has no index row; left (a commit in flight, or mail of another index:"
                " see docs/storage.md, Mail on object storage)",
                blob,
            )
        if len(report.orphans_kept) > _ORPHANS_LOGGED:
            log.warning(
                "object store: %d more objects no index row names left", len(report.orphans_kept) - _ORPHANS_LOGGED
            )
        for blob in report.missing:
            self.mark_damaged_soon(blob.rpartition("/")[2], "its object is missing from the object store", "start")

    async def keep_reserve(self) -> None:
        """Set the full-disk reserve aside again once there is room (start-up and housekeeping)."""
        kept = await asyncio.get_running_loop().run_in_executor(
            self.executor, reserve.keep, self.data_dir, self.reserve_bytes
        )
        if kept and self._disk_full:
            log.warning("space is back: the full-disk reserve is set aside again and mail is taken")
            self._disk_full = False

    async def short_of_space(self, declared: int | None = None) -> bool:
        """Whether new mail is refused for want of space (asked at MAIL FROM, before the client sends
        a byte of it): the hub started on a full disk, or a deletion took the reserve, and it is not
        back yet; or less than min_free_bytes plus 1.5 times the declared size (SIZE=) is free, as
        Postfix's smtpd asks. The disk is looked at once a second at most (statvfs: no disk I/O)."""
        now = time.monotonic()
        if self._disk_full and now - self._full_checked >= 1.0:
            self._full_checked = now
            await self.keep_reserve()
        if self._disk_full:
            return True
        if now - self._free[0] >= 1.0:
            try:
                self._free = (now, reserve.free_bytes(self.spool_dir))  # the blobs' file system
            except OSError:
                return False  # unknown: the writes will tell
        return self._free[1] < self.min_free_bytes + 1.5 * (declared or 0)

    async def _freeing(self, method: Callable[..., object], *args: object) -> Any:
        """An index write that frees space or leads to it (a deletion, IMAP \\Deleted): on a full disk
        the reserve is given back for it and it is tried once more; new mail waits until space returns."""
        try:
            return await self._writer.call(method, *args)
        except StorageFull:
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(self.executor, reserve.release, self.data_dir):
                raise
            self._disk_full, self._full_checked = True, time.monotonic()
            return await self._writer.call(method, *args)

    async def close(self) -> None:
        if self._event_timer is not None:
            self._event_timer.cancel()
        if self._queued_events:
            self._start_flusher()
        if self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._db is not None:
            await self._db.close()
            self._db = None
        await self._writer.close()
        self.executor.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self._packs.close()
        self.layout.close()
        if self._folder_lock is not None:
            os.close(self._folder_lock)
            self._folder_lock = None

    def new_spool(self) -> SpoolFile:
        return SpoolFile(self._spool_folder, new_queue_id(self.layout.number), self.executor, self.memory_budget)

    async def commit(
        self,
        spool: SpoolFile,
        meta: MessageMeta,
        deliveries: list[Delivery],
        mark: tuple[str, int] | None = None,
        remote: Sequence[str] = (),
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        """Make the spooled message durable, put it into the local recipients' mailboxes, queue it
        for the remote recipients (and set the meta row `mark`), all in one index transaction.
        `on_committed()` runs as soon as the listeners have counted the commit, before any other
        task can run (the quota reservation of the mail ends there, exactly as the ledger counts it)."""
        received_at = time.time()
        blob = self.layout.prefix + blob_name(spool.queue_id, received_at)
        done = asyncio.get_running_loop().create_future()
        if spool.in_memory and self.objects is None:
            chunks = spool.take_chunks()
            hashing = self._hasher.submit(digest, chunks) if spool.size >= HASH_AHEAD_AT else None
            item = _Pending(
                spool, meta, deliveries, list(remote), received_at, done, blob, mark, chunks, on_committed, hashing
            )
            done.add_done_callback(lambda _: spool.release())  # the batch holding its bytes is over
        else:

            def tail(sha256: str, crc32: int) -> bytes:  # its envelope record, written and fsynced with it
                return envelope.trailer(
                    envelope.record(
                        spool.queue_id,
                        spool.size,
                        received_at,
                        sha256,
                        meta,
                        deliveries,
                        remote,
                        envelope.structure_json(meta),
                        crc=crc32,
                    ),
                    spool.size,
                )

            await spool.sync(f"{self._blob_folder}/{blob}", tail)
            spool.handed_over = True
            faults.hit("hub", "blob_synced")
            if self.objects is not None:
                await self._upload(self.objects, spool.path, blob)
                faults.hit("hub", "object_uploaded")
            item = _Pending(
                spool, meta, deliveries, list(remote), received_at, done, blob, mark, on_committed=on_committed
            )
        self._pending.append(item)
        self._start_flusher()
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        await asyncio.shield(item.done)
        faults.hit("hub", "committed")
        if item.remote and self.on_outbound is not None:
            self.on_outbound()

    async def _upload(self, objects: ObjectBlobs, path: str, blob: str) -> None:
        """The blob file into the object store before its commit; on failure the file goes
        (nothing of the mail stays) and the sender is told to try again (451 4.3.0)."""
        try:
            await objects.upload(path, blob)
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(self.executor, unlink_quietly, path)
            raise

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

    async def queue_op(self, function: Callable[..., object], *args: object) -> Any:
        """Run a storage.outbound function (conn, *args) in one transaction in the index writer process."""
        return await self._writer.call(IndexWriter.in_transaction, function, *args)

    async def store_generated(
        self,
        data: bytes,
        meta: MessageMeta,
        deliveries: list[Delivery],
        mark: tuple[str, int] | None = None,
        remote: Sequence[str] = (),
    ) -> str:
        """Put a small message made by the hub itself (CRLF, not dot-stuffed) into mailboxes (and
        the outbound queue for `remote` recipients) through the same spool -> sync -> commit path as
        received mail; returns its queue ID."""
        spool = self.new_spool()
        spool.write(data)
        try:
            await self.commit(spool, meta, deliveries, mark, remote)
        except BaseException:
            spool.discard()
            raise
        return spool.queue_id

    async def _flush_loop(self) -> None:
        while self._pending or self._queued_events:
            async with self._batch_lock:  # let go between runs: a waiting empty_trash goes next
                await self._pipeline()

    async def _pipeline(self) -> None:
        """Group commits one after another while mail keeps coming, each batch's pack write (phase
        one) overlapping the index commit of the batch before (phase two): at most one commit under
        way and one batch written behind it. Returns with nothing under way once nothing is pending
        or empty_trash waits for the lock."""
        loop = asyncio.get_running_loop()
        committing: asyncio.Task[BaseException | None] | None = None  # phase two of the batch before
        committing_batch: list[_Pending] = []
        try:
            while True:
                if not (self._pending or self._queued_events):
                    if committing is None:
                        return
                    self._arrival = loop.create_future()  # Storage.commit wakes it
                    await asyncio.wait((committing, self._arrival), return_when=asyncio.FIRST_COMPLETED)
                    self._arrival = None
                    if committing.done():
                        committing = None
                    continue
                if self._trash_waiting:
                    return
                batch, self._pending = self._pending, []
                loose, self._queued_events = self._queued_events, []
                if self._dropped_events:
                    log.warning("%d refusal event(s) not recorded: too many queued", self._dropped_events)
                    self._dropped_events = 0
                written = await self._write_batch(batch, loose, committing)
                before_failed: BaseException | None = None
                try:
                    before_failed = None if committing is None else await committing
                except Exception as exc:  # a bug past its commit: the batch behind is failed, never stranded
                    log.exception("group commit ended abnormally; the batch written behind it is failed")
                    before_failed = exc
                committing = None
                if written is None:
                    continue
                if before_failed is not None:  # the pack was cut back to where that batch began
                    await self._fail(batch, len(loose), _behind(before_failed))
                    continue
                self._in_flight_seq = written.seq if written.items else None
                committing, committing_batch = loop.create_task(self._index_commit(batch, written)), batch
        except BaseException:  # cancelled (an abnormal end of the hub): so is the commit under way
            if committing is not None:
                committing.cancel()
            raise
        finally:  # (letting go of the lock for empty_trash waits for the commit under way instead)
            if committing is not None:
                await asyncio.wait((committing,))
                if committing.cancelled():  # before it began: its senders are told here
                    self._in_flight_seq = None
                    await self._fail(committing_batch, 0, asyncio.CancelledError())

    async def _write_batch(
        self, batch: list[_Pending], loose: list[events.Event], committing: asyncio.Task[BaseException | None] | None
    ) -> _Written | None:
        """Phase one of a group commit: fsync the folders of the batch's files of their own and
        write its small messages' frames into the pack (durable), numbered as the group commit after
        the one under way (if any). Each frame's record names the last group commit known to be
        committed as its predecessor (never the one under way: only a commit proves another). None
        if it failed (the batch is told; the commit under way is untouched)."""
        wrote = False  # its frames are in the pack (and in the pack writer's uncommitted batches)
        try:
            faults.hit("hub", "before_batch")
            if self._last_commit is None:  # a failure: the writer knows where the numbering stands
                if committing is not None:
                    await asyncio.wait((committing,))
                self._last_commit = await self._writer.call(IndexWriter.last_commit)
            last_seq, last_attempt = self._last_commit
            base = self._in_flight_seq if self._in_flight_seq is not None else last_seq
            seq, attempt = next_seq(base, self.layout.number), secrets.randbits(62) + 1
            items = [_batch_item(i) for i in batch]
            packed = [item for item in items if item.data is not None]
            # files of their own were fsynced and renamed into blobs/: one fsync per folder for all of them
            folders = {os.path.dirname(i.spool.path) for i in batch if i.data is None}
            ends: dict[str, int] = {}
            if folders:
                await asyncio.get_running_loop().run_in_executor(self.executor, _fsync_folders, folders)
            if packed:

                def record_of(item: BatchItem) -> bytes:
                    assert item.sha256 is not None  # set by the pack writer
                    item.structure = envelope.structure_json(item.meta)
                    return envelope.record(
                        item.queue_id,
                        item.size,
                        item.received_at,
                        item.sha256,
                        item.meta,
                        item.deliveries,
                        item.remote,
                        item.structure,
                        seq=seq,
                        a=attempt,
                        p=[last_seq, last_attempt],
                        crc=item.crc32,
                    )

                hashing = [(i, p.hashing) for i, p in zip(items, batch) if p.hashing is not None]
                ends = await asyncio.get_running_loop().run_in_executor(
                    self.executor, _write_hashed, self._packs, packed, record_of, hashing
                )
                wrote = True
                for item in packed:
                    item.data = None  # the bytes stay here: the writer gets the rows
                if committing is not None and not committing.done():
                    faults.hit("hub", "written_behind_a_commit")
        except BaseException as exc:  # a failed write cut back its own frames already (PackWriter.write)
            if wrote and not isinstance(exc, asyncio.CancelledError):
                await asyncio.get_running_loop().run_in_executor(self.executor, self._packs.abandon_newest)
            await self._fail(batch, len(loose), exc, pack_cut_back=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None
        return _Written(items, [events.row(e) for e in loose], seq, attempt, ends)

    async def _index_commit(self, batch: list[_Pending], written: _Written) -> BaseException | None:
        """Phase two: the index writer commits the batch's rows as group commit `seq`; then each
        sender is told (250, or the reason it was left out). Returns why it failed (all told), or None."""
        loop = asyncio.get_running_loop()
        try:
            try:
                if written.items:
                    digests: list[str | None] = await self._writer.call(
                        IndexWriter.commit_batch,
                        written.items,
                        written.loose,
                        written.seq,
                        written.attempt,
                        written.ends,
                    )
                else:
                    digests = await self._writer.call(IndexWriter.commit_batch, [], written.loose)
            except WriterDied:
                digests = await self._settle(batch)
            if written.items:
                self._last_commit = (written.seq, written.attempt)
            if written.ends:  # it wrote frames
                self._packs.committed()
            self._keep_cached(written.items)
        except BaseException as exc:
            await self._fail(batch, len(written.loose), exc)
            return exc
        finally:
            self._in_flight_seq = None
        refused = [item for item, sha256 in zip(batch, digests) if refusal(sha256) is not None]
        if refused:  # a mailbox had no room left, a volume was reached (the writer's check): not committed
            await loop.run_in_executor(self.executor, self._remove_blobs, refused)
            if self.objects is not None:
                await self.objects.discard([item.blob for item in refused])
        for item, sha256 in zip(batch, digests):
            left_out = refusal(sha256)
            if left_out is not None or sha256 is None:
                if not item.done.done():
                    item.done.set_exception(left_out or MailboxLimitReached())
                continue
            if item.data is not None:
                item.spool.packed(sha256)
            elif self.objects is not None:
                self.objects.committed(item.blob, _file_size(item.spool.path))
            try:  # the mail is committed: a listener's failure must not keep its 250 (or the next batch's answer)
                for listener in self._listeners:
                    listener.committed(
                        item.meta.sender_site,
                        [d.site_id for d in item.deliveries],
                        item.spool.size,
                        item.received_at,
                    )
                if item.on_committed is not None:
                    item.on_committed()
            except Exception:
                log.exception("a listener failed on committed mail %s (the mail stands)", item.spool.queue_id)
            if not item.done.done():
                item.done.set_result(None)
        if written.items:  # (no await since the listeners counted them: no snapshot comes between)
            self.counted_seq = written.seq
        return None

    async def _fail(self, batch: list[_Pending], loose: int, exc: BaseException, pack_cut_back: bool = False) -> None:
        """A batch is lost as a whole (nothing of it was acknowledged): undo what it wrote, tell its
        senders. `pack_cut_back`: its write failed, and cut back only its own frames (the batch
        before may still commit); otherwise every uncommitted batch's frames go."""
        loop = asyncio.get_running_loop()
        log.error("commit of %d message(s) and %d event(s) failed: %s", len(batch), loose, str(exc) or repr(exc))
        try:
            if isinstance(exc, (asyncio.CancelledError, _Unsettled, CommitUnknown)):
                # cancelled, or not settled, the request may have been committed by the writer:
                # its pack bytes and blobs stay (start-up recovery moves them aside if they were not)
                self._last_commit = None  # asked again before the next batch
                await asyncio.shield(loop.run_in_executor(self.executor, self._packs.unsettled))
            else:
                if not pack_cut_back:
                    self._last_commit = None
                    await loop.run_in_executor(self.executor, self._packs.abandon)
                await loop.run_in_executor(self.executor, self._remove_blobs, batch)
                if self.objects is not None:
                    await self.objects.discard([item.blob for item in batch])
        finally:  # its senders are told even if undoing it failed (start-up recovery finishes that)
            error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(error)

    def _keep_cached(self, items: list[BatchItem]) -> None:
        """Note the committed mails; past KEEP_CACHED bytes, the oldest ones are dropped from the
        page cache (in a worker thread, not waited for): a file of its own or a closed pack whole,
        the open pack from its start up to the last 2 MiB boundary before the end of its newest mail
        due (it is written in order, so all before is older; the kernel drops only whole folios, of
        up to 2 MiB)."""
        for item in items:
            self._cached.append((f"{self._blob_folder}/{item.blob}", item.offset + item.size, item.size, item.packed))
            self._cached_bytes += item.size
        whole: set[str] = set()  # files of their own, and packs no longer written to
        packs: dict[str, int] = {}
        open_pack = f"{self._blob_folder}/{self._packs.open_blob}"
        while self._cached_bytes > KEEP_CACHED:
            path, end, size, packed = self._cached.popleft()
            self._cached_bytes -= size
            if not packed or path != open_pack:
                whole.add(path)
            elif end >= _FOLIO:
                packs[path] = max(packs.get(path, 0), end // _FOLIO * _FOLIO)
        ranges = [(path, 0, 0) for path in whole] + [(path, 0, end) for path, end in packs.items() if path not in whole]
        if ranges:
            self.executor.submit(drop_cached, ranges)

    async def _settle(self, batch: list[_Pending]) -> list[str | None]:
        """The index writer died with the batch: ask the new one whether it was committed. Yes: each
        mail's SHA-256 (the senders get their 250), as commit_batch returns them. No: StorageError,
        and nothing of it is left (the new writer removed what the old one wrote; the caller removes
        the single files)."""
        try:
            found = await self._writer.call(
                IndexWriter.settle,
                [i.spool.queue_id for i in batch],
                [i.blob for i in batch if i.data is not None],
                self.layout.prefix,
            )
        except StorageError as exc:
            raise _Unsettled(f"index writer process ended, and whether it committed is unknown: {exc}") from exc
        if found is None:
            raise StorageError("index writer process ended before the commit")
        log.warning("index writer process ended after committing %d message(s): acknowledged", len(found))
        return [found.get(i.spool.queue_id) for i in batch]  # None: left out for want of room

    def _remove_blobs(self, batch: list[_Pending]) -> None:
        """The single-file blobs of a failed batch (its packed messages went with PackWriter.abandon
        or IndexWriter.settle), and the spool file a pack it began started as (a writer killed
        before renaming it)."""
        for item in batch:
            unlink_quietly(item.spool.path)

    async def mailbox(self, site_id: int) -> list[MailboxEntry]:
        """The site's mailbox entries in delivery order."""
        rows = await self._index.fetchall(
            "SELECT b.uid, m.queue_id, m.size, m.dot_lines, m.blob, m.sha256, m.sender_site,"
            " b.fetched_at IS NOT NULL, b.flags, b.delivered_at, m.blob_offset, m.crc32 FROM mailbox b"
            " JOIN messages m ON m.queue_id = b.queue_id WHERE b.site_id = ? ORDER BY b.uid",
            (site_id,),
        )
        return [
            MailboxEntry(
                uid,
                qid,
                size,
                bool(dots),
                self.blob_dir / blob,
                sha,
                sender,
                bool(fetched),
                flags,
                delivered,
                offset,
                crc,
            )
            for uid, qid, size, dots, blob, sha, sender, fetched, flags, delivered, offset, crc in rows
        ]

    async def ready(self, entry: MailboxEntry) -> str | None:
        """serving_problem() for a mail about to be served, after making sure (blobs on object
        storage) that its file is in the cache: downloaded if need be, a missing or changed object
        marked damaged. OSError when the object store cannot be read now (the session ends with a
        temporary error; the client tries again)."""
        if self.objects is not None and entry.queue_id not in self.damaged:
            problem = await self.cached(entry.path, entry.size, entry.sha256)
            if problem is not None:
                self.mark_damaged_soon(entry.queue_id, problem, "serving")
                return problem
        return self.serving_problem(entry)

    @contextlib.contextmanager
    def serving(self, path: Path) -> Iterator[None]:
        """While a mail's blob file is being sent: never evicted from the node's cache (blobs on
        object storage; nothing to do otherwise)."""
        if self.objects is None:
            yield
            return
        blob = path.relative_to(self.blob_dir).as_posix()
        self.objects.pin(blob)
        try:
            yield
        finally:
            self.objects.unpin(blob)

    async def cached(self, path: Path, size: int, sha256: str = "") -> str | None:
        """Blobs on object storage: make sure the blob file at `path` (under blobs/) is in the
        node's cache, downloading and checking it if not; None when it is there, else why not (its
        object missing or different). OSError when the store cannot be read now. Without an object
        store: None (blobs/ holds every mail). Without `sha256` (the relay's callers) the one the
        index recorded is looked up: a download is never cached unchecked (the cached file is
        served to every reader after it as it is)."""
        if self.objects is None:
            return None
        blob = path.relative_to(self.blob_dir).as_posix()
        if not sha256 and not os.path.exists(path):
            rows = await self._index.fetchall("SELECT sha256 FROM messages WHERE blob = ? LIMIT 1", (blob,))
            if not rows or not rows[0][0]:
                return f"mail {blob} has no index row with its SHA-256 (freed?): not downloaded"
            sha256 = rows[0][0]
        try:
            return await self.objects.ready(blob, size, sha256)
        except ObjectStoreError as exc:
            raise OSError(errno.EIO, str(exc)) from None

    def serving_problem(self, entry: MailboxEntry) -> str | None:
        """Checked before a mail is served (POP3 +OK, an IMAP literal): why it must not be, or None.
        Known damage, or its blob file missing or too short (one stat; a mail newly found so is
        marked damaged in the background)."""
        reason = self.damaged.get(entry.queue_id)
        if reason is not None:
            return reason
        reason = verify.size_problem(entry.path, entry.offset, entry.size)
        if reason is not None:
            if not self.layout.available():  # the shared folder is away: not the mail's fault
                return f"the shared blob folder {self.layout.root} cannot be reached"
            self.mark_damaged_soon(entry.queue_id, reason, "serving")
        return reason

    def mark_damaged_soon(self, queue_id: str, reason: str, found_by: str) -> None:
        """Refuse the mail from now on and mark it damaged in the background (mark_damaged)."""
        self.damaged[queue_id] = reason
        task = asyncio.ensure_future(self.mark_damaged(queue_id, reason, found_by))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def mark_damaged(self, queue_id: str, reason: str, found_by: str) -> bool:
        """Note a mail as damaged: a copy of what is on disk of it into the quarantine, a `damaged`
        row; from now on it is refused to POP3 and IMAP clients. False if it is unknown or known already,
        or if the shared blob folder cannot be reached (nothing is marked: the mail is not at fault)."""
        if not self.layout.available():
            self.damaged.pop(queue_id, None)
            log.error("mail %s not marked damaged (%s): the shared blob folder cannot be reached", queue_id, reason)
            return False
        self.damaged[queue_id] = reason
        rows = await self._index.fetchall(
            "SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", (queue_id,)
        )
        if not rows:
            return False
        blob, offset, size = rows[0]
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                self.executor,
                verify.quarantine_copy,
                self.data_dir,
                self.blob_dir / blob,
                offset,
                size,
                queue_id,
                reason,
                found_by,
            )
            new: bool = await self._writer.call(
                IndexWriter.mark_damaged, queue_id, reason, found_by, time.time(), entry
            )
        except StorageError as exc:
            log.error("mail %s is damaged (%s) but could not be recorded so: %s", queue_id, reason, exc)
            return False
        if new:
            log.error(
                "mail %s is damaged: %s (found by %s); POP3/IMAP refuse it, its receiver can delete it;"
                " a copy is in quarantine/%s",
                queue_id,
                reason,
                found_by,
                entry or "(none: nothing to copy)",
            )
            if self.on_damaged is not None:
                self.on_damaged(found_by)
        return new

    async def messages_after(self, queue_id: str, limit: int, exact: bool = False) -> list[Any]:
        """(queue_id, blob, blob_offset, size, sha256) of up to `limit` mails after `queue_id` in
        queue ID order (the scrub), or with exact=True of that one mail if it is still stored."""
        if exact:
            return await self._index.fetchall(
                "SELECT queue_id, blob, blob_offset, size, sha256 FROM messages WHERE queue_id = ?", (queue_id,)
            )
        return await self._index.fetchall(
            "SELECT queue_id, blob, blob_offset, size, sha256 FROM messages WHERE queue_id > ? ORDER BY queue_id"
            " LIMIT ?",
            (queue_id, limit),
        )

    async def message_structure(self, queue_id: str) -> dict[str, Any] | None:
        """The MIME structure recorded at ingest (relay.mime.structure), or None (unknown message,
        or stored before structures were recorded)."""
        rows = await self._index.fetchall("SELECT structure FROM messages WHERE queue_id = ?", (queue_id,))
        if not rows or rows[0][0] is None:
            return None
        structure: dict[str, Any] = json.loads(rows[0][0])
        return structure

    async def uid_next(self, site_id: int) -> int:
        """A UID above every UID the site's mailbox ever had (IMAP UIDNEXT)."""
        rows = await self._index.fetchall(
            "SELECT max(n) FROM (SELECT coalesce((SELECT uid_next FROM imap_uid_next WHERE site_id = ?), 1) AS n"
            " UNION ALL SELECT coalesce((SELECT max(uid) + 1 FROM mailbox WHERE site_id = ?), 1)) AS u",
            (site_id, site_id),
        )
        uid_next: int = rows[0][0]  # an aggregate gives a row
        return uid_next

    async def set_flags(self, site_id: int, uids: list[int], add: int, remove: int) -> None:
        """Set the `add` and clear the `remove` flag bits of mailbox entries (one transaction)."""
        await self._freeing(IndexWriter.update_flags, site_id, uids, add, remove)

    async def usage_snapshot(self, now: float) -> UsageSnapshot:
        """Mailbox usage, this day's and month's volumes and download counters (for the quotas)."""
        usage = await self._index.fetchall(USAGE_SQL)
        volumes = await self._index.fetchall(VOLUME_SQL, window_start(now))
        downloads = await self._index.fetchall(DOWNLOADS_SQL)
        return snapshot_from_rows(now, usage, volumes, downloads)

    async def save_throttle_states(self, states: dict[int, dict[str, Any]], now: float) -> None:
        """The server's live throttle state per site, for `mailhub site show` (one transaction)."""
        await self._writer.call(IndexWriter.save_throttle_states, states, now)

    async def delete(
        self, site_id: int, uids: list[int], downloads: Downloads | None = None, site_name: str | None = None
    ) -> None:
        """Remove mailbox entries (and add a session's downloads to the site's totals) in one
        transaction with their tracking events; blobs whose last reference goes are freed after the
        commit."""
        await self._write_entries(site_id, uids, downloads, site_name)
        try:
            await self.empty_trash()
        except StorageError as exc:  # the deletion stands; housekeeping empties the trash later
            log.warning("freeing the space of deleted mail failed (housekeeping tries again): %s", exc)

    async def remove_with(self, function: Callable[..., Any], *args: object) -> Any:
        """Run function(conn, *args) in one transaction of the index writer, where it removes mailbox
        entries (expiry, an operator's deletion) and returns ([(site_id, uid, sender_site, size,
        was_waiting)] removed, result); the listeners hear of each removal, freed blobs go. Returns
        the result."""
        removed, result = await self._freeing(IndexWriter.remove_with, function, *args)
        await self._removed(removed)
        return result

    async def record_downloads(self, site_id: int, downloads: Downloads, site_name: str | None = None) -> None:
        """Add a session's downloads to the site's totals (for a session that ended without UPDATE)."""
        await self._write_entries(site_id, [], downloads, site_name)

    async def _write_entries(
        self, site_id: int, uids: list[int], downloads: Downloads | None, site_name: str | None
    ) -> None:
        fetched, removed = await self._freeing(IndexWriter.delete_entries, site_id, uids, downloads, site_name)
        for listener in self._listeners:
            for row in fetched:
                listener.fetched_committed(site_id, *row)
            for row in removed:
                listener.removed(site_id, *row)

    async def remove_entries(self, site_id: int, uids: list[int], removal: Removal) -> list[int]:
        """Remove mailbox entries not at their site's request (expiry, an operator), each with its
        audit record (removal.event, removal.actor) and tracking event, in one transaction; the
        listeners hear of each (IMAP sessions report EXPUNGE, POP3 sessions refuse to send them).
        Returns the UIDs actually removed (an entry gone meanwhile is skipped)."""
        fetched, removed = await self._freeing(IndexWriter.delete_entries, site_id, uids, None, None, removal)
        await self._removed([(site_id, *row) for row in removed])
        return [row[0] for row in removed]

    async def _removed(self, removed: list[tuple[Any, ...]]) -> None:
        """After a removal not at the site's request: the listeners hear of each removed entry
        ((site_id, uid, sender_site, size, was_waiting)), then freed blobs go (a failure there is
        left to housekeeping: the removal stands)."""
        for listener in self._listeners:
            for site_id, *row in removed:
                listener.removed(site_id, *row)
        try:
            await self.empty_trash()
        except StorageError as exc:
            log.warning("freeing the space of removed mail failed (housekeeping tries again): %s", exc)

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        """Append audit records made by storage.audit.row() (an event that changes no state, such as
        an export), through the index writer, durably before this returns."""
        await self._writer.call(IndexWriter.in_transaction, audit.record_rows, rows)

    async def prune_audit(self, before: float) -> int:
        """Delete audit records older than `before` in short transactions; the count."""
        total = 0
        while (deleted := await self._writer.call(IndexWriter.prune_audit, before)) > 0:
            total += deleted
            if deleted < audit.PRUNE_BATCH:
                break
        return total

    async def prune_events(self, before: float) -> int:
        """Delete tracking events older than `before` in short transactions (commits run between
        them); the count."""
        total = 0
        while (deleted := await self._writer.call(IndexWriter.prune_events, before)) > 0:
            total += deleted
            if deleted < events.PRUNE_BATCH:
                break
        return total

    async def empty_trash(self) -> None:
        """Remove the files of freed blobs and release the space of freed messages in packs."""
        self._trash_waiting += 1
        try:
            await self._batch_lock.acquire()  # no batch is writing to the open pack, none uncommitted
        finally:
            self._trash_waiting -= 1
        try:
            blobs, holes = await self._writer.call(IndexWriter.freed)
            if self.layout.shared and blobs:  # other nodes' packs are theirs to free
                blobs = await asyncio.get_running_loop().run_in_executor(self.executor, self.layout.releasable, blobs)
                blobs = self._freed_long_enough(blobs)
            if self._packs.open_blob in blobs:
                self._packs.close()  # a pack is never reopened: what is listed stays free
        finally:
            self._batch_lock.release()
        if not blobs and not holes:
            return
        if self.objects is not None:  # the objects first, then the cached files
            await self.objects.delete(blobs)
        await asyncio.get_running_loop().run_in_executor(self.executor, self._release, blobs, holes)
        await self._writer.call(IndexWriter.forget_freed, blobs, holes)

    def _freed_long_enough(self, blobs: list[str]) -> list[str]:
        """A shared blob folder: of freed files this node may remove, those it has seen in the trash
        for release_freed_after seconds (as a freed range of a pack waits). Another node may still
        be sending one: on NFS a file another client removes is gone for every client (no 'unlinked
        but open' there: reads fail with ESTALE), unlike on a local disk."""
        now = self.monotonic()
        seen = {blob: self._trash_seen.get(blob, now) for blob in blobs}
        self._trash_seen = seen  # (those no longer listed are forgotten)
        return [blob for blob, since in seen.items() if now - since >= self.release_freed_after]

    def _release(self, blobs: list[str], holes: list[tuple[str, int, int]]) -> None:
        for blob in blobs:
            unlink_quietly(self.blob_dir / blob)
        gone = set(blobs)
        for blob, start, size in holes:
            if blob not in gone:
                try:
                    punch_hole(self.blob_dir / blob, start, size)
                except OSError as exc:  # the space comes back with the whole pack
                    log.warning("could not release freed bytes of %s: %s", blob, exc)


_ORPHANS_LOGGED = 20  # objects no index row names, logged one a line at start-up


def _behind(failure: BaseException) -> StorageError:
    """The error for a batch failed because the commit before it failed: a full disk or index stays
    a full one to the sender (452 4.3.1), anything else a temporary failure (451 4.3.0)."""
    kind = StorageFull if isinstance(failure, StorageFull) else StorageError
    return kind(f"the group commit before it failed: {str(failure) or type(failure).__name__}")


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _fsync_folders(folders: set[str]) -> None:
    try:
        for folder in folders:
            fsync_dir(folder)
    except OSError as exc:
        raise storage_error(exc) from exc


class _Unsettled(StorageError):
    """Whether a batch was committed is unknown (its writer and the next one failed): its files stay."""


def _open_index(index: IndexLocation) -> sql.Connection:
    """The index for start-up recovery; a full disk is said as such (SQLite cannot even size its
    shared-memory file then)."""
    try:
        return index.connect()  # SQLite: creates the schema
    except sqlite3.OperationalError as exc:
        data_dir = index.data_dir
        free = reserve.free_bytes(data_dir)
        if free < 1024 * 1024:
            raise StorageFull(
                f"cannot open the index ({exc}): the data folder's file system has {free} bytes free;"
                " free some space (e.g. in quarantine/, see docs/storage.md) and start again"
            ) from None
        raise


def _write_hashed(
    packs: PackWriter,
    packed: list[BatchItem],
    record_of: Callable[[BatchItem], bytes],
    hashing: list[tuple[BatchItem, concurrent.futures.Future[tuple[str, int]]]],
) -> dict[str, int]:
    """In a worker thread: the digests of the mails hashed ahead (waited for here, never on the
    loop), then the batch into the pack (PackWriter.write hashes the others)."""
    for item, digests in hashing:
        item.sha256, item.crc32 = digests.result()
    return packs.write(packed, record_of)


def _batch_item(item: _Pending) -> BatchItem:
    spool, data = item.spool, item.data
    packed = data is not None
    return BatchItem(
        spool.queue_id,
        spool.size,
        item.received_at,
        item.meta,
        item.deliveries,
        item.remote,
        item.mark,
        item.blob,
        None if packed else spool.sha256,  # (a packed one's: the pack writer's)
        data,
        spool.path if packed else None,
        crc32=None if packed else spool.crc32,
        packed=packed,
    )

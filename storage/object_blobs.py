# Mail blobs on S3-compatible object storage (storage.blobs = "s3://BUCKET/PREFIX"): the object
# store holds every committed mail, one object per mail (its blob file as written: message bytes,
# envelope record, trailer; key PREFIX/<hour folder>/<queue id>); the node's blobs/ folder is a
# CACHE of those objects. The store's facade (storage/store.py) calls:
# - upload() after the blob file was fsynced and renamed into blobs/, before the index commit: the
#   mail counts as stored only once the object store confirmed the whole object (one PUT's 200 with
#   its ETag, or a completed multipart upload, and the size it reports equal to the file's);
# - discard() for the objects of a batch whose commit failed (the senders get a 4xx);
# - delete() when freed blobs are emptied: the object first, then the cached file;
# - ready() before a mail is served: a cached file is used as it is; a missing one is downloaded
#   (streamed, bounded memory) into spool/<queue id>.tmp, checked (length, trailer, SHA-256 of the
#   message bytes as recorded at ingest), fsynced and renamed into blobs/; concurrent readers of
#   the same missing mail share one download;
# - start() at start-up: pending multipart uploads under the prefix aborted, the objects of this
#   node's own uncommitted blob files (quarantined by recovery) deleted, recent objects no index row
#   names REPORTED (deleted only with storage.delete_orphan_objects and once old enough by the
#   store's clock), the newest mails' objects checked (HEAD).
# The cache is bounded by storage.cache_bytes: least recently used files are evicted, never one
# being sent (pinned by Storage.serving) nor one used within EVICT_IDLE seconds (checked before a
# send that has not begun yet). A download leaves storage.min_free_bytes free on the node's disk
# (evicting idle files, even recently used ones, to make room; else a temporary error): the cache
# must never take the room that new mail and the index need. Must never delete an object an index
# row names, nor the only copy of a mail: a cached file is evicted only after its object was
# confirmed (by construction: files enter the cache after upload() or a checked download).
import asyncio
import collections
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from . import envelope
from .errors import StorageError
from .files import rename_into, unlink_quietly
from .reserve import free_bytes
from .s3 import ObjectInfo, S3Client, S3Error, S3Location

log = logging.getLogger("mailhub.storage")
_BLOB_NAME = re.compile(r"\d{10}/[0-9A-F]{19}")  # an hour folder and a queue ID (storage/spool.py)
EVICT_IDLE = 600.0  # seconds since its last use before a cached file may be evicted
ORPHAN_AGE = 3600.0  # an object no index row names is deleted at start-up only when stored longer ago
STARTUP_HEADS = 100  # the newest mails whose objects start-up checks with a HEAD
MISSING_LIMIT = 10  # more of those missing than this (and over a tenth) stop the start
# an upload not confirmed by then is given up (451): an SMTP client waits 10 minutes for the reply to
# its data (RFC 5321 4.5.3.2.6), so a later 250 would reach nobody and the mail would come again
# (each request's steps have s3.timeout, but a store taking a slice every few seconds has no end)
UPLOAD_DEADLINE = 480.0
SWEEP_HOURS = 24 * 14  # hour folders listed at most by the start-up sweep for orphans
MAX_ORPHANS = 1000  # objects no index row names, reported per hour folder at most


class ObjectStoreError(StorageError):
    """The object store did not confirm a write, or failed a read: temporary (451 4.3.0)."""


class ObjectStoreBehind(StorageError):
    """Most of the newest mails' objects are missing: the wrong bucket, prefix or endpoint."""


def queue_id_time(queue_id: str) -> float | None:
    """The time a queue ID was made (storage.spool.new_queue_id: 13 hex digits of microseconds)."""
    try:
        return int(queue_id[:13], 16) / 1e6
    except ValueError:
        return None


@dataclass
class StartReport:
    aborted_uploads: int = 0
    orphans_deleted: list[str] = field(default_factory=list)
    orphans_kept: list[str] = field(default_factory=list)  # too young: may be a commit in flight
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # blobs of index rows with no object

    def __str__(self) -> str:
        return (
            f"{self.aborted_uploads} unfinished upload(s) aborted, {len(self.orphans_deleted)} object(s) of"
            f" uncommitted mail deleted, {len(self.orphans_kept)} no index row names left,"
            f" {self.checked} newest mail(s) checked, {len(self.missing)} missing"
        )


class ObjectBlobs:
    """One hub node's view of the blobs in an object store, with its blobs/ folder as the cache."""

    def __init__(
        self,
        client: S3Client,
        location: S3Location,
        blob_dir: Path,
        spool_dir: Path,
        executor: Executor | None = None,
        cache_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        delete_orphans: bool = False,
    ) -> None:
        self.client = client
        self.location = location
        self.blob_dir = Path(blob_dir)
        self.spool_dir = Path(spool_dir)
        self.executor = executor  # disk work (None: the default executor); storage.Storage sets its own
        self.cache_bytes = cache_bytes  # 0: unbounded
        self._clock = clock
        self.delete_orphans = delete_orphans  # storage.delete_orphan_objects: else the sweep only reports
        self.node_number: int | None = None  # in this node's queue IDs (several nodes: Storage sets it)
        self.min_free_bytes = 0  # storage.min_free_bytes (storage.Storage sets it): kept free by downloads
        self.free_bytes: Callable[[], int] = lambda: free_bytes(self.spool_dir)  # the node disk's free bytes
        self._cached: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()  # LRU first
        self._cached_total = 0
        self._fetching: dict[str, asyncio.Future[str | None]] = {}
        self._pinned: collections.Counter[str] = collections.Counter()  # blobs being sent: never evicted
        self._discarding: set[asyncio.Task[None]] = set()  # deletions of uploads cut short
        self.downloads = 0  # objects downloaded into the cache (tests, metrics)
        self.evicted = 0
        # hooks (the hub counts them in storage.metrics): a download, an eviction, a failed upload
        self.on_download: Callable[[], None] | None = None
        self.on_evict: Callable[[], None] | None = None
        self.on_upload_failed: Callable[[], None] | None = None

    def key(self, blob: str) -> str:
        return self.location.key(blob)

    def _where(self, blob: str) -> str:
        return f"{self.location.bucket}/{self.key(blob)}"

    # ---- writes ---------------------------------------------------------------------------------

    async def upload(self, path: str, blob: str) -> None:
        """Store the blob file at `path` as the object of `blob`; returns once the store confirmed
        all of it. ObjectStoreError otherwise (an object begun is deleted, parts are aborted)."""
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(self.executor, os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            offset = 0

            async def read(n: int) -> bytes:
                nonlocal offset
                data = await loop.run_in_executor(self.executor, os.pread, fd, min(n, size - offset), offset)
                offset += len(data)
                return data

            try:
                async with asyncio.timeout(UPLOAD_DEADLINE):  # each step has its own timeout too
                    result = await self.client.put(self.location.bucket, self.key(blob), read)
            except (S3Error, TimeoutError) as exc:
                # the store may have taken it all the same (its answer lost, a timeout after the
                # body): nothing of an unacknowledged mail may stay (the start-up sweep only reports)
                _call(self.on_upload_failed)
                self._discard_soon(blob)  # (the sender's 451 does not wait for it)
                why = exc if isinstance(exc, S3Error) else f"not confirmed within {UPLOAD_DEADLINE:g} s"
                raise ObjectStoreError(f"the object store did not take mail {blob}: {why}") from None
            except asyncio.CancelledError:  # the session ended mid-upload
                self._discard_soon(blob)
                raise
            if result.size != size or not result.etag:
                _call(self.on_upload_failed)
                await self.discard([blob])
                raise ObjectStoreError(
                    f"the object store confirmed {result.size} of the {size} bytes of {blob}"
                    f" (ETag {result.etag!r}): not stored"
                )
        finally:
            os.close(fd)

    def _discard_soon(self, blob: str) -> None:
        """discard() in the background (a store that failed an upload may be slow to answer)."""
        task = asyncio.ensure_future(self.discard([blob]))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def discard(self, blobs: Iterable[str]) -> None:
        """Delete the objects of mails that were not committed (quietly: what stays is found by the
        start-up sweep)."""
        for blob in blobs:
            try:
                await self.client.delete(self.location.bucket, self.key(blob))
            except S3Error as exc:
                log.warning("object of uncommitted mail %s left (the start-up sweep reports it): %s", blob, exc)

    async def delete(self, blobs: list[str]) -> None:
        """Freed blobs: each object deleted, then its cached file. ObjectStoreError when the store
        fails one (what is done stays done; the caller tries the rest again later)."""
        for blob in blobs:
            try:
                await self.client.delete(self.location.bucket, self.key(blob))
            except S3Error as exc:
                raise ObjectStoreError(f"deleting the object of freed mail {blob}: {exc}") from None
            self._forget(blob)
            unlink_quietly(self.blob_dir / blob)

    # ---- the cache ------------------------------------------------------------------------------

    def committed(self, blob: str, size: int) -> None:
        """A file in blobs/ whose object is confirmed (uploaded and committed, or downloaded)."""
        self._forget(blob)
        self._cached[blob] = (size, self._clock())
        self._cached_total += size
        self._evict()

    def _forget(self, blob: str) -> None:
        old = self._cached.pop(blob, None)
        if old is not None:
            self._cached_total -= old[0]

    def _touch(self, blob: str) -> None:
        found = self._cached.get(blob)
        if found is not None:
            self._cached[blob] = (found[0], self._clock())
            self._cached.move_to_end(blob)

    def pin(self, blob: str) -> None:
        """A session or the relay starts sending the cached file of `blob` (Storage.serving)."""
        self._pinned[blob] += 1

    def unpin(self, blob: str) -> None:
        self._pinned[blob] -= 1
        if self._pinned[blob] <= 0:
            del self._pinned[blob]
            self._touch(blob)
            self._evict()

    def _evict(self) -> None:
        if not self.cache_bytes or self._cached_total <= self.cache_bytes:
            return
        now = self._clock()
        for blob, (_size, used) in list(self._cached.items()):
            if self._cached_total <= self.cache_bytes:
                break
            if now - used < EVICT_IDLE or blob in self._fetching or blob in self._pinned:
                continue  # being sent, or maybe about to be
            self._forget(blob)
            unlink_quietly(self.blob_dir / blob)
            self.evicted += 1
            _call(self.on_evict)

    async def leftovers(self, blobs: list[str]) -> list[str]:
        """Of the cached files no index row names (recovery's list, at start-up): those whose object
        the store holds are returned - this node's uploads whose commit a crash cut short (the
        caller quarantines the file, start() deletes the object); the others are removed - copies
        of mail freed since (another node emptied the trash, or a crash came between an object's
        deletion and its file's), or of an upload never completed (its sender got no 250)."""
        uploaded = []
        for blob in blobs:
            try:
                found = await self.client.head(self.location.bucket, self.key(blob))
            except S3Error as exc:
                raise ObjectStoreError(f"start-up check of {self.location}: {exc}") from None
            if found is None:
                log.info("cached copy of %s removed: no index row names it and its object is gone", blob)
                unlink_quietly(self.blob_dir / blob)
            else:
                uploaded.append(blob)
        return uploaded

    def scan_cache(self) -> None:
        """The files in blobs/ at start-up (oldest first): what the cache holds."""
        found: list[tuple[float, str, int]] = []
        for folder in os.scandir(self.blob_dir):
            if folder.is_dir(follow_symlinks=False):
                for entry in os.scandir(folder.path):
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat()
                        found.append((stat.st_mtime, f"{folder.name}/{entry.name}", stat.st_size))
        for _mtime, blob, size in sorted(found):
            self._cached[blob] = (size, self._clock() - EVICT_IDLE)
            self._cached_total += size
        self._evict()

    def scrubbed(self, blob: str, problem: str) -> None:
        """The scrub found the cached copy of `blob` missing (not cached: nothing to check) or
        differing from its record: the copy is dropped (a reader downloads the object again and
        checks it against the recorded SHA-256, marking the mail damaged if the object differs too)."""
        if os.path.exists(self.blob_dir / blob):
            log.warning("cached copy of %s dropped: %s (the object store's copy is served)", blob, problem)
            self._forget(blob)
            unlink_quietly(self.blob_dir / blob)

    @property
    def cached_bytes(self) -> int:
        return self._cached_total

    # ---- reads ----------------------------------------------------------------------------------

    async def ready(self, blob: str, size: int, sha256: str) -> str | None:
        """Make sure blobs/<blob> is there to be served: None when it is, else why it is not (the
        object is missing or differs from what was recorded). Raises ObjectStoreError when the
        store cannot be read (temporary)."""
        if os.path.exists(self.blob_dir / blob):
            self._touch(blob)
            return None
        running = self._fetching.get(blob)
        if running is None:
            running = asyncio.ensure_future(self._download(blob, size, sha256))
            self._fetching[blob] = running
            running.add_done_callback(lambda _: self._fetching.pop(blob, None))
        return await asyncio.shield(running)

    def _make_room(self, blob: str, size: int) -> None:
        """Before a download: at least min_free_bytes left on the node's disk after it, evicting
        cached files (least recently used, never one being sent or downloaded) to make it so; else
        ObjectStoreError (temporary). Downloads must not take the room new mail and the index need."""
        if not self.min_free_bytes:
            return
        need = self.min_free_bytes + size  # (its envelope record and trailer: small beside it)
        try:
            free = self.free_bytes()
        except OSError:
            return  # unknown: the writes will tell
        for victim in list(self._cached):
            if free >= need:
                return
            if victim in self._fetching or victim in self._pinned:
                continue
            self._forget(victim)
            unlink_quietly(self.blob_dir / victim)
            self.evicted += 1
            _call(self.on_evict)
            free = self.free_bytes()
        if free < need:
            raise ObjectStoreError(
                f"no room on the node's disk to cache mail {blob}: {free} bytes free, {need} needed"
                " (storage.min_free_bytes kept free)"
            )

    async def _download(self, blob: str, size: int, sha256: str) -> str | None:
        loop = asyncio.get_running_loop()
        self._make_room(blob, size)
        queue_id = blob.rpartition("/")[2]
        temporary = str(self.spool_dir / f"{queue_id}.tmp")  # start-up recovery removes one left over
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        digest = hashlib.sha256()
        written = 0
        problem: str | None = None
        try:

            async def sink(data: bytes) -> None:
                nonlocal written
                if written < size:
                    digest.update(data[: size - written])
                written += len(data)
                if written > size + envelope.MAX_RECORD + envelope.HEADER_SIZE:
                    raise S3Error(f"GET {self._where(blob)}: larger than its mail", 200, "too_large")
                await loop.run_in_executor(self.executor, _write_all, fd, data)

            try:
                await self.client.get(self.location.bucket, self.key(blob), sink)
            except S3Error as exc:
                if exc.status == 404:
                    problem = f"object {self._where(blob)} missing from the object store"
                elif exc.code == "too_large":
                    problem = str(exc)
                else:
                    raise ObjectStoreError(f"reading mail {blob} from the object store: {exc}") from None
            if problem is None:
                problem = await loop.run_in_executor(self.executor, _check_download, fd, written, size, sha256, digest)
        except BaseException:
            os.close(fd)
            unlink_quietly(temporary)
            raise
        os.close(fd)
        if problem is not None:
            unlink_quietly(temporary)
            return problem
        await loop.run_in_executor(self.executor, rename_into, temporary, str(self.blob_dir / blob))
        self.downloads += 1
        _call(self.on_download)
        self.committed(blob, written)
        return None

    # ---- start-up -------------------------------------------------------------------------------

    async def start(
        self,
        newest: list[tuple[str, float]],
        indexed_between: Callable[[str, str], Awaitable[set[str]]],
        now: float | None = None,
        uncommitted: Iterable[str] = (),
    ) -> StartReport:
        """Abort the multipart uploads a crash left; delete the objects of `uncommitted` (this node's
        own blob files that recovery just moved to the quarantine: no index row names them, none of
        this node's commits is in flight, and their bytes are in the quarantine); list the hour
        folders from two hours before the newest committed mail up to now and REPORT the objects no
        index row names - deleted only with delete_orphans and when older than ORPHAN_AGE by the
        store's own LastModified (never by a queue ID or an unknown time), the index asked again
        after the listing; HEAD the objects of the newest mails (`newest`: (blob, received_at),
        newest first). ObjectStoreBehind when most of those are missing. `indexed_between(lo, hi)`:
        the blobs the index holds in [lo, hi).

        Why report-only by default: an object the index does not name may be acknowledged mail all
        the same - another node's commit held up longer than ORPHAN_AGE (its index stalled), a node
        clock ahead of the store's, another hub with an index of its own on the same bucket and
        prefix (a misconfiguration), or an index restored from a backup older than the objects
        (the object is then the only copy of the mail). A wrongly kept object costs bytes; a wrongly
        deleted one loses mail."""
        now = time.time() if now is None else now
        report = StartReport()
        bucket = self.location.bucket
        try:
            for key, upload_id in await self.client.pending_uploads(bucket, self.key("")):
                if self._own_upload(key):  # not another node's upload in flight, nor another program's
                    await self.client.abort_upload(bucket, key, upload_id)
                    report.aborted_uploads += 1
            for blob in sorted(set(uncommitted)):
                hour = blob.partition("/")[0]
                if blob not in await indexed_between(hour + "/", hour + "0"):
                    await self.client.delete(bucket, self.key(blob))
                    report.orphans_deleted.append(blob)
            since = (newest[0][1] if newest else now) - 2 * 3600
            hours = min(SWEEP_HOURS, max(0, int((now - since) // 3600) + 1))
            for n in range(hours + 1):
                hour = time.strftime("%Y%m%d%H", time.gmtime(now - (hours - n) * 3600))
                await self._sweep_hour(hour, indexed_between, now, report)
            for blob, _received in newest[:STARTUP_HEADS]:
                report.checked += 1
                if await self.client.head(bucket, self.key(blob)) is None:
                    report.missing.append(blob)
        except S3Error as exc:
            raise ObjectStoreError(f"start-up check of {self.location}: {exc}") from None
        if len(report.missing) > max(MISSING_LIMIT, report.checked // 10):
            raise ObjectStoreBehind(
                f"{len(report.missing)} of the newest {report.checked} mails the index holds are missing from"
                f" {self.location} (is storage.blobs, or s3.endpoint, the store this index was written to?)"
            )
        return report

    def _own_upload(self, key: str) -> bool:
        """Whether a pending multipart upload is one this node began (a mail's object: an hour
        folder and a queue ID carrying this node's number, if nodes have numbers)."""
        prefix = self.key("")
        if not key.startswith(prefix) or not _BLOB_NAME.fullmatch(key[len(prefix) :]):
            return False
        return self.node_number is None or key[-6:-4] == f"{self.node_number:02X}"

    async def _sweep_hour(
        self, hour: str, indexed_between: Callable[[str, str], Awaitable[set[str]]], now: float, report: StartReport
    ) -> None:
        prefix = self.key(hour + "/")
        indexed = await indexed_between(hour + "/", hour + "0")
        candidates: list[tuple[str, ObjectInfo]] = []
        async for info in self.client.list_objects(self.location.bucket, prefix):
            blob = hour + "/" + info.key[len(prefix) :]
            if blob not in indexed and blob not in report.orphans_deleted:
                candidates.append((blob, info))
            if len(candidates) > MAX_ORPHANS:
                break  # enough to report (the rest: at the next start)
        if not candidates:
            return
        indexed = await indexed_between(hour + "/", hour + "0")  # rows committed while the listing ran
        for blob, info in candidates:
            if blob in indexed:
                continue
            # its age since the store took it, by the store's clock (a queue ID can be hours older
            # than its upload, and the node's clock is not the store's); unknown: kept
            old = info.modified is not None and now - info.modified > ORPHAN_AGE
            if self.delete_orphans and old:
                await self.client.delete(self.location.bucket, info.key)
                report.orphans_deleted.append(blob)
            else:
                report.orphans_kept.append(blob)


def _call(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        hook()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _check_download(fd: int, length: int, size: int, sha256: str, digest: "hashlib._Hash") -> str | None:
    """A downloaded blob file checked against its index row (runs in a worker thread): its trailer
    names a message of `size` bytes, and those bytes have the recorded SHA-256. fsynced when right."""
    found = envelope.read_trailer(fd, length)
    if found is None or found.size != size:
        return f"the object's length or trailer does not match the mail's {size} bytes"
    if not sha256:  # never cached unchecked: every reader after this one is served the file as it is
        return "no SHA-256 recorded to check the object against: not cached"
    if digest.hexdigest() != sha256:
        return "the object's bytes differ from the SHA-256 recorded at ingest"
    os.fsync(fd)
    return None

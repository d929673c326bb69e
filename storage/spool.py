# Spool files: the one place message bytes are written. The event loop only queues chunks; a
# worker thread creates the file, hashes and writes them in order (one job at a time per file, so
# both cores work: the loop receives while a thread writes), then fsyncs at the end.
# A small message (all of it still queued, under FLUSH_AT) can instead be handed whole to the
# index writer, which packs a batch of them into one file (a file creation costs far more than
# writing 10 KB) and syncs the filesystem once for all (group commit).
# Memory per message is bounded by MAX_QUEUED; never holds a whole message.
import asyncio
import ctypes
import errno
import hashlib
import itertools
import os
import time
from concurrent.futures import Executor
from pathlib import Path

from .errors import StorageError, StorageFull

FLUSH_AT = 512 * 1024  # queued bytes that start a write job
PACK_SIZE = 4 * 1024 * 1024  # a pack of small messages is closed once it holds this much
MAX_QUEUED = 8 * 1024 * 1024  # queued bytes after which the receiver waits for the disk


_sequence = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_queue_id() -> str:
    """Time-sortable, unique, filename-safe: 13 hex digits of microseconds + a 6-digit sequence
    (random start per process, so that a restart within the same microsecond cannot collide)."""
    return f"{time.time_ns() // 1000:013X}{next(_sequence) & 0xFFFFFF:06X}"


def blob_name(queue_id: str, received_at: float) -> str:
    """Blobs are grouped per hour so that one folder fsync covers a whole batch."""
    return time.strftime("%Y%m%d%H", time.gmtime(received_at)) + "/" + queue_id


class SpoolFile:
    """A message being received: `write()` chunks (never blocks), `await room()` when
    `backlogged`, then `await sync()` (durable, closed) or `discard()`."""

    __slots__ = ("queue_id", "path", "offset", "size", "error", "handed_over", "_executor", "_fd", "_sha",
                 "_chunks", "_queued", "_job", "_discarded", "_streaming")

    def __init__(self, spool_dir: Path, queue_id: str, executor: Executor):
        self.queue_id = queue_id
        self.path = spool_dir / (queue_id + ".tmp")
        self.offset = 0  # where the message starts in its file (a pack of small messages)
        self.size = 0
        self.error: StorageError | None = None
        self.handed_over = False  # synced and owned by the committer: discard() no longer applies
        self._executor = executor
        self._fd = -1
        self._sha = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._queued = 0
        self._job: asyncio.Future | None = None
        self._discarded = False
        self._streaming = False  # counted in streaming_files(): a write job has started

    def write(self, data: bytes) -> None:
        if not data or self.error is not None:
            return
        self._chunks.append(data)
        self._queued += len(data)
        self.size += len(data)
        if self._queued >= FLUSH_AT and self._job is None:
            self._start_job()

    @property
    def backlogged(self) -> bool:
        return self._queued >= MAX_QUEUED and self._job is not None

    async def room(self) -> None:
        """Wait until the disk has caught up with what was queued."""
        while self.backlogged:
            await self._job_finished()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def in_memory(self) -> bool:
        """All of the message is still queued: no write job ever started (a small message)."""
        return not self._streaming and not self.handed_over and self.error is None and not self._discarded

    def take_data(self) -> bytes:
        """Hand the whole (small) message over to write_batch()."""
        data = b"".join(self._chunks)
        self._chunks, self._queued = [], 0
        self.handed_over = True
        return data

    async def sync(self, target: Path) -> None:
        """Write what is queued, fsync, close, rename to `target` and fsync its folder (so that
        concurrent messages' fsyncs overlap); raises StorageError on failure."""
        while self._job is not None:
            await self._job_finished()
        if self.error is None and not self._discarded:
            self._start_job(final=target)
            await self._job_finished()
        self._stop_streaming()
        if self._discarded and self.error is None:
            self.error = StorageError("message discarded")
        if self.error is not None:
            self.discard()
            raise self.error

    async def _job_finished(self) -> None:
        """Wait for the running job and for its done-callback to have run."""
        job = self._job
        if not job.done():
            await asyncio.wait([job])
        while self._job is job:
            await asyncio.sleep(0)

    def discard(self) -> None:
        """Forget the message; the file goes once no write job uses it any more."""
        if self.handed_over:
            return
        self._discarded = True
        self._chunks, self._queued = [], 0
        if self._job is None:
            self._remove()

    # ---- worker side ----------------------------------------------------------------------------

    def _start_job(self, final: Path | None = None) -> None:
        if not self._streaming:
            self._streaming = True
            _streaming_count[0] += 1
        chunks, self._chunks, self._queued = self._chunks, [], 0
        self._job = asyncio.get_running_loop().run_in_executor(self._executor, self._write_chunks,
                                                               chunks, final)
        self._job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Future) -> None:
        self._job = None
        if not job.cancelled() and job.exception() is not None:
            exc = job.exception()
            self.error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
            self._chunks, self._queued = [], 0
        if self._discarded:
            self._remove()
        elif self._queued >= FLUSH_AT and self.error is None:
            self._start_job()

    def _write_chunks(self, chunks: list[bytes], final: Path | None) -> None:
        """Runs in a worker thread, one job per file at a time."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            for chunk in chunks:
                self._sha.update(chunk)
                _write_all(self._fd, chunk)
            if final is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                _rename_into(self.path, final)
                self.path = final
                fsync_dir(final.parent)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def _stop_streaming(self) -> None:
        if self._streaming:
            self._streaming = False
            _streaming_count[0] -= 1

    def _remove(self) -> None:
        self._stop_streaming()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_known_folders: set[Path] = set()  # blob folders known to exist (a folder is never removed while serving)
_streaming_count = [0]  # spool files being written by their own jobs, in this process


def streaming_files() -> int:
    """How many messages are being written by their own write jobs. While there are any, small
    messages take the per-file path too: a filesystem sync would also wait for their dirty pages."""
    return _streaming_count[0]


def write_batch(spool_dir: Path, messages: list[tuple[SpoolFile, bytes, Path]]) -> None:
    """Make small messages (SpoolFile.take_data()) durable, in the order of the single-file path
    but with one sync for all: write them into packs (one spool file per PACK_SIZE, named and
    placed after its first message's target), sync the filesystem, rename each pack into place,
    fsync each blob folder once. Sets each spool's path and offset; raises StorageError."""
    packs: list[tuple[SpoolFile, Path, list[SpoolFile]]] = []
    try:
        fd, offset = -1, 0
        try:
            for spool, data, target in messages:
                if fd < 0 or offset + len(data) > PACK_SIZE:
                    if fd >= 0:
                        os.close(fd)
                    fd = os.open(spool.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                    packs.append((spool, target, []))
                    offset = 0
                spool._sha.update(data)
                spool.offset = offset
                packs[-1][2].append(spool)
                _write_all(fd, data)
                offset += len(data)
        finally:
            if fd >= 0:
                os.close(fd)
        sync_filesystem(spool_dir)
        for first, target, members in packs:
            _rename_into(first.path, target)
            for spool in members:
                spool.path = target
        for folder in {target.parent for _first, target, _members in packs}:
            fsync_dir(folder)
    except OSError as exc:   # the caller removes the files at the spools' paths
        raise _storage_error(exc) from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _rename_into(path: Path, final: Path) -> None:
    if final.parent not in _known_folders:
        final.parent.mkdir(exist_ok=True)
        _known_folders.add(final.parent)
    os.rename(path, final)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(folder: Path) -> None:
    """syncfs(2): write out all dirty data and metadata of the filesystem holding `folder` (one
    journal commit for a whole batch of files; Linux reports writeback errors since 5.8)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(str(exc))
    return StorageError(str(exc))

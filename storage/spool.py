# Spool files: the one place message bytes are written. The event loop only queues chunks; a
# worker thread creates the file, hashes and writes them in order (one job at a time per file, so
# both cores work: the loop receives while a thread writes), then fsyncs at the end. A big message's
# bytes start going to disk while it streams (start_writeback every WRITEBACK_AT bytes), so that the
# final fsync, which the client waits for, has only the tail left to flush.
# A small message (all of it still queued, under SMALL_MESSAGE) is instead handed whole to the
# storage facade, which hashes it in a worker thread and appends it with its batch to a pack file
# (storage/store.py, storage/packs.py); the index writer process only commits its rows.
# Memory per message is bounded by MAX_QUEUED, and memory of all messages in flight by one
# MemoryBudget (storage/memory_budget.py): past it, messages held in memory are written out early.
# Never holds a whole message (but a small one).
import asyncio
import hashlib
import itertools
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Executor

from .errors import StorageError
from .files import rename_into, start_writeback, storage_error, unlink_quietly, write_all
from .memory_budget import MemoryBudget

# tail(sha256 hex, crc32) -> the bytes that follow a message in its file (a blob's record)
Tail = Callable[[str, int], bytes]

FLUSH_AT = 512 * 1024  # queued bytes that start a write job
SMALL_MESSAGE = 2 * 1024 * 1024  # until this much is queued no write job starts: a message whose
# end comes first is small, and goes into a pack
MAX_QUEUED = 4 * 1024 * 1024  # queued bytes after which the receiver waits for the disk (8 MB: the
# 1 GB mail peaked 8 MB higher, 50 MB mails were no faster)
WRITEBACK_AT = 8 * 1024 * 1024  # written bytes whose writeback starts at once (not all at the final fsync)


_sequence = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_queue_id(node: int | None = None) -> str:
    """Time-sortable, unique, filename-safe: 13 hex digits of microseconds + a 6-digit sequence
    (random start per process, so that a restart within the same microsecond cannot collide).
    With a node number (1..255, a shared blob folder: storage/blob_layout.py) the sequence's first
    two digits are the node's: nodes writing one index never make the same ID."""
    if node is None:
        return f"{time.time_ns() // 1000:013X}{next(_sequence) & 0xFFFFFF:06X}"
    return f"{time.time_ns() // 1000:013X}{node:02X}{next(_sequence) & 0xFFFF:04X}"


def blob_name(queue_id: str, received_at: float) -> str:
    """Blobs are grouped per hour so that one folder fsync covers a whole batch."""
    return time.strftime("%Y%m%d%H", time.gmtime(received_at)) + "/" + queue_id


class SpoolFile:
    """A message being received: `write()` chunks (never blocks), `await room()` when
    `backlogged`, then `await sync()` (durable, closed) or `discard()`."""

    __slots__ = (
        "queue_id",
        "path",
        "size",
        "error",
        "handed_over",
        "_executor",
        "_fd",
        "_sha",
        "_chunks",
        "_queued",
        "_job",
        "_discarded",
        "_streaming",
        "_digest",
        "_written",
        "_flushing_from",
        "_crc",
        "_budget",
        "_held",
    )

    def __init__(self, spool_dir: str, queue_id: str, executor: Executor, budget: MemoryBudget):
        self.queue_id = queue_id
        self.path = f"{spool_dir}/{queue_id}.tmp"  # then its blob file's, once synced
        self.size = 0
        self.error: StorageError | None = None
        self.handed_over = False  # synced and owned by the committer: discard() no longer applies
        self._executor = executor
        self._fd = -1
        self._sha = hashlib.sha256()
        self._crc = 0  # zlib CRC-32 of the bytes written (checked while serving)
        self._chunks: list[bytes] = []
        self._queued = 0
        self._job: asyncio.Future[None] | None = None
        self._discarded = False
        self._streaming = False  # a write job has started: the message is no longer all in memory
        self._digest: str | None = None  # a packed message's SHA-256, from the index writer
        self._written = 0  # bytes written to the file (worker side)
        self._flushing_from = 0  # where the range not yet handed to start_writeback begins
        self._budget = budget
        self._held = 0  # bytes counted in the budget (queued, in a write job, or handed over)

    def write(self, data: bytes) -> None:
        if not data or self.error is not None:
            return
        size = len(data)
        self._chunks.append(data)
        self._queued += size
        self.size += size
        self._held += size
        self._budget.take(size, self)
        if self._job is None and (
            self._queued >= (FLUSH_AT if self._streaming else SMALL_MESSAGE) or self._budget.full
        ):
            self._start_job()

    @property
    def backlogged(self) -> bool:
        return self._queued >= MAX_QUEUED and self._job is not None

    async def room(self) -> None:
        """Wait until the disk has caught up with what was queued."""
        while self.backlogged:
            await self._job_finished()

    def spill(self) -> int:
        """The memory budget is reached: write what is queued now (1 if this was a message held
        whole in memory, else 0)."""
        if self._job is not None or not self._queued or self.handed_over or self._discarded:
            return 0
        whole = not self._streaming
        self._start_job()
        return int(whole)

    def release(self) -> None:
        """The bytes handed over with take_chunks() are committed (or failed): memory is free."""
        self._free(self._held)

    @property
    def sha256(self) -> str:
        return self._digest or self._sha.hexdigest()

    @property
    def crc32(self) -> int:
        """The CRC-32 of a message written to its own file (a packed one's is the index writer's)."""
        return self._crc

    def packed(self, sha256: str) -> None:
        """The index writer stored this (small) message in a pack, and hashed it."""
        self._digest = sha256

    @property
    def in_memory(self) -> bool:
        """All of the message is still queued: no write job ever started (a small message)."""
        return not self._streaming and not self.handed_over and self.error is None and not self._discarded

    def take_chunks(self) -> list[bytes]:
        """Hand the whole (small) message over to the pack writer, as received (no copy); its
        memory stays counted until release()."""
        chunks, self._chunks, self._queued = self._chunks, [], 0
        self.handed_over = True
        self._budget.left(self)
        return chunks

    async def sync(self, target: str, tail: Tail | None = None) -> None:
        """Write what is queued (then tail(sha256 hex, crc32): bytes that follow the message in its file, its
        envelope record), fsync, close and rename to `target` (so that concurrent messages' fsyncs
        overlap); raises StorageError on failure. The folder's fsync is the caller's: the group
        commit makes the folders of all its files durable at once, before the index commit."""
        while self._job is not None:
            await self._job_finished()
        if self.error is None and not self._discarded:
            self._start_job(final=target, tail=tail)
            await self._job_finished()
        if self._discarded and self.error is None:
            self.error = StorageError("message discarded")
        if self.error is not None:
            self.discard()
            raise self.error

    async def _job_finished(self) -> None:
        """Wait for the running job and for its done-callback to have run."""
        job = self._job
        if job is None:
            return
        if not job.done():
            await asyncio.wait([job])
        while self._job is job:
            await asyncio.sleep(0)

    def discard(self) -> None:
        """Forget the message; the file goes once no write job uses it any more."""
        if self.handed_over:
            return
        self._discarded = True
        self._budget.left(self)
        self._free(self._queued)
        self._chunks, self._queued = [], 0
        if self._job is None:
            self._remove()

    def _free(self, octets: int) -> None:
        if octets:
            self._held -= octets
            self._budget.give(octets)

    # ---- worker side ----------------------------------------------------------------------------

    def _start_job(self, final: str | None = None, tail: Tail | None = None) -> None:
        self._streaming = True
        chunks, queued, self._chunks, self._queued = self._chunks, self._queued, [], 0
        self._budget.left(self)
        self._job = asyncio.get_running_loop().run_in_executor(self._executor, self._write_chunks, chunks, final, tail)
        self._job.add_done_callback(lambda job: self._job_done(job, queued))

    def _job_done(self, job: asyncio.Future[None], written: int) -> None:
        self._job = None
        self._free(written)
        if not job.cancelled() and job.exception() is not None:
            exc = job.exception()
            self.error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
            self._free(self._queued)
            self._chunks, self._queued = [], 0
        if self._discarded:
            self._remove()
        elif self.error is None and self._queued:
            if self._queued >= FLUSH_AT or self._budget.full:
                self._start_job()
            else:
                self._budget.keep(self)

    def _write_chunks(self, chunks: list[bytes], final: str | None, tail: Tail | None = None) -> None:
        """Runs in a worker thread, one job per file at a time."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            for chunk in chunks:
                self._sha.update(chunk)
                self._crc = zlib.crc32(chunk, self._crc)
                write_all(self._fd, chunk)
                self._written += len(chunk)
            if final is None and self._written - self._flushing_from >= WRITEBACK_AT:
                start_writeback(self._fd, self._flushing_from, self._written - self._flushing_from)
                self._flushing_from = self._written
            if final is not None:
                if tail is not None:
                    write_all(self._fd, tail(self._sha.hexdigest(), self._crc))
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                rename_into(self.path, final)
                self.path = final
        except OSError as exc:
            raise storage_error(exc) from exc

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        unlink_quietly(self.path)

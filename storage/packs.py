# Packs: small messages (whole in memory at end of data) are stored together in pack files under
# blobs/, written by the hub process (storage/store.py, in its worker threads, one batch at a time):
# the index writer process gets only their index rows. A batch is appended to the open pack and
# made durable with one fdatasync (a file creation costs far more than writing 10 KB). LANES packs
# are open at once: a batch of several MB is spread over them and each part written and fdatasynced
# in a thread of its own (writes into one file are serialised by the kernel; page-cache writes and
# flushes of two files overlap, which is what limits a batch of 1 MB mails). Each message
# is a frame: header, envelope record, message bytes (storage/envelope.py), so that a pack
# describes itself. A new pack is made the way a single message is (spool file, fsync, rename into
# blobs/, folder fsync), so a name under blobs/ never shows a file whose indexed bytes are not
# durable. A batch whose commit then fails leaves no trace: the open pack is cut back to where the
# batch began and the packs it began are removed (a writer killed before it could answer is
# handled by Storage._settle or start-up recovery: bytes past a pack's committed end, index table
# `packs`). A pack is freed with its last message; an open pack is closed first (Storage.empty_trash,
# never while a batch is being written), and appending to a pack takes it out of the trash. The
# bytes of a freed message in a pack that lives on are released later by punch_hole.
# Must never be used by two callers at once (the caller serialises batches; the lanes' threads are its own).
import ctypes
import errno
import hashlib
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from . import faults
from .envelope import HEADER_SIZE, frame_header
from .files import fsync_dir, libc, rename_into, storage_error, unlink_quietly, write_all_vectored

if TYPE_CHECKING:
    from .index_writer import BatchItem

PACK_SIZE = 16 * 1024 * 1024  # a pack takes no more messages once it holds this much
LANES = 2  # packs open at once: a big batch is written to them in parallel, one thread each
SPREAD_MIN = 512 * 1024  # bytes of a batch per lane it is spread over (two 1 MB mails: two lanes)


class _Lane:
    """One open pack: its file, blob name and size."""

    __slots__ = ("fd", "blob", "size")

    def __init__(self) -> None:
        self.fd = -1
        self.blob: str | None = None
        self.size = 0

    def close(self) -> None:
        fd, self.fd, self.blob, self.size = self.fd, -1, None, 0  # forgotten even if close() fails
        if fd >= 0:
            os.close(fd)


class PackWriter:
    def __init__(self, blob_dir: str, lanes: int = LANES):
        self._blob_dir = blob_dir
        self._lock = threading.Lock()  # a close or abandon from the event loop waits for a write
        self._lanes = [_Lane() for _ in range(lanes)]
        self._pool = ThreadPoolExecutor(lanes - 1, thread_name_prefix="pack") if lanes > 1 else None
        self._made: list[str] = []  # packs begun by the last batch (they hold nothing committed)
        self._cuts: list[tuple[str, int]] = []  # (path, size) of each pack open when the last batch began

    @property
    def open_blobs(self) -> set[str]:
        """The open packs' blob names."""
        return {lane.blob for lane in self._lanes if lane.blob is not None}

    def write(self, messages: list["BatchItem"], record_of: Callable[["BatchItem"], bytes]) -> dict[str, int]:
        """Make a batch of small messages durable: index_writer.BatchItems with their `data`,
        `spool_path` (the file a new pack starts as) and `blob` (the name a pack they begin takes),
        and their sha256 and crc32 when known (else computed here); record_of(message) is its
        envelope record (after `sha256` is set). Sets each one's blob, offset, sha256 and crc32;
        returns each pack written to with the end of its last frame. Raises StorageError (and
        abandons)."""
        if not messages:
            return {}
        with self._lock:
            try:
                faults.hit("hub", "before_pack")
                return self._write(messages, record_of)
            except OSError as exc:
                self._abandon()
                raise storage_error(exc) from exc

    def committed(self) -> None:
        """The last batch is committed: nothing of it is to be cut back or removed any more."""
        with self._lock:
            self._cuts = []
            self._made = []

    def abandon(self) -> None:
        """The batch failed: cut the packs it appended to back to where the batch began, close them,
        and remove the packs the batch began."""
        with self._lock:
            self._abandon()

    def _abandon(self) -> None:
        cuts, self._cuts = self._cuts, []
        for lane in self._lanes:
            lane.close()
        for cut in cuts:
            try:
                truncate_durably(*cut)
            except OSError:
                pass  # the tail stays past the pack's committed end: start-up recovery moves it aside
        for path in self._made:
            unlink_quietly(path)
        self._made = []

    def _write(self, messages: list["BatchItem"], record_of: Callable[["BatchItem"], bytes]) -> dict[str, int]:
        self._made = []
        self._cuts = [(f"{self._blob_dir}/{lane.blob}", lane.size) for lane in self._lanes if lane.fd >= 0]
        jobs = [(lane, group) for lane, group in zip(self._lanes, _spread(messages, len(self._lanes))) if group]
        ends: dict[str, int] = {}
        failure: OSError | None = None
        later = (
            [self._pool.submit(self._write_lane, lane, group, record_of) for lane, group in jobs[1:]]
            if self._pool
            else []
        )
        try:
            ends.update(self._write_lane(*jobs[0], record_of))
        except OSError as exc:
            failure = exc
        for job in later:  # each one waited for, also after a failure: abandon cuts what they wrote
            try:
                ends.update(job.result())
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        for folder in {os.path.dirname(target) for target in self._made}:
            fsync_dir(folder)
        faults.hit("hub", "pack_synced")
        return ends

    def _write_lane(
        self, lane: _Lane, messages: list["BatchItem"], record_of: Callable[["BatchItem"], bytes]
    ) -> dict[str, int]:
        """Append messages to the lane's pack (beginning a new one when it is full) and make them
        durable; the new packs are renamed into blobs/ (their folders are fsynced by the caller)."""
        written: list[int] = []  # fds of the packs written to, in order
        begun: dict[int, tuple[str, str]] = {}  # fd -> (spool path, blob) of the packs this batch begins
        ends: dict[str, int] = {}  # blob -> end of its last frame
        try:
            for message in messages:
                chunks, spool_path = message.data, message.spool_path
                assert chunks is not None and spool_path is not None, "a packed message comes with both"
                size = sum(map(len, chunks))
                if lane.fd < 0 or (lane.size and lane.size + size > PACK_SIZE):
                    if lane.fd not in written:
                        lane.close()
                    lane.fd = -1
                    fd = os.open(spool_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                    lane.fd, lane.blob, lane.size = fd, message.blob, 0
                    begun[fd] = (spool_path, message.blob)
                    written.append(fd)
                if message.sha256 is None or message.crc32 is None:
                    message.sha256, message.crc32 = digest(chunks)
                assert lane.blob is not None  # the pack open (or just begun)
                message.blob = lane.blob
                record = record_of(message)
                message.offset = lane.size + HEADER_SIZE + len(record)
                write_all_vectored(lane.fd, [frame_header(record, size), record, *chunks])
                lane.size = message.offset + size
                ends[message.blob] = lane.size
                if not written or written[-1] != lane.fd:
                    written.append(lane.fd)
            faults.hit("hub", "pack_written" if lane is self._lanes[0] else "second_pack_written")
            for fd in written:
                (os.fsync if fd in begun else os.fdatasync)(fd)
            for fd, (path, blob) in list(begun.items()):
                target = f"{self._blob_dir}/{blob}"
                rename_into(path, target)
                self._made.append(target)
                del begun[fd]
        finally:
            for fd in written:
                if fd != lane.fd:
                    os.close(fd)
            for path, _blob in begun.values():
                unlink_quietly(path)  # never renamed: the batch failed
        return ends

    def close(self) -> None:
        """Close the open packs: later messages go into new ones."""
        with self._lock:
            self._cuts = []
            self._made = []
            for lane in self._lanes:
                lane.close()

    def shutdown(self) -> None:
        """Close the open packs and stop the lanes' threads (the storage is closing)."""
        self.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _spread(messages: list["BatchItem"], lanes: int) -> list[list["BatchItem"]]:
    """The batch's messages per lane: a batch under SPREAD_MIN bytes goes to the first lane whole
    (a second thread and fdatasync cost more than they save on little data); a bigger one is spread
    over as many lanes as it has SPREAD_MIN bytes, each message to the lane with the fewest bytes
    so far, in batch order."""
    sizes = [sum(map(len, m.data or ())) for m in messages]
    used = max(1, min(lanes, sum(sizes) // SPREAD_MIN))
    groups: list[list[BatchItem]] = [[] for _ in range(lanes)]
    loads = [0] * used
    for message, size in zip(messages, sizes):
        lane = loads.index(min(loads))
        groups[lane].append(message)
        loads[lane] += size
    return groups


def digest(chunks: list[bytes]) -> tuple[str, int]:
    """(SHA-256 hex, CRC-32) of a message held as chunks, without joining them (both functions let
    go of the GIL over large buffers: worker threads hash on the second core)."""
    sha = hashlib.sha256()
    crc = 0
    for chunk in chunks:
        sha.update(chunk)
        crc = zlib.crc32(chunk, crc)
    return sha.hexdigest(), crc


def truncate_durably(path: str, size: int) -> None:
    """Cut a pack back to `size` bytes (a failed batch's frames) and make that durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fdatasync(fd)
    finally:
        os.close(fd)


libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(path: str | os.PathLike[str], start: int, size: int) -> bool:
    """Release the disk space of a freed message's bytes inside a pack (they read as zeros after).
    False if the file is gone or its filesystem cannot punch holes (the space then comes back with
    the whole pack)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, size) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)

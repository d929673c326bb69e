# Packs: small messages (whole in memory at end of data) are stored together in pack files under
# blobs/, written by the hub process (storage/store.py, in its worker threads, one batch at a time):
# the index writer process gets only their index rows. A batch is appended to the open pack and
# made durable with one fdatasync (a file creation costs far more than writing 10 KB). Each message
# is a frame: header, envelope record, message bytes (storage/envelope.py), so that a pack
# describes itself. A new pack is made the way a single message is (spool file, fsync, rename into
# blobs/, folder fsync), so a name under blobs/ never shows a file whose indexed bytes are not
# durable. Two batches may be uncommitted at once (the next one is written while the index commits
# the one before: storage/store.py); a batch whose commit fails leaves no trace, nor does a batch
# written after it: the pack is cut back to where the failed one began and the packs begun since
# are removed; a failed write cuts back only its own batch (a writer killed before it could answer is
# handled by Storage._settle or start-up recovery: bytes past a pack's committed end, index table
# `packs`). A pack is freed with its last message; an open pack is closed first (Storage.empty_trash,
# never while a batch is being written), and appending to a pack takes it out of the trash. The
# bytes of a freed message in a pack that lives on are released later by punch_hole.
# Must never be used by two threads at once (the caller serialises batches).
import collections
import ctypes
import errno
import hashlib
import os
import threading
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import faults
from .envelope import HEADER_SIZE, frame_header
from .files import fsync_dir, libc, rename_into, storage_error, unlink_quietly, write_all_vectored

if TYPE_CHECKING:
    from .index_writer import BatchItem

PACK_SIZE = 16 * 1024 * 1024  # a pack takes no more messages once it holds this much


class PackWriter:
    def __init__(self, blob_dir: str):
        self._blob_dir = blob_dir
        self._lock = threading.Lock()  # a close or abandon from the event loop waits for a write
        self._fd = -1
        self._blob: str | None = None  # the open pack's blob name ('<hour folder>/<name>')
        self._size = 0
        # per batch written and not yet committed, oldest first: (path, size) of the pack open when
        # it began (None: none was), and the packs it began (they hold nothing committed)
        self._uncommitted: collections.deque[tuple[tuple[str, int] | None, list[str]]] = collections.deque()

    @property
    def open_blob(self) -> str | None:
        """The open pack's blob name, or None."""
        return self._blob

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
            cut = (f"{self._blob_dir}/{self._blob}", self._size) if self._fd >= 0 else None
            made: list[str] = []
            try:
                faults.hit("hub", "before_pack")
                ends = self._write(messages, record_of, made)
            except OSError as exc:
                self._cut_back([(cut, made)])  # this batch only: the one before may still commit
                raise storage_error(exc) from exc
            self._uncommitted.append((cut, made))
            return ends

    @property
    def uncommitted(self) -> int:
        """Batches written and neither committed nor undone yet."""
        return len(self._uncommitted)

    def committed(self) -> None:
        """The oldest uncommitted batch is committed: nothing of it is to be cut back or removed.
        Called on the event loop while the next batch may be writing: without the lock (a deque's
        popleft and append are atomic; no abandon runs while a commit succeeds)."""
        if self._uncommitted:
            self._uncommitted.popleft()

    def abandon(self) -> None:
        """The oldest uncommitted batch failed: cut the pack it appended to back to where it began
        (which takes any batch written after it too), close it, and remove the packs they began."""
        with self._lock:
            self._cut_back(list(self._uncommitted))
            self._uncommitted.clear()

    def unsettled(self) -> None:
        """Whether the oldest uncommitted batch was committed is unknown: its frames stay (start-up
        recovery moves them aside if it was not) and the pack is closed; a batch written behind it
        stays listed, to be cut back when it fails in turn."""
        with self._lock:
            if self._uncommitted:
                self._uncommitted.popleft()
            self._close()

    def abandon_newest(self) -> None:
        """The newest batch written failed before its commit was asked for: cut back only it (the
        batch before it may still commit)."""
        with self._lock:
            if self._uncommitted:
                self._cut_back([self._uncommitted.pop()])

    def _cut_back(self, batches: list[tuple[tuple[str, int] | None, list[str]]]) -> None:
        """Undo `batches` (oldest first, up to the newest written) and close the open pack."""
        self._close()
        if not batches:
            return
        cut = batches[0][0]
        if cut is not None:
            try:
                truncate_durably(*cut)
            except OSError:
                pass  # the tail stays past the pack's committed end: start-up recovery moves it aside
        for _cut, made in batches:
            for path in made:
                unlink_quietly(path)

    def _write(
        self, messages: list["BatchItem"], record_of: Callable[["BatchItem"], bytes], made: list[str]
    ) -> dict[str, int]:
        written = []  # fds of the packs written to, in order
        begun: dict[int, tuple[str, str]] = {}  # fd -> (spool path, blob) of the packs this batch begins
        ends: dict[str, int] = {}  # blob -> end of its last frame
        try:
            for message in messages:
                chunks, spool_path = message.data, message.spool_path
                assert chunks is not None and spool_path is not None, "a packed message comes with both"
                size = sum(map(len, chunks))
                if self._fd < 0 or (self._size and self._size + size > PACK_SIZE):
                    if self._fd not in written:
                        self._close()
                    self._fd = -1
                    fd = os.open(spool_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                    self._fd, self._blob, self._size = fd, message.blob, 0
                    begun[fd] = (spool_path, message.blob)
                    written.append(fd)
                if message.sha256 is None or message.crc32 is None:
                    message.sha256, message.crc32 = digest(chunks)
                assert self._blob is not None  # the pack open (or just begun)
                message.blob = self._blob
                record = record_of(message)
                message.offset = self._size + HEADER_SIZE + len(record)
                write_all_vectored(self._fd, [frame_header(record, size), record, *chunks])
                self._size = message.offset + size
                ends[message.blob] = self._size
                if not written or written[-1] != self._fd:
                    written.append(self._fd)
            faults.hit("hub", "pack_written")
            for fd in written:
                (os.fsync if fd in begun else os.fdatasync)(fd)
            for fd, (path, blob) in list(begun.items()):
                target = f"{self._blob_dir}/{blob}"
                rename_into(path, target)
                made.append(target)
                del begun[fd]
            for folder in {os.path.dirname(target) for target in made}:
                fsync_dir(folder)
            faults.hit("hub", "pack_synced")
        finally:
            for fd in written:
                if fd != self._fd:
                    os.close(fd)
            for path, _blob in begun.values():
                unlink_quietly(path)  # never renamed: the batch failed
        return ends

    def close(self) -> None:
        """Close the open pack: later messages go into a new one."""
        with self._lock:
            self._uncommitted.clear()
            self._close()

    def _close(self) -> None:
        fd, self._fd, self._blob, self._size = self._fd, -1, None, 0  # forgotten even if close() fails
        if fd >= 0:
            os.close(fd)


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

# Spool files: the one place message bytes are written. A spool file is written chunk by chunk
# while the client sends, hashed on the fly, then fsynced and renamed into the blob folder.
# Must never hold a whole message in memory.
import errno
import hashlib
import os
import secrets
import time
from pathlib import Path

from .errors import StorageError, StorageFull


def new_queue_id() -> str:
    """Time-sortable, unique, filename-safe: 13 hex digits of microseconds + 6 random."""
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(3).upper()}"


def blob_name(queue_id: str, received_at: float) -> str:
    """Blobs are grouped per hour so that one folder fsync covers a whole batch."""
    return time.strftime("%Y%m%d%H", time.gmtime(received_at)) + "/" + queue_id


class SpoolFile:
    """A message being received: `write()` chunks, then `sync()` (blocking) or `discard()`."""

    __slots__ = ("queue_id", "path", "size", "_fd", "_sha")

    def __init__(self, spool_dir: Path, queue_id: str):
        self.queue_id = queue_id
        self.path = spool_dir / (queue_id + ".tmp")
        self.size = 0
        self._sha = hashlib.sha256()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._sha.update(data)
        self.size += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise _storage_error(exc) from exc

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def sync(self) -> None:
        """Flush to disk and close; blocking, run it off the event loop."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(str(exc))
    return StorageError(str(exc))

# Durable file operations shared by the spool (storage/spool.py) and the pack writer
# (storage/packs.py): whole writes, renames into blobs/ with the folder's own entry made durable,
# folder fsync, the early-writeback hint, and OSError to StorageError. Plain blocking code; imports
# nothing heavy (the index writer process uses it).
import ctypes
import errno
import os
from pathlib import Path

from .errors import StorageError, StorageFull

_known_folders: set[str] = set()  # blob folders known to exist (a folder is never removed while serving)


def unlink_quietly(path: str | Path) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_IOV_MAX = 1024  # buffers one writev takes (Linux)


def write_all_vectored(fd: int, buffers: list[bytes] | list[memoryview]) -> None:
    """Write several buffers in order with as few system calls as the kernel allows (no copy)."""
    for start in range(0, len(buffers), _IOV_MAX):
        group = buffers[start : start + _IOV_MAX]
        written = os.writev(fd, group)
        total = sum(map(len, group))
        if written < total:  # a partial write (rare): the rest, one buffer at a time
            for buffer in group:
                if written >= len(buffer):
                    written -= len(buffer)
                    continue
                write_all(fd, memoryview(buffer)[written:])
                written = 0


def rename_into(path: str, final: str) -> None:
    """Rename a file to `final` under blobs/, making its hour folder first if need be."""
    folder = os.path.dirname(final)
    if folder not in _known_folders:
        try:
            os.mkdir(folder)
            fsync_dir(os.path.dirname(folder))  # a new hour folder's own entry is durable too
        except FileExistsError:
            pass
        _known_folders.add(folder)
    os.rename(path, final)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_range(source: str | Path, target: str | Path, offset: int, length: int) -> int:
    """Copy bytes [offset, offset + length) of `source` into the new file `target`, fsynced; the
    bytes copied (fewer if the source is shorter)."""
    copied = 0
    with open(source, "rb") as src, open(target, "xb") as out:
        src.seek(offset)
        while copied < length:
            block = src.read(min(length - copied, 1 << 20))
            if not block:
                break
            out.write(block)
            copied += len(block)
        out.flush()
        os.fsync(out.fileno())
    return copied


libc = ctypes.CDLL(None, use_errno=True)  # the C library: sync_file_range here, fallocate in packs
_sync_file_range = getattr(libc, "sync_file_range", None)  # Linux only
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing bytes [offset, offset + length) of a file to disk now, without
    waiting: the fsync at the end then has little left to flush. Only a hint (durability still comes
    from fsync); does nothing where the call is missing or fails."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop_cached(ranges: list[tuple[str, int, int]]) -> None:
    """Tell the kernel it may drop the cached pages of these byte ranges [start, end) of blob files
    (end 0: to the end of the file), written and synced long ago (clean). Only a hint: a file gone
    meanwhile is skipped, a later read comes from the disk. The kernel drops only whole folios
    (up to 2 MiB on Linux): the caller passes ranges that cover them."""
    for path, start, end in ranges:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, start, max(end - start, 0), os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(str(exc))
    return StorageError(str(exc))

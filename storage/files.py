# Durable file operations shared by the spool (storage/spool.py) and the pack writer
# (storage/packs.py): whole writes, renames into blobs/ with the folder's own entry made durable,
# folder fsync, and OSError to StorageError. Plain blocking code; imports nothing heavy (the index
# writer process uses it).
import errno
import os
from pathlib import Path

from .errors import StorageError, StorageFull


def blob_of(path: Path) -> str:
    """The blob column of a file under blobs/: '<hour folder>/<name>'."""
    return f"{path.parent.name}/{path.name}"


_known_folders: set[Path] = set()  # blob folders known to exist (a folder is never removed while serving)


def unlink_quietly(path: Path) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def rename_into(path: Path, final: Path) -> None:
    if final.parent not in _known_folders:
        try:
            final.parent.mkdir()
            fsync_dir(final.parent.parent)   # a new hour folder's own entry is durable too
        except FileExistsError:
            pass
        _known_folders.add(final.parent)
    os.rename(path, final)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(str(exc))
    return StorageError(str(exc))

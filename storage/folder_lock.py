# One serving hub per data folder: `mailhub serve` holds an exclusive lock on
# <data folder>/mailhub.lock while it runs, taken before start-up recovery (which removes every
# spool file: those of a hub already serving the folder would go too, and both would relay the
# same queue). The kernel drops the lock when the process ends, however it ends (kill -9
# included), so it is never stale. The file holds the holder's pid, for the error message only.
# The command-line tools (site, queue, trace...) take no lock: they work beside a running hub.
import fcntl
import os
from pathlib import Path

from .errors import StorageError

LOCK_NAME = "mailhub.lock"


class DataFolderInUse(StorageError):
    """Another process serves the data folder."""


def lock_data_folder(data_dir: Path) -> int:
    """Take the folder's lock; returns the file descriptor that holds it (close it to release)."""
    fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataFolderInUse(f"data folder {data_dir} is in use by another `mailhub serve` (pid {holder})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

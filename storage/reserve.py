# Space set aside in the data folder (a file of storage.reserve_bytes, allocated while the disk has
# room) and given back when the disk is full: SQLite cannot even open its index on a full disk (it
# must size its -shm file) nor delete a mailbox entry (WAL pages), so a hub that stopped on a full
# disk could neither start nor let gateways delete what would free space. Start-up releases it when
# free space is below its size; so does a deletion (POP3 DELE + QUIT, IMAP \Deleted + EXPUNGE) that
# ran out of space while the hub runs, before it is tried once more (storage.Storage); housekeeping
# makes it again once there is twice that free.
# Holds no data: removing it by hand is always safe. Must never be taken when it would fill the disk.
import logging
import os
from pathlib import Path

log = logging.getLogger("mailhub.storage")
RESERVE_NAME = "reserve.space"


def free_bytes(data_dir: Path) -> int:
    st = os.statvfs(data_dir)
    return st.f_bavail * st.f_frsize


def reserve_path(data_dir: Path) -> Path:
    return Path(data_dir) / RESERVE_NAME


def keep(data_dir: Path, size: int) -> bool:
    """Make the reserve if it is missing and twice its size is free; True when it is in place."""
    path = reserve_path(data_dir)
    if size <= 0:
        return False
    if path.exists():
        return True
    if free_bytes(data_dir) < 2 * size:
        return False
    temporary = path.with_name(RESERVE_NAME + ".tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        log.warning("could not set %d bytes aside in %s: %s", size, path, exc)
        return False
    return True


def release_if_short(data_dir: Path, size: int) -> bool:
    """At start: when less than the reserve's size is free, give the reserve back (if there is one);
    True when the disk is that short (the hub then takes no mail until keep() succeeds)."""
    path = reserve_path(data_dir)
    try:
        if size <= 0 or free_bytes(data_dir) >= size:
            return False
        if path.exists():
            freed = path.stat().st_blocks * 512
            path.unlink()
            log.warning(
                "disk full: released the %d-byte reserve %s so that the hub can start and gateways"
                " can delete; SMTP answers 452 4.3.1 until space returns",
                freed,
                path,
            )
        else:
            log.warning(
                "disk full (less than storage.reserve_bytes free in %s): SMTP answers 452 4.3.1 until space returns",
                data_dir,
            )
    except OSError:
        pass
    return True


def release(data_dir: Path) -> bool:
    """While running: a deletion found the disk full; give the reserve back (True) so that it can
    go through, or False when there is none to give."""
    path = reserve_path(data_dir)
    try:
        freed = path.stat().st_blocks * 512
        path.unlink()
    except FileNotFoundError:
        return False
    log.warning(
        "disk full: released the %d-byte reserve %s for a gateway's deletion; SMTP answers 452 4.3.1"
        " until space returns",
        freed,
        path,
    )
    return True

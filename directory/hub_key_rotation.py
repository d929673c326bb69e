# Rotation of the hub's signing key: make a new key, certify it with the current one, keep the
# current one in DATA_DIR/hub-keys/, then put the new key in place with one rename, which is the
# commit point: a crash before it leaves the old key current (and a harmless copy of it in the
# archive), a crash after it leaves the rotation done. Everything else (who co-signs until when,
# which rotation the sites were told of) is derived from the key file, so there is no second
# record to get out of step. Announcing the rotation is the directory mailer's job.
# Must never: delete or overwrite an archived key, or leave a state with no current key.
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from storage.files import fsync_dir

from .errors import DirectoryError
from .hub_key import ARCHIVE_DIR, KEY_FILE, HubKey, archive_path, key_path, load_hub_key, new_key, write_private

LOCK_FILE = "hub-key.lock"
_TEMPORARY = f".{KEY_FILE}.rotation.tmp"

# the named steps, in order; `step` is called after each (fault-injection tests kill the process there)
STEPS = ("generated", "archived", "written", "committed")


def rotate_hub_key(
    data_dir: Path, addresses: list[str], now: float | None = None, step: Callable[[str], None] = lambda name: None
) -> tuple[HubKey, HubKey]:
    """Replace the hub key by a new one certified by it; returns (previous, new). `now` (the
    certification's time) is a lower bound: the certification is never older than the new key."""
    data_dir = Path(data_dir)
    now = time.time() if now is None else now
    lock = _lock(data_dir)
    try:
        previous = load_hub_key(data_dir)
        if previous is None:
            raise DirectoryError(
                "there is no hub key to rotate yet (it is made by the first start or `mailhub directory fingerprint`)"
            )
        new = new_key(addresses)
        # not before the new key was made (`now` was read before the lock and the current key's
        # loading, or given): OpenPGP implementations ignore a certification older than the key
        # (GnuPG: "public key ... is N seconds newer than the signature"), and the gateways would
        # not find the new key valid through the old
        previous.certify(new, max(now, new.created))
        step("generated")
        try:
            st = key_path(data_dir).stat()
            owner = st.st_uid, st.st_gid  # run as root, the files stay the hub user's
            _archive(data_dir, previous, owner)
            step("archived")
            temporary = data_dir / _TEMPORARY
            write_private(temporary, new, owner)
            step("written")
            os.replace(temporary, key_path(data_dir))  # the commit point
        except OSError as exc:
            raise DirectoryError(
                f"rotation not done, the hub key {previous.fingerprint} stays current:"
                f" {exc.strerror or exc}: {exc.filename}"
            ) from None
        step("committed")
        try:
            fsync_dir(data_dir)
        except OSError as exc:
            raise DirectoryError(
                f"the hub key was replaced by {new.fingerprint}, but syncing {data_dir}"
                f" failed ({exc.strerror}); check the disk"
            ) from None
        return previous, new
    finally:
        os.close(lock)


def clean_leftovers(data_dir: Path) -> None:
    """Remove the temporary files of a rotation that was cut off (unless one is running now)."""
    data_dir = Path(data_dir)
    try:
        lock = _lock(data_dir)
    except DirectoryError:
        return
    try:
        for leftover in [data_dir / _TEMPORARY, *(data_dir / ARCHIVE_DIR).glob(".*.tmp")]:
            leftover.unlink(missing_ok=True)
    finally:
        os.close(lock)


def _lock(data_dir: Path) -> int:
    try:  # read-only and readable by all: a lock taken as root does not shut the hub's user out
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DirectoryError(f"cannot open {data_dir / LOCK_FILE}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryError("another hub key rotation is running") from None
    return fd


def _archive(data_dir: Path, key: HubKey, owner: tuple[int, int]) -> None:
    """Keep the key in DATA_DIR/hub-keys/<FINGERPRINT>.asc (mode 0600), durably."""
    folder = data_dir / ARCHIVE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(folder, *owner)
    path = archive_path(data_dir, key.fingerprint)
    if path.exists():
        return
    temporary = folder / f".{key.fingerprint}.tmp"
    write_private(temporary, key, owner)
    os.replace(temporary, path)
    fsync_dir(folder)
    fsync_dir(data_dir)

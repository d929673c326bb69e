# Verifying stored mails: the cheap check made before a mail is served (its blob file is there and
# reaches the end of the mail: one stat), and the full one (the mail's bytes hash to the SHA-256
# recorded at ingest) made by the background scrub at a set rate and by `mailhub storage verify`.
# Plain blocking code, run in worker threads, the index writer or the CLI. Marking a mail damaged
# is a copy of its bytes into the quarantine (quarantine_copy) and a `damaged` row (note_damaged),
# made by Storage.mark_damaged in the hub, or by the CLI when the hub is stopped. Must never change
# or remove a blob file.
import hashlib
import os
import threading
import time
from pathlib import Path

from . import quarantine, sql

CHUNK = 1 << 20


def size_problem(path: str | os.PathLike[str], offset: int, size: int) -> str | None:
    """Why the mail [offset, offset + size) of the blob file cannot be whole, or None."""
    try:
        file_size = os.stat(path).st_size
    except FileNotFoundError:
        return "blob file missing"
    except OSError as exc:
        return f"blob file unreadable ({exc.strerror})"
    if file_size < offset + size:
        # asked again through an open file: on NFS a stat may answer from the attribute cache (the
        # size before another node appended this mail to its pack), an open revalidates it
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return f"blob file cut short ({max(0, file_size - offset)} of {size} bytes)"
        try:
            file_size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    if file_size < offset + size:
        return f"blob file cut short ({max(0, file_size - offset)} of {size} bytes)"
    return None


def content_problem(
    path: str | os.PathLike[str],
    offset: int,
    size: int,
    sha256: str | None,
    pacer: "Pacer | None" = None,
    stop: threading.Event | None = None,
) -> str | None:
    """Why the mail's bytes are not the ones acknowledged (short, unreadable, another SHA-256), or
    None. Reads CHUNK bytes at a time (at the pacer's rate); returns None early if `stop` is set."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            fd = f.fileno()
            done = 0
            while done < size:
                if stop is not None and stop.is_set():
                    return None
                chunk = os.pread(fd, min(CHUNK, size - done), offset + done)
                if not chunk:
                    return f"blob file cut short ({done} of {size} bytes)"
                digest.update(chunk)
                done += len(chunk)
                if pacer is not None:
                    pacer.wait(len(chunk))
    except FileNotFoundError:
        return "blob file missing"
    except OSError as exc:
        return f"blob file unreadable ({exc.strerror})"
    if digest.hexdigest() != sha256:
        return "SHA-256 differs from the one recorded at ingest"
    return None


class Pacer:
    """Keeps a reader at `rate` bytes a second (0: as fast as it goes), by sleeping (monotonic clock)."""

    def __init__(self, rate: float):
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0

    def wait(self, count: int) -> None:
        if self.rate <= 0:
            return
        self._bytes += count
        ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)
        elif ahead < -1.0:  # idle for a while: no burst to catch up
            self._start, self._bytes = time.monotonic(), 0


def quarantine_copy(
    data_dir: Path, path: Path, offset: int, size: int, queue_id: str, reason: str, found_by: str
) -> str | None:
    """Copy what is on disk of a damaged mail into the quarantine (the blob stays: the mailbox entry
    still names it until the gateway deletes it); the entry's id, or None (no file, or no room). Its
    record (queue ID, reason, found_by, time) is what rebuild-index makes the `damaged` row again from."""
    try:
        entry = quarantine.quarantine(
            data_dir, Path(path), "damaged", reason, byte_range=(offset, size), queue_id=queue_id, found_by=found_by
        )
    except OSError:
        return None
    return f"{entry.parent.name}/{entry.name}"


def note_damaged(conn: sql.Connection, queue_id: str, reason: str, found_by: str, at: float, entry: str | None) -> bool:
    """The `damaged` row (call inside a transaction); False if the mail was known damaged already."""
    cursor = conn.execute(
        "INSERT INTO damaged (queue_id, reason, found_by, found_at, quarantine) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (queue_id, reason, found_by, at, entry),
    )
    return cursor.rowcount > 0


def damaged_rows_from_quarantine(conn: sql.Connection, data_dir: Path) -> int:
    """Make the `damaged` rows again from the quarantine's `damaged` entries (rebuild-index: an
    index restored from a backup, or lost, forgot them); call inside a transaction. Returns how many
    rows were missing."""
    made = 0
    for entry in quarantine.list_entries(data_dir):
        queue_id = entry.extra.get("queue_id")
        if entry.reason == "damaged" and isinstance(queue_id, str):
            made += note_damaged(
                conn, queue_id, entry.detail, str(entry.extra.get("found_by", "unknown")), entry.at, entry.id
            )
    return made


def mark_with_hub_stopped(data_dir: Path, found: list[tuple[str, str]], found_by: str, index_url: str = "") -> int:
    """Mark mails damaged while no hub serves the folder (its lock held meanwhile): quarantine
    copies and `damaged` rows. Returns how many were new. Raises DataFolderInUse if a hub runs."""
    from . import db
    from .folder_lock import lock_data_folder
    from .index import IndexLocation

    data_dir = Path(data_dir).absolute()
    lock = lock_data_folder(data_dir)
    try:
        conn = IndexLocation(data_dir, index_url).connect()
        try:
            new = 0
            for queue_id, reason in found:
                row = conn.execute(
                    "SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", (queue_id,)
                ).fetchone()
                if row is None:
                    continue
                entry = quarantine_copy(
                    data_dir, data_dir / "blobs" / row[0], row[1], row[2], queue_id, reason, found_by
                )
                with db.transaction(conn):
                    new += note_damaged(conn, queue_id, reason, found_by, time.time(), entry)
            return new
        finally:
            conn.close()
    finally:
        os.close(lock)


# ---- what `mailhub storage verify` and `mailhub storage damaged` read (a read-only connection) ----


def site_id_of(conn: sql.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM sites WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def mails_to_verify(conn: sql.Connection, site_id: int | None = None) -> list[tuple[str, str, int, int, str]]:
    """(queue ID, blob file, offset, size, SHA-256) of every stored mail, or of those in one
    site's mailbox, in queue ID order."""
    columns = "m.queue_id, m.blob, m.blob_offset, m.size, m.sha256"
    if site_id is not None:
        return conn.execute(
            f"SELECT DISTINCT {columns} FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id"
            " WHERE b.site_id = ? ORDER BY m.queue_id",
            (site_id,),
        ).fetchall()
    return conn.execute(f"SELECT {columns} FROM messages m ORDER BY m.queue_id").fetchall()


def still_stored(conn: sql.Connection, queue_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone() is not None


def known_damaged(conn: sql.Connection) -> set[str]:
    """The queue IDs marked damaged."""
    return {queue_id for (queue_id,) in conn.execute("SELECT queue_id FROM damaged")}


def damaged_mails(conn: sql.Connection) -> list[tuple[str, str, str, float, str | None, int | None, str | None]]:
    """(queue ID, reason, found by, found at, quarantine entry, size or None once deleted, the
    mailboxes it is in, comma-separated) of every mail marked damaged, in the order found."""
    names = sql.group_concat(conn, "s.name", ",")
    return conn.execute(
        "SELECT d.queue_id, d.reason, d.found_by, d.found_at, d.quarantine, m.size,"
        f" (SELECT {names} FROM mailbox b JOIN sites s ON s.id = b.site_id"
        "  WHERE b.queue_id = d.queue_id) FROM damaged d LEFT JOIN messages m ON m.queue_id = d.queue_id"
        " ORDER BY d.found_at"
    ).fetchall()

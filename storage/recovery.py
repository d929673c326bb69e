# Start-up recovery: finish or undo what a crash interrupted, and check the index against the blob
# store, before any listener opens (the data folder's lock is held; no index writer runs yet).
# What it removes, it can prove was never acknowledged: spool files (a file still in spool/ was
# never renamed into blobs/, so never committed) and the files of blob_trash (freed by a committed
# deletion). Everything else it cannot explain goes to the quarantine (storage/quarantine.py), never
# away: a blob file without an index row, a pack's bytes past its committed end, index rows whose
# blob is missing or short. Stray files and folders (not named as the hub names its own) are
# reported and left alone. Evidence that the index is OLDER than the blob store (a ledger line or
# an envelope record of a group commit the index never saw: an index restored from a backup, a
# lost WAL) stops the start (IndexBehind): `mailhub storage rebuild-index` puts those mails back;
# quarantining them would hide acknowledged mail. Likewise when most indexed blobs are missing
# (an unmounted blob store): IndexBehind, not a quarantine of every mailbox.
# A full disk does not stop it: what cannot be written is skipped and reported.
# With a shared blob folder (storage/blob_layout.py) it looks only at this node's own: its spool,
# <root>/<node>/ and the index rows of blobs named '<node>/...'; another node's blob renamed into
# place but not yet committed looks like an orphan, and is never touched. It empties no trash there
# (another node may still be sending a freed file: Storage.empty_trash removes it after a delay),
# and a freed file of its own waiting in the trash is not an orphan.
import json
import logging
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from . import db, envelope, ledger, sql
from .blob_layout import BlobLayout
from .errors import StorageError
from .files import unlink_quietly
from .packs import truncate_durably
from .quarantine import quarantine, quarantine_data

log = logging.getLogger("mailhub.storage")
HOUR_FOLDER = re.compile(r"^\d{10}$")
QUEUE_ID = re.compile(r"^[0-9A-F]{19}$")
SPOOL_FILE = re.compile(r"^[0-9A-F]{19}\.tmp$")
PROBE_FILE = re.compile(r"^healthz-\d+\.probe$")  # mailhub.metrics' free-space probe
MISSING_LIMIT = 10  # more missing blobs than this (and over a tenth of all) stop the start


class IndexBehind(StorageError):
    """The index does not match the blob store as a whole: the hub must not start on it."""

    def __init__(self, what: str):
        super().__init__(f"{what}; run `mailhub storage rebuild-index` (see docs/storage.md)")


@dataclass
class RecoveryReport:
    spool_removed: int = 0
    trash_removed: int = 0
    quarantined: list[str] = field(default_factory=list)  # what was moved aside, and why
    strays: list[str] = field(default_factory=list)  # left alone
    missing_blobs: list[str] = field(default_factory=list)
    size_mismatches: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)  # blob files no index row names (quarantined)
    skipped: list[str] = field(default_factory=list)  # could not be done (e.g. a full disk)

    def anything(self) -> bool:
        return bool(
            self.spool_removed
            or self.trash_removed
            or self.quarantined
            or self.strays
            or self.missing_blobs
            or self.size_mismatches
            or self.skipped
        )

    def __str__(self) -> str:
        return (
            f"{self.spool_removed} partial spool file(s) removed, {self.trash_removed} freed blob(s)"
            f" removed, {len(self.quarantined)} item(s) quarantined, {len(self.strays)} stray(s) left alone,"
            f" {len(self.missing_blobs)} indexed blob(s) missing, {len(self.size_mismatches)} blob(s)"
            f" shorter than indexed, {len(self.skipped)} step(s) skipped"
        )


def recover(
    conn: sql.Connection, data_dir: Path, layout: BlobLayout | None = None, cache: bool = False
) -> RecoveryReport:
    """`cache`: blobs/ is a cache of an object store (storage/object_blobs.py): a cached file
    missing is normal, a short one is dropped (downloaded again when served), and freed blobs are
    left in blob_trash for Storage.empty_trash (their objects go first)."""
    data_dir = Path(data_dir)
    layout = layout or BlobLayout(data_dir)
    report = RecoveryReport()
    _clean_spool(data_dir, data_dir / "spool", report)
    if not cache and not layout.shared:  # shared: Storage.empty_trash, after a delay (another
        _empty_trash(conn, data_dir / "blobs", layout, report)  # node may be sending the file)
    seq, _attempt = ledger.last_commit(conn)
    newest = ledger.read(data_dir, newest_only=True)
    if newest.max_seq > seq:
        raise IndexBehind(
            f"the index ({data_dir / 'index.sqlite3'}) is older than the blob store: it ends at"
            f" group commit {seq}, the ledger at {newest.max_seq}"
        )
    _catch_up_ledger(conn, data_dir, report)
    # the highest group commit number this node's uncommitted frames may carry: the one after its
    # next (a batch is written while the index commits the one before: storage/store.py)
    allowed = ledger.next_seq(ledger.next_seq(ledger.stream_last(conn, layout.number)[0], layout.number), layout.number)
    _check_blobs(conn, data_dir, seq, allowed, layout.prefix, report, cache)
    for text in report.quarantined:
        log.warning("recovery: quarantined %s", text)
    for text in report.strays:
        log.warning("recovery: stray %s left alone (not the hub's; move it away)", text)
    for text in report.skipped:
        log.error("recovery: skipped: %s", text)
    return report


def _clean_spool(data_dir: Path, spool_dir: Path, report: RecoveryReport) -> None:
    for entry in os.scandir(spool_dir):
        if entry.is_file(follow_symlinks=False) and (SPOOL_FILE.match(entry.name) or PROBE_FILE.match(entry.name)):
            os.unlink(entry.path)  # never renamed into blobs/: never committed, never acknowledged
            report.spool_removed += 1
        else:
            report.strays.append(_relative(entry.path, data_dir))


def _empty_trash(conn: sql.Connection, blob_dir: Path, layout: BlobLayout, report: RecoveryReport) -> None:
    trash = layout.releasable([blob for (blob,) in conn.execute("SELECT blob FROM blob_trash")])
    for blob in trash:
        unlink_quietly(blob_dir / blob)  # freed by a committed deletion
    try:
        conn.executemany("DELETE FROM blob_trash WHERE blob = ?", [(b,) for b in trash])
    except sqlite3.OperationalError as exc:  # a full disk: the rows are removed at the next start
        report.skipped.append(f"forgetting {len(trash)} removed blob(s): {exc}")
    report.trash_removed = len(trash)


def _catch_up_ledger(conn: sql.Connection, data_dir: Path, report: RecoveryReport) -> None:
    writer = ledger.LedgerWriter(data_dir)
    try:
        ledger.catch_up(conn, writer)
    except OSError as exc:
        report.skipped.append(f"bringing the ledger up to date: {exc} (the index writer retries)")
    finally:
        try:
            writer.close()
        except OSError:
            pass


def _check_blobs(
    conn: sql.Connection,
    data_dir: Path,
    seq: int,
    allowed: int,
    own: str,
    report: RecoveryReport,
    cache: bool = False,
) -> None:
    """`own`: the prefix of this node's blob names ('<node>/' in a shared folder, else ""); `allowed`:
    the highest number an uncommitted group commit of this node may carry (seq + 2 for one hub)."""
    blob_dir = data_dir / "blobs"
    mine = (len(own), own)
    indexed = dict(
        conn.execute(
            "SELECT blob, max(blob_offset + size) FROM messages WHERE substr(blob, 1, ?) = ? GROUP BY blob", mine
        )
    )
    committed_end = dict(conn.execute("SELECT blob, committed_end FROM packs WHERE substr(blob, 1, ?) = ?", mine))
    orphans, tails, on_disk = [], [], set()
    for folder in os.scandir(blob_dir / own):
        if own and folder.name in ("spool", "ledger", "mailhub.lock"):
            continue  # the node's own (storage/blob_layout.py)
        if not (folder.is_dir(follow_symlinks=False) and HOUR_FOLDER.match(folder.name)):
            report.strays.append(_relative(folder.path, data_dir))
            continue
        for entry in os.scandir(folder.path):
            name = f"{own}{folder.name}/{entry.name}"
            if not (entry.is_file(follow_symlinks=False) and QUEUE_ID.match(entry.name)):
                report.strays.append(_relative(entry.path, data_dir))
            elif name in indexed:
                on_disk.add(name)
                size = entry.stat().st_size
                if size < indexed[name]:
                    report.size_mismatches.append(name)
                elif name in committed_end and size > committed_end[name]:
                    tails.append((name, committed_end[name], size))
            elif name in committed_end:  # a pack whose messages are all gone, not yet trashed
                on_disk.add(name)
            else:
                orphans.append(name)
    newer = [
        what for what in (_newer_than_index(blob_dir, name, start, seq, allowed) for name, start, _ in tails) if what
    ] + [what for what in (_newer_than_index(blob_dir, name, 0, seq, allowed) for name in orphans) if what]
    if newer:
        raise IndexBehind(
            f"the index ({data_dir / 'index.sqlite3'}) is older than the blob store: {newer[0]}"
            f" (and {len(newer) - 1} more), but it ends at group commit {seq}"
        )
    if cache:  # the object store holds them (checked by Storage.open); a short cached file is dropped
        for name in report.size_mismatches:
            unlink_quietly(blob_dir / name)
        report.size_mismatches = []
    else:
        report.missing_blobs = sorted(set(indexed) - on_disk)
    if len(report.missing_blobs) > max(MISSING_LIMIT, len(indexed) // 10):
        raise IndexBehind(
            f"{len(report.missing_blobs)} of the {len(indexed)} blob files the index refers to are"
            f" missing from {blob_dir} (is the blob store mounted, or the index from elsewhere?)"
        )
    for name, start, size in tails:
        _quarantine_tail(data_dir, blob_dir / name, start, size, report)
    if own and not cache:  # a shared folder: freed files wait in the trash (Storage.empty_trash)
        trash = {blob for (blob,) in conn.execute("SELECT blob FROM blob_trash")}
        orphans = [name for name in orphans if name not in trash]
    if cache:  # left in place: Storage asks the object store which they are (quarantine_uncommitted)
        trash = {blob for (blob,) in conn.execute("SELECT blob FROM blob_trash")}
        report.uncommitted = [name for name in orphans if name not in trash]  # trash: empty_trash's
        orphans = []
    for name in orphans:
        _quarantine(
            data_dir,
            blob_dir / name,
            "uncommitted_blob",
            "a blob file no index row refers to (a transaction cut short before its commit: its sender got no 250)",
            report,
        )
    for blob in report.missing_blobs + report.size_mismatches:
        log.error("index refers to %s blob %s", "missing" if blob in report.missing_blobs else "short", blob)
        _quarantine_rows(conn, data_dir, blob, report)


def quarantine_uncommitted(data_dir: Path, blobs: list[str]) -> list[str]:
    """Blobs on object storage: this node's blob files that no index row names and whose objects
    the store holds (uploads a crash cut short before their commit) moved to the quarantine as
    recovery does in the other layouts; what was moved (or why not), one line each."""
    report = RecoveryReport()
    for name in blobs:
        _quarantine(
            Path(data_dir),
            Path(data_dir) / "blobs" / name,
            "uncommitted_blob",
            "a blob file no index row refers to (a transaction cut short before its commit: its sender got no 250)",
            report,
        )
    return report.quarantined + report.skipped


def _newer_than_index(blob_dir: Path, name: str, start: int, seq: int, allowed: int) -> str | None:
    """A description of a group commit newer than the index's last in this file (past `start`), or
    None. `allowed`: the highest number an uncommitted group commit may carry (seq + 2 for one hub)."""
    try:
        fd = os.open(blob_dir / name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if start == 0 and envelope.has_trailer(fd, size):
            return None  # a single file: its commit is in the ledger (checked), not in the file
        for found in envelope.frames(fd, start, size):
            if not found.record:
                continue
            record_seq = found.record.get("seq")
            if isinstance(record_seq, int) and record_seq > allowed:
                return f"{name} holds mail {found.record['q']} of group commit {record_seq}"
            prev = found.record.get("p")
            if isinstance(prev, list) and prev and isinstance(prev[0], int) and prev[0] > seq:
                return f"{name} holds mail {found.record['q']} written after group commit {prev[0]}"
    finally:
        os.close(fd)
    return None


def _quarantine_tail(data_dir: Path, path: Path, start: int, size: int, report: RecoveryReport) -> None:
    try:
        quarantine(
            data_dir,
            path,
            "uncommitted_frames",
            "bytes past the pack's committed end (a group commit cut short before its commit: its senders got no 250)",
            byte_range=(start, size - start),
        )
        truncate_durably(str(path), start)
    except OSError as exc:
        report.skipped.append(f"moving aside the uncommitted end of {path}: {exc}")
        return
    report.quarantined.append(f"{_relative(path, data_dir)} bytes {start}..{size} (uncommitted)")


def _quarantine(data_dir: Path, path: Path, reason: str, detail: str, report: RecoveryReport) -> None:
    try:
        quarantine(data_dir, path, reason, detail, queue_ids=_queue_ids(path))
    except OSError as exc:
        report.skipped.append(f"moving aside {path}: {exc}")
        return
    report.quarantined.append(f"{_relative(path, data_dir)} ({reason})")


def _queue_ids(path: Path) -> list[str]:
    """The queue IDs the envelope records in a blob file name (for the quarantine's reason record)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        size = os.fstat(fd).st_size
        single = envelope.read_trailer(fd, size)
        if single is not None and single.record is not None:
            return [single.record["q"]]
        return [f.record["q"] for f in envelope.frames(fd, 0, size) if f.record] if envelope.is_pack(fd) else []
    finally:
        os.close(fd)


def _quarantine_rows(conn: sql.Connection, data_dir: Path, blob: str, report: RecoveryReport) -> None:
    """Index rows whose blob is missing or short: their record (and a short file) go to the
    quarantine, the rows go from the index without ledger removals (not a receiver's deletion: a
    rebuild brings the mails back if their blob turns up)."""
    path = data_dir / "blobs" / blob
    try:
        length = path.stat().st_size  # short: only the mails past its end go
    except FileNotFoundError:
        length = -1
    rows = conn.execute("SELECT * FROM messages WHERE blob = ? AND blob_offset + size > ?", (blob, length))
    columns = [c[0] for c in rows.description]
    messages = [dict(zip(columns, row)) for row in rows.fetchall()]
    qids = [(m["queue_id"],) for m in messages]
    entries = conn.execute(
        "SELECT b.site_id, s.name, b.rcpt, b.uid, b.queue_id FROM mailbox b"
        " JOIN messages m ON m.queue_id = b.queue_id LEFT JOIN sites s ON s.id = b.site_id"
        " WHERE m.blob = ? AND m.blob_offset + m.size > ?",
        (blob, length),
    ).fetchall()
    data = json.dumps({"blob": blob, "file_size": length, "messages": messages, "entries": entries}, indent=1).encode()
    reason = "short_blob" if length >= 0 else "missing_blob"
    state = "shorter than indexed" if length >= 0 else "missing"
    detail = f"index rows of mails past the end of blob file {blob} ({state}): taken out of the mailboxes"
    try:
        quarantine_data(
            data_dir, "index-rows.json", data, f"blobs/{blob}", reason, detail, queue_ids=[q for (q,) in qids]
        )
        with db.transaction(conn):
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'ledger_quiet'")
            conn.executemany("DELETE FROM mailbox WHERE queue_id = ?", qids)
            conn.executemany("DELETE FROM outbound WHERE queue_id = ?", qids)
            conn.executemany("DELETE FROM messages WHERE queue_id = ?", qids)  # (if no entry held it)
            conn.execute("DELETE FROM blob_holes WHERE blob = ? AND start + size > ?", (blob, length))
            if length < 0:
                conn.execute("DELETE FROM packs WHERE blob = ?", (blob,))
            conn.execute("DELETE FROM blob_trash WHERE blob = ?", (blob,))  # a short file stays, for the rest
            conn.execute("UPDATE meta SET value = 0 WHERE key = 'ledger_quiet'")
        if length >= 0 and conn.execute("SELECT 1 FROM messages WHERE blob = ?", (blob,)).fetchone() is None:
            quarantine(data_dir, path, reason, "what is left of a blob file shorter than its indexed mails")
    except (OSError, sqlite3.OperationalError) as exc:
        report.skipped.append(f"moving aside the index rows of {reason.replace('_', ' ')} {blob}: {exc}")
        return
    report.quarantined.append(
        f"index rows of {blob}: {len(messages)} mail(s), {len(entries)} mailbox entr(ies) ({reason.replace('_', ' ')})"
    )


def _relative(path: str | Path, data_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(data_dir))
    except ValueError:
        return str(path)

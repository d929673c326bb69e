# `mailhub storage rebuild-index`: put the index back in line with the blob store, the hub stopped
# (it takes the data folder's lock). The blobs describe themselves (storage/envelope.py) and the
# ledger (storage/ledger.py) says which group commits committed and which mailbox entries and
# outbound recipients were removed since; so after an index restored from a backup, a lost WAL, or
# an index lost or damaged outright:
#   - every committed mail the index lacks is put back into the mailboxes of its sites (and the
#     outbound queue), except the entries and recipients the ledger says were removed;
#   - entries the index still has but the ledger says were removed go (deleted after the backup);
#   - rows whose blob is gone are moved to the quarantine (reported: mails deleted after the
#     backup whose files were freed, or lost);
#   - a site the index lacks (added after the backup, or the whole index lost) is made again from
#     the mails' records (receiving and sending sites, with the addresses the records show), with no
#     password (login impossible until `mailhub site passwd`);
#   - a committed mail whose bytes differ from its record's SHA-256 (bit rot) is not put back but
#     quarantined (`damaged_mail`: a file of its own is moved, a packed mail's frame copied), and so
#     is what has no readable record and no index row (`unreadable_record`): listed and counted,
#     never served as if whole, never deleted.
#   - the `damaged` table (mails found damaged while serving, by the scrub or by verify: refused to
#     clients) is made again from the quarantine's `damaged` entries, so that an older or lost index
#     does not serve them again.
# A mail is committed when its group commit is proven: a ledger commit line, a later record naming
# it as its predecessor, or the index itself; a single-file mail when a ledger commit line lists it.
# Unproven records (a commit cut short) are never put into a mailbox. Before changing anything, the
# index as it was is copied into the quarantine. Must never delete message bytes.
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import audit, db, envelope, events, ledger, sql, verify
from .blob_layout import MARKER, node_name_problem, shared_root
from .folder_lock import lock_data_folder
from .quarantine import list_entries, quarantine
from .recovery import HOUR_FOLDER, QUEUE_ID, RecoveryReport, _quarantine_rows
from .usage import rebuild_usage

log = logging.getLogger("mailhub.storage")
LOCKED_PASSWORD = "!"  # a password hash no password matches (sites made again by a rebuild)


@dataclass
class Candidate:
    """A mail found in the blob store."""

    blob: str
    offset: int
    size: int
    record: dict[str, Any]
    packed: bool
    frame: int = 0  # where its frame begins (a pack), or 0 (a file of its own)


@dataclass
class RebuildReport:
    base: str = ""  # which index the rebuild started from
    saved_index: str = ""  # where the index as it was was kept
    scanned_files: int = 0
    found: int = 0  # mails with a readable record
    restored: int = 0  # mails put back
    restored_entries: int = 0
    restored_outbound: int = 0
    removed_entries: int = 0  # entries the ledger says were removed after the index's time
    removed_outbound: int = 0
    all_removed: int = 0  # committed mails not in the index whose every entry was removed
    uncommitted: int = 0  # records of commits that never committed
    damaged: list[str] = field(default_factory=list)  # found, but their bytes differ from the record
    damaged_marked: int = 0  # rows of table `damaged` made again from the quarantine's records
    unreadable: list[str] = field(default_factory=list)  # files or ranges with no readable record
    sites_made: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # indexed mails whose blob is gone (quarantined)
    quarantined: list[str] = field(default_factory=list)  # damaged or unreadable, moved or copied aside
    notes: list[str] = field(default_factory=list)
    # (blob, frame offset, length, packed, reason, detail, queue ID) to move aside once committed
    aside: list[tuple[Any, ...]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "aside"}


def rebuild_index(data_dir: Path, base: Path | None = None) -> RebuildReport:
    """Rebuild or reconcile the index of a stopped hub (raises DataFolderInUse if one runs)."""
    data_dir = Path(data_dir).absolute()
    lock = lock_data_folder(data_dir)
    try:
        report = RebuildReport()
        conn = _open_base(data_dir, base, report)
        try:
            _reconcile(conn, data_dir, report)
        finally:
            conn.close()
        return report
    finally:
        os.close(lock)


# ---- the index to start from --------------------------------------------------------------------


def _index_files(data_dir: Path) -> list[Path]:
    path = db.index_path(data_dir)
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def _open_base(data_dir: Path, base: Path | None, report: RebuildReport) -> sqlite3.Connection:
    path = db.index_path(data_dir)
    damaged = None
    if base is None and path.exists():
        try:
            conn = db.connect(data_dir)
            db.check(conn)
        except db.IndexDamaged as exc:
            damaged = str(exc)
        else:
            report.saved_index = str(_save_copy(conn, data_dir))
            report.base = f"the index in place ({path})"
            return conn
    if path.exists() or _index_files(data_dir):
        entry = _move_aside(
            data_dir,
            "replaced_index" if damaged is None else "damaged_index",
            damaged or f"replaced by {base} for a rebuild",
        )
        report.saved_index = str(entry)
        if damaged is not None and base is None:
            if _salvage(entry / path.name, path):
                report.base = f"what sqlite3 .recover salvaged of the damaged index ({damaged})"
                report.notes.append(
                    "the index was damaged: rows sqlite3 could not read are lost (sites, limits,"
                    " keys and events among them may be missing)"
                )
            else:
                report.base = "an empty index (the damaged one could not be salvaged)"
    if base is not None:
        source = sqlite3.connect(f"{Path(base).resolve().as_uri()}?mode=ro", uri=True)
        try:
            target = sqlite3.connect(path)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
        report.base = f"the backup index {base}"
    elif not report.base:
        report.base = "an empty index (there was none)"
    conn = db.connect(data_dir)
    db.check(conn)
    return conn


def _save_copy(conn: sqlite3.Connection, data_dir: Path) -> Path:
    """The index as it is, copied into the quarantine before the rebuild changes it."""
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".rebuild-") as folder:
        copy = Path(folder) / db.INDEX_NAME
        conn.execute("VACUUM INTO ?", (str(copy),))
        return quarantine(
            data_dir,
            copy,
            "index_before_rebuild",
            "the index as it was before `mailhub storage rebuild-index` changed it",
            original=db.INDEX_NAME,
        )


def _move_aside(data_dir: Path, reason: str, detail: str) -> Path:
    """Move the index and its WAL files into one quarantine entry."""
    files = _index_files(data_dir)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".rebuild-") as folder:
        bundle = Path(folder) / "index"
        bundle.mkdir()
        for path in files:
            os.rename(path, bundle / path.name)
        return quarantine(data_dir, bundle, reason, detail, original=db.INDEX_NAME) / "index"


def _salvage(damaged: Path, target: Path) -> bool:
    """sqlite3's .recover of a damaged index into `target` (the sqlite3 command, when installed)."""
    tool = shutil.which("sqlite3")
    if tool is None:
        return False
    try:
        dump = subprocess.run([tool, str(damaged), ".recover"], capture_output=True, timeout=3600, check=True)
        subprocess.run([tool, str(target)], input=dump.stdout, capture_output=True, timeout=3600, check=True)
    except (subprocess.SubprocessError, OSError):
        for path in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
            path.unlink(missing_ok=True)
        return False
    return True


# ---- the reconciliation ---------------------------------------------------------------------------


def blob_files(blob_dir: Path, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(blob name, path) of every file the hub names in the blob store, in order; a shared blob
    folder (storage/blob_layout.py): of every node's folder, names '<node>/<hour>/<queue ID>'."""
    if not prefix and os.path.exists(os.path.join(blob_dir, MARKER)):
        for node in sorted(os.scandir(blob_dir), key=lambda e: e.name):
            if node.is_dir(follow_symlinks=False) and node_name_problem(node.name) is None:
                yield from blob_files(Path(node.path), f"{node.name}/")
        return
    for folder in sorted(os.scandir(blob_dir), key=lambda e: e.name):
        if not (folder.is_dir(follow_symlinks=False) and HOUR_FOLDER.match(folder.name)):
            continue
        for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False) and QUEUE_ID.match(entry.name):
                yield f"{prefix}{folder.name}/{entry.name}", entry.path


def prove(blob_dir: Path, report: RebuildReport, proven: set[tuple[int, int]]) -> None:
    """The first pass: count the mails and unreadable ranges, and add the group commits that later
    records name as their predecessor to `proven` (records are not kept: memory stays bounded by
    one file's records however large the store)."""
    for blob, path in blob_files(blob_dir):
        report.scanned_files += 1
        report.found += len(_read_file(blob, path, report, proven))


def _read_file(blob: str, path: str, report: RebuildReport, proven: set[tuple[int, int]]) -> list[Candidate]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        single = envelope.read_trailer(fd, size)
        if single is not None and single.record is not None:
            return [Candidate(blob, 0, single.size, single.record, False)]
        if not envelope.is_pack(fd):
            report.unreadable.append(f"{blob} (no envelope record: stored before records existed, or damaged)")
            report.aside.append(
                (
                    blob,
                    0,
                    size,
                    False,
                    "unreadable_record",
                    "a blob file without a readable envelope record (damaged, or stored before records existed)",
                    None,
                )
            )
            return []
        mails = []
        for found in envelope.frames(fd, 0, size):
            if found.record is None:
                report.unreadable.append(f"{blob} bytes {found.offset}..{found.offset + found.size}")
                report.aside.append(
                    (
                        blob,
                        found.offset,
                        found.size,
                        True,
                        "unreadable_record",
                        "bytes of a pack without a readable frame (damaged, or a write cut short)",
                        None,
                    )
                )
                continue
            prev = found.record.get("p")
            if isinstance(prev, list) and len(prev) == 2:
                proven.add((prev[0], prev[1]))
            mails.append(Candidate(blob, found.offset, found.size, found.record, True, found.frame_offset))
        return mails
    finally:
        os.close(fd)


def _reconcile(conn: sql.Connection, data_dir: Path, report: RebuildReport) -> None:
    blob_dir = data_dir / "blobs"
    root = shared_root(data_dir)  # a shared blob folder: every node's ledger (and blobs)
    state = ledger.read(data_dir, paths=ledger.every_nodes_files(root) if root is not None else None)
    seq, attempt = ledger.last_commit(conn)
    proven = set(state.commits.items()) | {(seq, attempt)}
    prove(blob_dir, report, proven)
    sites = _Sites(conn, report)
    conn.execute(sql.BEGIN_WRITE[sql.dialect(conn)])
    try:
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'ledger_quiet'")  # no removals of its own
        for blob, path in blob_files(blob_dir):  # the second pass, file by file
            for mail in _read_file(blob, path, RebuildReport(), set()):
                qid = mail.record["q"]
                if conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (qid,)).fetchone() is not None:
                    continue  # indexed (or restored from another copy already)
                if not _committed(conn, mail, state, proven):
                    report.uncommitted += 1
                    continue
                _restore(conn, blob_dir, mail, state, sites, report)
        _apply_removals(conn, state, report)
        top_seq = max([seq] + list(state.commits))
        if top_seq > seq:  # the index's last group commit is the ledger's (its line is there already)
            conn.execute(
                "INSERT INTO commits (seq, attempt, mails) VALUES (?, ?, '')", (top_seq, state.commits[top_seq])
            )
        conn.execute("DELETE FROM packs")
        conn.execute(
            "INSERT INTO packs (blob, committed_end) SELECT blob, max(blob_offset + size) FROM messages"
            " WHERE blob_offset > 0 GROUP BY blob"
        )
        _raise_uid_floor(conn, state.max_uid)
        report.damaged_marked = verify.damaged_rows_from_quarantine(conn, data_dir)
        conn.execute("UPDATE meta SET value = 0 WHERE key = 'ledger_quiet'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    _move_aside_unrestored(conn, data_dir, report)
    recovery = RecoveryReport()
    present = {row[0] for row in conn.execute("SELECT DISTINCT blob FROM messages")}
    for blob in sorted(present):
        path = blob_dir / blob
        end = conn.execute("SELECT max(blob_offset + size) FROM messages WHERE blob = ?", (blob,)).fetchone()[0]
        if not path.exists() or path.stat().st_size < end:
            report.missing.append(blob)
            _quarantine_rows(conn, data_dir, blob, recovery)
    report.notes.extend(recovery.skipped)
    rebuild_usage(conn)


def _move_aside_unrestored(conn: sql.Connection, data_dir: Path, report: RebuildReport) -> None:
    """Quarantine the damaged mails and unreadable ranges the scan found that no index row holds: a
    file of its own is moved, a range of a pack copied (the pack lives on). A range already in the
    quarantine (a rebuild run again) is not copied twice."""
    done = {(e.original, e.extra.get("offset"), e.reason) for e in list_entries(data_dir)}
    for blob, start, length, packed, reason, detail, qid in report.aside:
        if packed:
            held = conn.execute(
                "SELECT 1 FROM messages WHERE blob = ? AND blob_offset >= ? AND blob_offset < ?",
                (blob, start, start + length),
            ).fetchone()
        else:
            held = conn.execute("SELECT 1 FROM messages WHERE blob = ?", (blob,)).fetchone()
        if held is not None or (f"blobs/{blob}", start if packed else None, reason) in done:
            continue
        where = f"{blob} bytes {start}..{start + length}" if packed else blob
        try:
            quarantine(
                data_dir,
                data_dir / "blobs" / blob,
                reason,
                detail,
                byte_range=(start, length) if packed else None,
                queue_ids=[qid] if qid else [],
            )
        except OSError as exc:
            report.notes.append(f"could not move {where} to the quarantine: {exc}")
            continue
        report.quarantined.append(f"{where} ({reason}{', ' + qid if qid else ''})")


def _committed(conn: sql.Connection, mail: Candidate, state: ledger.LedgerState, proven: set[tuple[int, int]]) -> bool:
    if (
        conn.execute(
            "SELECT 1 FROM events WHERE queue_id = ? AND kind = ?", (mail.record["q"], events.ACCEPTED)
        ).fetchone()
        is not None
    ):
        return True  # the index's own tracking record says so
    if mail.record["q"] in state.left_out:  # its commit left it out: the sender got a 452
        return False
    if not mail.packed:
        return mail.record["q"] in state.file_mails
    return (mail.record.get("seq"), mail.record.get("a")) in proven


def _restore(
    conn: sql.Connection,
    blob_dir: Path,
    mail: Candidate,
    state: ledger.LedgerState,
    sites: "_Sites",
    report: RebuildReport,
) -> None:
    r = mail.record
    qid = r["q"]
    entries: list[tuple[int, str]] = []
    for site_id, rcpt, site_name in r.get("d", ()):
        if state.was_removed(qid, site_id, site_name):
            continue
        current = sites.find(site_name, site_id, rcpt)
        if current is not None and all(current != e[0] for e in entries):
            entries.append((current, rcpt))
    remote = [rcpt for rcpt in r.get("r", ()) if (qid, rcpt) not in state.outbound_done]
    if not entries and not remote:
        report.all_removed += 1
        return
    if verify.content_problem(blob_dir / mail.blob, mail.offset, mail.size, r.get("sha256")) is not None:
        report.damaged.append(f"{qid} in {mail.blob} at {mail.offset}")
        report.aside.append(
            (
                mail.blob,
                mail.frame,
                mail.offset + mail.size - mail.frame,
                mail.packed,
                "damaged_mail",
                "an acknowledged mail whose bytes differ from the SHA-256 of its"
                f" envelope record: not put back into {len(entries)} mailbox(es)"
                f" and {len(remote)} outbound recipient(s)",
                qid,
            )
        )
        return
    message_id, (set_id, set_part, set_total) = r.get("mid"), (r.get("set") or [None, None, None])
    # the sending site too (it may have no mail of its own); its envelope sender is one of its
    # addresses (SMTP refused others: SENDER_NOT_OWNED)
    sender = r.get("from") if "@" in str(r.get("from") or "") else None
    sender_site = sites.find(r.get("sn"), r.get("ss"), sender) if r.get("ss") is not None else None
    structure = None if r.get("st") is None else json.dumps(r["st"], separators=(",", ":"))
    at = float(r["at"])
    conn.execute(
        "INSERT INTO messages (queue_id, blob, blob_offset, size, sha256, dot_lines, received_at, mail_from,"
        " sender_site, message_id, set_id, set_part, set_total, refs, structure, crc32)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            qid,
            mail.blob,
            mail.offset,
            mail.size,
            r["sha256"],
            int(r.get("dots", 0)),
            at,
            r.get("from", ""),
            sender_site,
            message_id,
            set_id,
            set_part,
            set_total,
            len(entries) + len(remote),
            structure,
            r["crc"] if isinstance(r.get("crc"), int) else None,
        ),
    )
    conn.executemany(
        "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (?, ?, ?, ?)",
        [(site_id, qid, rcpt, at) for site_id, rcpt in entries],
    )
    conn.executemany(
        "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at) VALUES (?, ?, ?, ?)",
        [(qid, rcpt, at, time.time()) for rcpt in remote],
    )
    rows = [
        events.row(
            events.Event(
                at,
                events.ACCEPTED,
                qid,
                r.get("sn"),
                sender=r.get("from"),
                peer=r.get("peer"),
                size=mail.size,
                message_id=message_id,
                set_id=set_id,
                set_part=set_part,
                set_total=set_total,
                detail=r["sha256"],
            )
        )
    ]
    rows += [
        events.row(
            events.Event(
                at,
                events.DELIVERED,
                qid,
                sites.name(site_id),
                peer_site=r.get("sn"),
                rcpt=rcpt,
                size=mail.size,
                detail="restored by rebuild-index",
            )
        )
        for site_id, rcpt in entries
    ]
    conn.executemany(events.INSERT, rows)
    audit.record_rows(
        conn,
        [
            audit.row(
                audit.ACCEPTED,
                sites.name(site_id),
                qid,
                message_id,
                set_id,
                mail.size,
                r["sha256"],
                r.get("sn") or r.get("from") or None,
                "restored by rebuild-index",
                at,
            )
            for site_id, _rcpt in entries
        ],
    )
    report.restored += 1
    report.restored_entries += len(entries)
    report.restored_outbound += len(remote)


def _apply_removals(conn: sql.Connection, state: ledger.LedgerState, report: RebuildReport) -> None:
    for qid, site in state.removed:
        text = (
            "DELETE FROM mailbox WHERE queue_id = ? AND site_id = ?"
            if isinstance(site, int)
            else "DELETE FROM mailbox WHERE queue_id = ? AND site_id = (SELECT id FROM sites WHERE name = ?)"
        )
        report.removed_entries += conn.execute(text, (qid, site)).rowcount
    for qid, rcpt in state.outbound_done:
        report.removed_outbound += conn.execute(
            "DELETE FROM outbound WHERE queue_id = ? AND rcpt = ?", (qid, rcpt)
        ).rowcount


def _raise_uid_floor(conn: sql.Connection, max_uid: int) -> None:
    """New mailbox UIDs above every UID the ledger saw issued: an IMAP client that knew a UID from
    after the index's time never sees it reused for another mail. Never lowers the mark."""
    (current,) = conn.execute(sql.id_high_water(conn, "mailbox", "uid")).fetchone()
    if current >= max_uid:
        return
    if sql.dialect(conn) == sql.POSTGRESQL:  # the identity's sequence: the next UID is max_uid + 1
        conn.execute("SELECT setval(pg_get_serial_sequence('mailbox', 'uid'), ?)", (max_uid,))
    elif conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'mailbox'").fetchone() is None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('mailbox', ?)", (max_uid,))
    else:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'mailbox'", (max_uid,))


# an address a record shows, unless the index has it already (for this site or, kept, another)
_ADD_ADDRESS = "INSERT INTO addresses (address, site_id) VALUES (?, ?) ON CONFLICT (address) DO NOTHING"


class _Sites:
    """Sites by name (then id), made again from records when the index lacks them."""

    def __init__(self, conn: sql.Connection, report: RebuildReport):
        self.conn, self.report = conn, report
        self.by_name: dict[str, int] = {name: id_ for id_, name in conn.execute("SELECT id, name FROM sites")}
        self.names = {id_: name for name, id_ in self.by_name.items()}

    def name(self, site_id: int) -> str | None:
        return self.names.get(site_id)

    def find(self, name: str | None, site_id: int | None, rcpt: str | None) -> int | None:
        if name is None:
            return site_id if site_id in self.names else None
        if name in self.by_name:
            if rcpt and name in self.report.sites_made:  # a site made again gets every address it had
                self.conn.execute(_ADD_ADDRESS, (rcpt, self.by_name[name]))
            return self.by_name[name]
        new_id: int
        (new_id,) = self.conn.execute(
            "INSERT INTO sites (name, password_hash, created_at) VALUES (?, ?, ?) RETURNING id",
            (name, LOCKED_PASSWORD, time.time()),
        ).fetchone()
        self.by_name[name], self.names[new_id] = new_id, name
        if rcpt:
            self.conn.execute(_ADD_ADDRESS, (rcpt, new_id))
        self.report.sites_made.append(name)
        return new_id

# `mailhub storage check`: a read-only report on the storage of a data folder, beside a running
# hub or a stopped one: counts, the quarantine, and every mismatch between the index, the blob store
# and the ledger. `problems` lists what an operator must act on (each with the command that gets
# out of it); the command's exit status is non-zero when there is one. Must never write anything.
# A data folder that links into a shared blob folder (storage/blob_layout.py) is checked for its own
# node's part only: <root>/<node>/ and the index rows of blobs named '<node>/...'.
# A PostgreSQL index (storage.index) is read the same way; only SQLite's file check (quick_check)
# is left out: PostgreSQL's own pages are checked with its own tools (pg_amcheck).
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import blob_layout, db, ledger, quarantine, sql
from .errors import StorageError
from .folder_lock import LOCK_NAME
from .index import IndexLocation
from .recovery import HOUR_FOLDER, QUEUE_ID, SPOOL_FILE

IN_FLIGHT_SECONDS = 300  # beside a running hub, a file this young may belong to a transaction in flight


@dataclass
class CheckReport:
    data_dir: str
    hub_running: bool = False
    index_ok: bool = True
    messages: int = 0
    mailbox_entries: int = 0
    outbound: int = 0
    message_bytes: int = 0
    blob_files: int = 0
    packs: int = 0
    blob_bytes: int = 0
    commit_seq: int = 0
    ledger_seq: int = 0
    ledger_files: int = 0
    ledger_bytes: int = 0
    ledger_torn_lines: int = 0
    spool_files: int = 0
    missing_blobs: list[str] = field(default_factory=list)
    short_blobs: list[str] = field(default_factory=list)
    unindexed_files: list[str] = field(default_factory=list)
    uncommitted_tails: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    quarantine_entries: int = 0
    quarantine_bytes: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check(data_dir: Path, index_url: str = "") -> CheckReport:
    data_dir = Path(data_dir).absolute()
    index = IndexLocation(data_dir, index_url)
    report = CheckReport(str(data_dir), hub_running=_hub_running(data_dir))
    now = time.time()
    conn: sql.Connection | None
    try:
        conn = index.connect_readonly()
    except StorageError as exc:  # PostgreSQL unreachable (one line, no password)
        report.index_ok = False
        report.problems.append(f"{exc}: start the PostgreSQL server, or check storage.index")
        conn = None
    except (OSError, sqlite3.Error) as exc:
        report.index_ok = False
        report.problems.append(
            f"the index cannot be opened ({exc}): stop the hub and run `mailhub storage rebuild-index`"
        )
        conn = None
    if conn is not None:
        try:
            _check_index(conn, data_dir, report, now)
        except sqlite3.DatabaseError as exc:
            report.index_ok = False
            if index.is_postgresql:
                report.problems.append(f"the index at {index.where()} cannot be read: {exc}")
            else:
                report.problems.append(db.damaged_message(db.index_path(data_dir), exc))
        finally:
            conn.close()
    _check_ledger(data_dir, report)
    _check_quarantine(data_dir, report)
    return report


def _hub_running(data_dir: Path) -> bool:
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the lock if it was taken)
    return False


def _check_index(conn: sql.Connection, data_dir: Path, report: CheckReport, now: float) -> None:
    problems = (
        ["ok"] if sql.dialect(conn) == sql.POSTGRESQL else [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    )
    if problems != ["ok"]:
        report.index_ok = False
        report.problems.append(db.damaged_message(db.index_path(data_dir), "; ".join(problems)))
        return
    report.messages, report.message_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM messages"
    ).fetchone()
    report.mailbox_entries = conn.execute("SELECT count(*) FROM mailbox").fetchone()[0]
    report.outbound = conn.execute("SELECT count(*) FROM outbound").fetchone()[0]
    report.commit_seq, _attempt = ledger.last_commit(conn)
    node = blob_layout.own_node(data_dir)
    own = f"{node}/" if node else ""
    mine = (len(own), own)
    indexed = dict(
        conn.execute(
            "SELECT blob, max(blob_offset + size) FROM messages WHERE substr(blob, 1, ?) = ? GROUP BY blob", mine
        )
    )
    committed_end = dict(conn.execute("SELECT blob, committed_end FROM packs WHERE substr(blob, 1, ?) = ?", mine))
    trash = {b for (b,) in conn.execute("SELECT blob FROM blob_trash")}
    report.packs = len(committed_end)

    def young(mtime: float) -> bool:
        return report.hub_running and now - mtime < IN_FLIGHT_SECONDS

    blob_dir, on_disk = data_dir / "blobs" / own, set()
    for folder in _scandir(blob_dir):
        if own and folder.name in ("spool", "ledger", "mailhub.lock"):
            continue  # the node's own (storage/blob_layout.py)
        if not (folder.is_dir(follow_symlinks=False) and HOUR_FOLDER.match(folder.name)):
            report.strays.append(f"blobs/{own}{folder.name}")
            continue
        for entry in _scandir(folder.path):
            name = f"{own}{folder.name}/{entry.name}"
            if not (entry.is_file(follow_symlinks=False) and QUEUE_ID.match(entry.name)):
                report.strays.append(f"blobs/{name}")
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            report.blob_files += 1
            report.blob_bytes += st.st_blocks * 512
            if name in indexed:
                on_disk.add(name)
                if st.st_size < indexed[name]:
                    report.short_blobs.append(name)
                elif name in committed_end and st.st_size > committed_end[name] and not young(st.st_mtime):
                    report.uncommitted_tails.append(f"{name} bytes {committed_end[name]}..{st.st_size}")
            elif name not in trash and not young(st.st_mtime):
                report.unindexed_files.append(name)
    report.missing_blobs = sorted(set(indexed) - on_disk)
    for entry in _scandir(data_dir / "spool"):
        if entry.is_file(follow_symlinks=False) and SPOOL_FILE.match(entry.name):
            report.spool_files += 1
        elif not entry.name.startswith("healthz-"):
            report.strays.append(f"spool/{entry.name}")
    fix = "stop the hub and start it (start-up recovery moves them aside)"
    if report.missing_blobs:
        report.problems.append(
            f"{len(report.missing_blobs)} blob file(s) the index refers to are missing"
            f" (first: {report.missing_blobs[0]}): {fix}, or put them back and run"
            " `mailhub storage rebuild-index`"
        )
    if report.short_blobs:
        report.problems.append(
            f"{len(report.short_blobs)} blob file(s) are shorter than their indexed mails"
            f" (first: {report.short_blobs[0]}): {fix}"
        )
    if report.unindexed_files:
        report.problems.append(
            f"{len(report.unindexed_files)} blob file(s) no index row refers to (first:"
            f" {report.unindexed_files[0]}): run `mailhub storage rebuild-index` if the index"
            f" is older than the blobs, else {fix}"
        )
    if report.uncommitted_tails:
        report.problems.append(
            f"{len(report.uncommitted_tails)} pack(s) hold bytes past their committed end"
            f" (first: {report.uncommitted_tails[0]}): {fix}"
        )
    if not report.hub_running and report.spool_files:
        report.problems.append(f"{report.spool_files} spool file(s) left by an interrupted transaction: {fix}")
    if report.strays:
        report.problems.append(
            f"{len(report.strays)} stray file(s) or folder(s) in the hub's folders (first:"
            f" {report.strays[0]}): not the hub's; move them away"
        )


def _check_ledger(data_dir: Path, report: CheckReport) -> None:
    files = ledger.files(data_dir)
    report.ledger_files = len(files)
    report.ledger_bytes = sum(p.stat().st_size for p in files)
    state = ledger.read(data_dir, newest_only=True)
    report.ledger_seq, report.ledger_torn_lines = state.max_seq, state.torn
    if report.index_ok and state.max_seq > report.commit_seq:
        report.problems.append(
            f"the index is older than the blob store (group commit {report.commit_seq}, the"
            f" ledger says {state.max_seq}): stop the hub and run `mailhub storage rebuild-index`"
        )


def _check_quarantine(data_dir: Path, report: CheckReport) -> None:
    for entry in quarantine.list_entries(data_dir):
        report.quarantine_entries += 1
        report.quarantine_bytes += entry.size
        report.quarantine_reasons[entry.reason] = report.quarantine_reasons.get(entry.reason, 0) + 1


def _scandir(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []

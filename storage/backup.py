# `mailhub storage backup DEST`: a consistent copy of a hub's data folder, taken while it serves.
# Order, so that the copy's index never names a blob the copy lacks:
#   1. hard-link every single-file blob present (immutable once written: a link is a copy that
#      costs nothing; across file systems they are copied);
#   2. snapshot the index (VACUUM INTO, one read transaction: a consistent state);
#   3. link the single files the snapshot names that step 1 missed (committed meanwhile), copy
#      each pack's committed bytes (packs are appended to and have holes punched into them later,
#      so they are copied, never linked), and drop the step-1 links the snapshot does not name;
#   4. copy the ledger's lines up to the snapshot's state, and the other files of the folder
#      (hub keys); never the spool, the quarantine, the lock or the control socket.
# A mail committed and freed between steps 1 and 3 is named by the snapshot but gone: reported.
# Restoring: docs/storage.md. Reads the live folder only; must never write into it.
import errno
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import db, ledger
from .files import copy_range, fsync_dir, fsync_file
from .recovery import HOUR_FOLDER, QUEUE_ID

_SKIP = {
    "spool",
    "blobs",
    "ledger",
    "quarantine",
    "mailhub.lock",
    "control.sock",
    "reserve.space",
    db.INDEX_NAME,
    f"{db.INDEX_NAME}-wal",
    f"{db.INDEX_NAME}-shm",
    f"{db.INDEX_NAME}-journal",
}


class BackupError(Exception):
    pass


@dataclass
class BackupReport:
    dest: str = ""
    messages: int = 0
    mailbox_entries: int = 0
    linked_files: int = 0
    copied_files: int = 0
    copied_packs: int = 0
    bytes_copied: int = 0
    ledger_lines: int = 0
    other_files: int = 0
    gone: list[str] = field(default_factory=list)  # named by the snapshot, freed before they were copied
    seconds: float = 0.0


def backup(data_dir: Path, dest: Path) -> BackupReport:
    started = time.monotonic()
    data_dir, dest = Path(data_dir).absolute(), Path(dest).absolute()
    if not db.index_path(data_dir).is_file():
        raise BackupError(f"no index at {db.index_path(data_dir)}")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: give a new folder")
    if dest == data_dir or data_dir in dest.parents:
        raise BackupError(f"{dest} is inside the data folder {data_dir}")
    report = BackupReport(str(dest))
    (dest / "blobs").mkdir(parents=True, exist_ok=True)
    blob_dir, copy_dir = data_dir / "blobs", dest / "blobs"
    early = _link_single_files(blob_dir, copy_dir, report)
    snapshot = _snapshot(data_dir, dest)
    try:
        packs = dict(snapshot.execute("SELECT blob, committed_end FROM packs"))
        ends = dict(snapshot.execute("SELECT blob, max(blob_offset + size) FROM messages GROUP BY blob"))
        report.messages = snapshot.execute("SELECT count(*) FROM messages").fetchone()[0]
        report.mailbox_entries = snapshot.execute("SELECT count(*) FROM mailbox").fetchone()[0]
        seq, _attempt = ledger.last_commit(snapshot)
        removal = snapshot.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ledger_pending'), 0)"
        ).fetchone()[0]
    finally:
        snapshot.close()
    for blob, end in sorted(ends.items()):
        source, target = blob_dir / blob, copy_dir / blob
        try:
            if blob in packs or _is_pack(source):
                target.unlink(missing_ok=True)
                target.parent.mkdir(parents=True, exist_ok=True)  # shared: <node>/<hour>/
                report.bytes_copied += copy_range(source, target, 0, max(end, packs.get(blob, 0)))
                report.copied_packs += 1
            elif blob not in early:
                _link_or_copy(source, target, report)
        except FileNotFoundError:
            report.gone.append(blob)
    for blob in early - set(ends):
        (copy_dir / blob).unlink()  # in flight or freed at the snapshot's time
    for folder in copy_dir.iterdir():
        if not any(folder.iterdir()):
            folder.rmdir()
    report.ledger_lines = _copy_ledger(data_dir, dest, seq, removal)
    report.other_files = _copy_others(data_dir, dest)
    _fsync_tree(dest)
    report.seconds = time.monotonic() - started
    return report


def _link_single_files(blob_dir: Path, copy_dir: Path, report: BackupReport) -> set[str]:
    linked: set[str] = set()
    if not blob_dir.is_dir():  # a folder whose hub never started (sites added, no mail yet)
        return linked
    for folder in os.scandir(blob_dir):
        if not (folder.is_dir(follow_symlinks=False) and HOUR_FOLDER.match(folder.name)):
            continue
        for entry in os.scandir(folder.path):
            if not (entry.is_file(follow_symlinks=False) and QUEUE_ID.match(entry.name)):
                continue
            source = Path(entry.path)
            try:
                if _is_pack(source):
                    continue
                _link_or_copy(source, copy_dir / folder.name / entry.name, report)
            except FileNotFoundError:
                continue
            linked.add(f"{folder.name}/{entry.name}")
    return linked


def _is_pack(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"MHF1"


def _link_or_copy(source: Path, target: Path, report: BackupReport) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        report.linked_files += 1
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)
        report.copied_files += 1
        report.bytes_copied += target.stat().st_size


def _snapshot(data_dir: Path, dest: Path) -> sqlite3.Connection:
    live = db.connect_readonly(data_dir)
    try:
        live.execute("VACUUM INTO ?", (str(dest / db.INDEX_NAME),))
    finally:
        live.close()
    return sqlite3.connect(f"{(dest / db.INDEX_NAME).as_uri()}?mode=ro", uri=True)


def _copy_ledger(data_dir: Path, dest: Path, seq: int, removal: int) -> int:
    """The ledger's lines as of the snapshot: commits up to its seq, removals up to its last id."""
    lines = 0
    for path in ledger.files(data_dir):
        kept = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("c", 0) <= seq and doc.get("d", doc.get("o", 0)) <= removal:
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
        if kept:
            target = ledger.ledger_dir(dest) / path.name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"".join(kept))
            lines += len(kept)
    return lines


def _copy_others(data_dir: Path, dest: Path) -> int:
    count = 0
    for entry in os.scandir(data_dir):
        if entry.name in _SKIP or entry.name.startswith(".") or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.copytree(entry.path, dest / entry.name)
            count += sum(1 for p in (dest / entry.name).rglob("*") if p.is_file())
        elif entry.is_file():
            shutil.copy2(entry.path, dest / entry.name)
            count += 1
    return count


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)

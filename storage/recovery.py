# Start-up recovery: remove leftovers of interrupted transactions and check the index against
# the blob files. Runs before any listener opens. Must never remove a blob the index refers to.
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from .files import unlink_quietly

log = logging.getLogger("mailhub.storage")


@dataclass
class RecoveryReport:
    spool_removed: int = 0
    trash_removed: int = 0
    orphans_removed: int = 0
    missing_blobs: list[str] = field(default_factory=list)
    size_mismatches: list[str] = field(default_factory=list)

    def anything(self) -> bool:
        return bool(self.spool_removed or self.trash_removed or self.orphans_removed
                    or self.missing_blobs or self.size_mismatches)

    def __str__(self) -> str:
        return (f"{self.spool_removed} partial spool file(s) removed, {self.trash_removed} freed blob(s)"
                f" removed, {self.orphans_removed} uncommitted blob(s) removed, {len(self.missing_blobs)}"
                f" indexed blob(s) missing, {len(self.size_mismatches)} blob(s) shorter than indexed")


def recover(conn: sqlite3.Connection, spool_dir: Path, blob_dir: Path) -> RecoveryReport:
    report = RecoveryReport()
    for entry in os.scandir(spool_dir):
        os.unlink(entry.path)
        report.spool_removed += 1

    trash = [blob for (blob,) in conn.execute("SELECT blob FROM blob_trash")]
    for blob in trash:
        unlink_quietly(blob_dir / blob)
    conn.executemany("DELETE FROM blob_trash WHERE blob = ?", [(b,) for b in trash])
    report.trash_removed = len(trash)

    # a blob file holds one message, or a pack of several: it must reach the end of the last one
    indexed = dict(conn.execute("SELECT blob, max(blob_offset + size) FROM messages GROUP BY blob"))
    on_disk = set()
    for folder in os.scandir(blob_dir):
        if not folder.is_dir():
            continue
        files = list(os.scandir(folder.path))
        for entry in files:
            name = f"{folder.name}/{entry.name}"
            if name not in indexed:
                os.unlink(entry.path)
                report.orphans_removed += 1
                continue
            on_disk.add(name)
            if entry.stat().st_size < indexed[name]:
                report.size_mismatches.append(name)
        if all(f"{folder.name}/{e.name}" not in on_disk for e in files):
            _rmdir_if_empty(folder.path)
    report.missing_blobs = sorted(set(indexed) - on_disk)
    for blob in report.missing_blobs:
        log.error("index refers to missing blob %s", blob)
    for blob in report.size_mismatches:
        log.error("blob %s is shorter than its indexed message(s)", blob)
    return report


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass

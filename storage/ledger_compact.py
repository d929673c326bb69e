# Ledger compaction (`mailhub storage compact-ledger`): the ledger (storage/ledger.py) grows by a
# line per group commit and per removal for ever, and rebuild-index reads all of it. Most lines
# speak of mails whose bytes are gone (deleted by every receiver, their blob unlinked or their pack
# range released): no rebuild can find those mails again, so their lines say nothing any more.
# Compaction keeps what a rebuild needs about the mails the blob store still holds (read record by
# record, one file at a time, as rebuild-index's first pass does):
#   - removal lines ("d", "o") of those mails (so a rebuild does not bring a deleted entry back);
#   - their "f" (stored as a file of its own, committed) and "x" (left out) marks;
#   - the commit lines their records name ("seq", "a"), and the highest group commit;
#   - the highest mailbox UID issued.
# It writes them into one snapshot file, ledger/00000000.jsonl (sorted before every day's file),
# then removes the files it replaced: written to a temporary name, fsynced, renamed over the old
# snapshot, folder fsynced, and only then the old files unlinked. A crash at any point leaves either
# the old files, or the new snapshot beside some of the old files: the ledger is read as the union
# of its lines, so both are complete. With the hub running only the files of past UTC days are
# compacted (the index writer appends to today's); with the hub stopped (its lock held) all of them.
# Must never drop a line about a mail whose record is still in the blob store.
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import envelope, faults, ledger
from .files import fsync_dir
from .rebuild import blob_files

SNAPSHOT_NAME = "00000000.jsonl"
_TEMPORARY = ".compact.tmp"
_LOCK = ".compact.lock"


class CompactionRunning(OSError):
    """Another compaction holds the ledger folder's compaction lock."""


@dataclass
class CompactReport:
    files_before: int = 0
    lines_before: int = 0
    bytes_before: int = 0
    lines_after: int = 0
    bytes_after: int = 0
    mails_dropped: int = 0  # mails whose lines went (no record of theirs in the blob store)
    mails_kept: int = 0  # mails the lines speak of that the blob store still holds
    today_included: bool = False  # the hub was stopped: today's file was compacted too
    seconds: float = 0.0


def compact(data_dir: Path, include_today: bool) -> CompactReport:
    """Compact the ledger files of past UTC days (and today's with include_today: only with the
    hub stopped). Raises CompactionRunning, OSError."""
    started = time.monotonic()
    folder = ledger.ledger_dir(data_dir)
    report = CompactReport(today_included=include_today)
    if not folder.is_dir():
        return report
    lock = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionRunning(f"another `mailhub storage compact-ledger` is running on {folder}") from None
        today = time.strftime("%Y%m%d", time.gmtime()) + ".jsonl"
        inputs = [p for p in ledger.files(data_dir) if include_today or p.name < today]
        if not inputs:
            return report
        lines = _read(inputs, report)
        present, named_commits = _scan_blob_store(Path(data_dir) / "blobs", lines.mails)
        snapshot = _snapshot_lines(lines, present, named_commits)
        report.mails_kept = len(present)
        report.mails_dropped = len(lines.mails) - len(present)
        report.lines_after = len(snapshot)
        data = b"".join(json.dumps(doc, separators=(",", ":")).encode() + b"\n" for doc in snapshot)
        report.bytes_after = len(data)
        _replace(folder, inputs, data)
    finally:
        os.close(lock)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Lines:
    commits: dict[int, int]  # seq -> attempt
    file_mails: set[str]
    left_out: set[str]
    removals: list[dict[str, Any]]  # the "d" and "o" lines as read
    max_uid: int
    mails: set[str]  # every queue ID a line names


def _read(paths: list[Path], report: CompactReport) -> _Lines:
    found = _Lines({}, set(), set(), [], 0, set())
    for path in paths:
        report.files_before += 1
        report.bytes_before += path.stat().st_size
        with open(path, "rb") as f:
            for raw in f:
                try:
                    doc = json.loads(raw)
                    _note(doc, found)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue  # a torn line (a crash mid-write) says nothing
                report.lines_before += 1
    return found


def _note(doc: dict[str, Any], found: _Lines) -> None:
    if "c" in doc:
        found.commits[int(doc["c"])] = int(doc["a"])
        for key, marks in (("f", found.file_mails), ("x", found.left_out)):
            marks.update(map(str, doc.get(key, ())))
            found.mails.update(map(str, doc.get(key, ())))
    elif "d" in doc or "o" in doc:
        found.removals.append(doc)
        found.mails.add(str(doc["q"]))
        found.max_uid = max(found.max_uid, int(doc.get("u") or 0))
    elif "u" in doc:
        found.max_uid = max(found.max_uid, int(doc["u"]))
    else:
        raise KeyError("unknown ledger line")


def _scan_blob_store(blob_dir: Path, asked: set[str]) -> tuple[set[str], set[tuple[int, int]]]:
    """(the queue IDs of `asked` that have a record in the blob store, the (seq, attempt) of the
    group commits the store's packed records name: their own and their predecessor's)."""
    present: set[str] = set()
    commits: set[tuple[int, int]] = set()
    if not blob_dir.is_dir():
        return present, commits
    for _blob, path in blob_files(blob_dir):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # freed meanwhile (a running hub)
            continue
        try:
            size = os.fstat(fd).st_size
            single = envelope.read_trailer(fd, size)
            records = (
                [single.record]
                if single is not None and single.record is not None
                else (
                    [f.record for f in envelope.frames(fd, 0, size) if f.record is not None]
                    if envelope.is_pack(fd)
                    else []
                )
            )
        finally:
            os.close(fd)
        for record in records:
            if record["q"] in asked:
                present.add(record["q"])
            for seq, attempt in ((record.get("seq"), record.get("a")), tuple(record.get("p") or (None, None))):
                if isinstance(seq, int) and isinstance(attempt, int):
                    commits.add((seq, attempt))
    return present, commits


def _snapshot_lines(lines: _Lines, present: set[str], named_commits: set[tuple[int, int]]) -> list[dict[str, Any]]:
    now = round(time.time(), 3)
    docs = []
    top = max(lines.commits, default=None)
    for seq in sorted(lines.commits):
        attempt = lines.commits[seq]
        if seq != top and (seq, attempt) not in named_commits:
            continue
        doc = {"c": seq, "a": attempt, "f": [], "at": now}
        if seq == top:  # the marks of the mails still stored (rebuild reads them as one set)
            doc["f"] = sorted(lines.file_mails & present)
            left_out = sorted(lines.left_out & present)
            if left_out:
                doc["x"] = left_out
        docs.append(doc)
    docs.extend(doc for doc in lines.removals if str(doc["q"]) in present)
    docs.append({"u": lines.max_uid, "at": now})
    return docs


def _replace(folder: Path, inputs: list[Path], data: bytes) -> None:
    temporary = folder / _TEMPORARY
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    faults.hit("compact", "snapshot_written")
    os.replace(temporary, folder / SNAPSHOT_NAME)
    fsync_dir(folder)
    faults.hit("compact", "snapshot_renamed")
    for path in inputs:
        if path.name != SNAPSHOT_NAME:
            path.unlink(missing_ok=True)
            faults.hit("compact", "old_file_removed")
    fsync_dir(folder)

# Quarantine: where storage puts what it cannot explain or trust (a blob file without an index row,
# a damaged blob, leftovers of an interrupted transaction, a stray file) instead of deleting it.
# Each item gets an entry folder <data_dir>/quarantine/<YYYYMMDD>/<HHMMSS>-<n>-<what>/ holding a
# reason record (reason.json: original path, reason code, detail, time, size, any extra facts such
# as a queue ID) and the item itself under its own name, moved there by one rename (atomic on the
# same file system; across file systems it is copied, fsynced, and only then removed).
# Order: the record is written and fsynced first, then the item is moved; a crash between the two
# leaves an entry whose item is still at its original place (listed as "not moved"; the next
# start quarantines it again). A range of a file (one message of a pack) is copied, never cut out.
# Must never delete anything, and never import from relay/ or mailhub/.
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import copy_range, fsync_dir, fsync_file

QUARANTINE_DIR = "quarantine"
RECORD_NAME = "reason.json"
_MAX_NAME = 120  # characters of the original path kept in an entry folder's name


@dataclass
class QuarantineEntry:
    """One quarantined item, as `list_entries` finds it."""

    id: str  # '<YYYYMMDD>/<HHMMSS>-<n>-<what>' (relative to the quarantine folder)
    path: Path  # the entry folder
    original: str  # where the item was, relative to the data folder
    reason: str  # a short code: orphan_blob, missing_row, spool_leftover, damaged, stray...
    detail: str
    at: float
    size: int  # bytes of the item (a folder: of every file in it)
    moved: bool  # False: the item never arrived (crash between record and move)
    extra: dict[str, Any] = field(default_factory=dict)  # queue_id, sha256, offset... when known


def quarantine_dir(data_dir: Path) -> Path:
    return Path(data_dir) / QUARANTINE_DIR


def quarantine(
    data_dir: Path,
    item: Path,
    reason: str,
    detail: str = "",
    byte_range: tuple[int, int] | None = None,
    now: float | None = None,
    original: str | None = None,
    **extra: Any,
) -> Path:
    """Move the file or folder `item` (inside `data_dir`) into a new quarantine entry with a reason
    record; with `byte_range` (offset, size) copy only those bytes of the file and leave it in place.
    `original` names what it was when its path does not (a copy made for the quarantine). Returns
    the entry folder. Raises OSError (e.g. ENOSPC) with the item left where it was."""
    data_dir = Path(data_dir).absolute()
    item = Path(item).absolute()
    now = time.time() if now is None else now
    relative = _relative(item, data_dir)
    original = original or relative
    size = byte_range[1] if byte_range else _size(item)
    entry = _new_entry(quarantine_dir(data_dir), original, now)
    record = {
        "original": original,
        "reason": reason,
        "detail": detail,
        "at": now,
        "at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "size": size,
    }
    if byte_range is not None:
        record["offset"], record["length"] = byte_range
    record.update(extra)
    try:
        _write_durably(entry / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n")
        target = entry / (item.name if byte_range is None else f"{item.name}@{byte_range[0]}")
        if byte_range is not None:
            copy_range(item, target, *byte_range)
        else:
            _move(item, target)
        fsync_dir(entry)
    except OSError:
        _remove_if_unused(entry)
        raise
    return entry


def quarantine_data(
    data_dir: Path,
    name: str,
    data: bytes,
    original: str,
    reason: str,
    detail: str = "",
    now: float | None = None,
    **extra: Any,
) -> Path:
    """A new entry holding `data` as file `name` (e.g. index rows whose blob is gone), with its reason
    record; `original` says what it stood for. Returns the entry folder; raises OSError."""
    data_dir = Path(data_dir).absolute()
    now = time.time() if now is None else now
    entry = _new_entry(quarantine_dir(data_dir), original, now)
    record = {
        "original": original,
        "reason": reason,
        "detail": detail,
        "at": now,
        "at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "size": len(data),
    }
    record.update(extra)
    try:
        _write_durably(entry / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n")
        _write_durably(entry / name, data)
        fsync_dir(entry)
    except OSError:
        _remove_if_unused(entry, name)
        raise
    return entry


def list_entries(data_dir: Path) -> list[QuarantineEntry]:
    """Every quarantine entry, oldest first (an entry without a readable record is listed too)."""
    root = quarantine_dir(data_dir)
    entries: list[QuarantineEntry] = []
    if not root.is_dir():
        return entries
    for day in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder in sorted(p for p in day.iterdir() if p.is_dir()):
            entries.append(_read_entry(root, folder))
    entries.sort(key=lambda e: (e.at, e.id))
    return entries


def summary(data_dir: Path) -> tuple[int, int]:
    """(entries, bytes) in the quarantine: for metrics and `mailhub storage check`."""
    entries = list_entries(data_dir)
    return len(entries), sum(e.size for e in entries)


# ---- helpers ----------------------------------------------------------------------------------


def _relative(item: Path, data_dir: Path) -> str:
    try:
        return str(item.relative_to(data_dir))
    except ValueError:
        raise ValueError(f"{item} is not inside the data folder {data_dir}") from None


def _size(item: Path) -> int:
    if item.is_dir() and not item.is_symlink():
        return sum(p.stat().st_size for p in item.rglob("*") if p.is_file() and not p.is_symlink())
    return item.lstat().st_size


def _new_entry(root: Path, original: str, now: float) -> Path:
    day = root / time.strftime("%Y%m%d", time.gmtime(now))
    new_day = not day.is_dir()
    day.mkdir(parents=True, exist_ok=True, mode=0o750)
    if new_day:
        fsync_dir(day.parent)
    what = "".join(c if c.isalnum() or c in "-_." else "_" for c in original)[-_MAX_NAME:]
    stamp = time.strftime("%H%M%S", time.gmtime(now))
    for n in range(1, 1_000_000):
        entry = day / f"{stamp}-{n}-{what}"
        try:
            entry.mkdir(mode=0o750)
        except FileExistsError:
            continue
        fsync_dir(day)
        return entry
    raise OSError(errno.EEXIST, "no free quarantine entry name", str(day))


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def _move(item: Path, target: Path) -> None:
    try:
        os.rename(item, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(item, target)
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)  # only once the copy is durable: a move, not a deletion
        else:
            os.unlink(item)
    fsync_dir(item.parent)


def _copy_across(item: Path, target: Path) -> None:
    if item.is_dir() and not item.is_symlink():
        shutil.copytree(item, target, symlinks=True)
        for path in [target, *target.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
            elif path.is_dir():
                fsync_dir(path)
    else:
        shutil.copy2(item, target, follow_symlinks=False)
        if not target.is_symlink():
            fsync_file(target)


def _remove_if_unused(entry: Path, *own: str) -> None:
    """A failed quarantine leaves no entry behind (only files it wrote itself, never the item)."""
    for base in (RECORD_NAME, *own):
        for name in (base, base + ".tmp"):
            try:
                os.unlink(entry / name)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(entry)
    except OSError:
        pass


def _read_entry(root: Path, folder: Path) -> QuarantineEntry:
    entry_id = f"{folder.parent.name}/{folder.name}"
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        record = {"reason": "unknown", "detail": "no readable reason record"}
    items = [p for p in folder.iterdir() if p.name not in (RECORD_NAME, RECORD_NAME + ".tmp")]
    known = {"original", "reason", "detail", "at", "at_utc", "size"}
    try:
        at = float(record.get("at", folder.stat().st_mtime))
    except (TypeError, ValueError):
        at = folder.stat().st_mtime
    return QuarantineEntry(
        id=entry_id,
        path=folder,
        original=str(record.get("original", "?")),
        reason=str(record.get("reason", "unknown")),
        detail=str(record.get("detail", "")),
        at=at,
        size=int(record.get("size", 0)) if str(record.get("size", 0)).isdigit() else 0,
        moved=bool(items),
        extra={k: v for k, v in record.items() if k not in known},
    )

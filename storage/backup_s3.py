# Offsite backup to S3-compatible object storage: `mailhub storage backup s3://BUCKET/PREFIX` and
# `mailhub storage restore s3://BUCKET/PREFIX DEST`.
# Backup: the consistent copy of storage/backup.py is made into a temporary folder beside the data
# folder (same file system: the blob files are hard links, free), each of its files is uploaded
# (streamed, multipart above s3.part_size), its object's size checked with a HEAD, and a manifest
# (MANIFEST.jsonl: path, size, SHA-256 of each file) is uploaded last; then the temporary folder is
# removed. A backup without its manifest is unfinished (interrupted): restore refuses it.
# Restore: downloads every file the manifest names into a new folder, checks each one's size and
# SHA-256, fsyncs them; the folder is a data folder `mailhub storage check` accepts. A failed backup
# deletes what it uploaded (as far as the store lets it); a failed restore leaves DEST empty.
# Must never write into the live data folder, upload over an existing backup, or write outside
# DEST whatever the manifest says (a hostile or damaged manifest is refused).
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .backup import BackupError, backup
from .files import fsync_dir, fsync_file
from .s3 import S3Client, S3Error, S3Location, S3Settings

MANIFEST = "MANIFEST.jsonl"
MAX_MANIFEST_LINE = 64 * 1024
MAX_MANIFEST = 1 << 30  # bytes: millions of files' lines
_SAFE_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class BackupInterrupted(BackupError):
    """Ctrl-C or SIGTERM during the upload; the message says what was removed or is left."""


@dataclass
class TransferReport:
    location: str
    files: int = 0
    bytes: int = 0
    multipart: int = 0  # files sent or stored in several parts
    seconds: float = 0.0  # the transfer alone
    messages: int = 0  # backup: mails in the snapshot
    gone: int = 0  # backup: mails freed while the local copy was made
    local_seconds: float = 0.0  # backup: the local consistent copy

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-6)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1)}


def backup_to_s3(data_dir: Path, location: S3Location, settings: S3Settings) -> TransferReport:
    """A consistent backup of `data_dir` uploaded under `location` (which must hold nothing yet)."""
    data_dir = Path(data_dir).absolute()
    client = S3Client(settings)
    asyncio.run(_refuse_non_empty(client, location))
    work = _work_folder(data_dir)
    try:
        copy = work / "backup"
        local = backup(data_dir, copy)
        _refuse_unrestorable(copy, data_dir)
        report = TransferReport(str(location), messages=local.messages, gone=len(local.gone))
        report.local_seconds = local.seconds
        try:
            asyncio.run(_upload(client, location, copy, work / MANIFEST, report))
        except (S3Error, BackupError, OSError) as exc:
            raise BackupError(f"{exc}; {asyncio.run(_remove_partial(client, location))}") from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the CLI maps it: what was uploaded goes
            raise BackupInterrupted(f"interrupted; {asyncio.run(_remove_partial(client, location))}") from None
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restore_from_s3(location: S3Location, settings: S3Settings, dest: Path) -> TransferReport:
    """Download the backup at `location` into `dest` (a new or empty folder), every file checked."""
    dest = Path(dest).absolute()
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: give a new folder")
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    report = TransferReport(str(location))
    try:
        asyncio.run(_download(S3Client(settings), location, dest, report))
    except BaseException:  # DEST left as it was: no half restore to be taken for a whole one
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for entry in dest.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        raise
    return report


def _work_folder(data_dir: Path) -> Path:
    """A temporary folder beside the data folder (same file system: links instead of copies), named
    with this process's id; those of backups that died (SIGKILL, a crash) are removed first: their
    hard links would keep mails deleted since on the disk for ever."""
    for parent, prefix in ((data_dir.parent, f".{data_dir.name}-s3-backup-"), (None, "mailhub-s3-backup-")):
        for stale in Path(parent or tempfile.gettempdir()).glob(f"{prefix}*-*"):
            pid = stale.name[len(prefix) :].partition("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-s3-backup-{os.getpid()}-", dir=data_dir.parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"mailhub-s3-backup-{os.getpid()}-"))  # copies instead of links


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _refuse_unrestorable(copy: Path, data_dir: Path) -> None:
    """Refuse, before anything is uploaded, a file whose name restore would refuse (_entry): a
    backup that cannot be restored is found out now, not on the day it is needed."""
    for path in _files(copy):
        relative = path.relative_to(copy).as_posix()
        if not _SAFE_PATH.fullmatch(relative):
            raise BackupError(
                f"{data_dir / relative}: a name restore would refuse (letters A-Z a-z, digits and . _ - only):"
                " rename it or move it out of the data folder; nothing was uploaded"
            )


async def _refuse_non_empty(client: S3Client, location: S3Location) -> None:
    async for found in client.list_objects(location.bucket, location.key(""), page_size=1):
        raise BackupError(f"{location} already holds objects ({found.key}): give a new prefix")


async def _upload(client: S3Client, location: S3Location, folder: Path, manifest: Path, report: TransferReport) -> None:
    started = time.monotonic()
    with open(manifest, "w", encoding="utf-8") as lines:
        for path in _files(folder):
            relative = path.relative_to(folder).as_posix()
            key = location.key(relative)
            result = await client.put_file(location.bucket, key, path)
            size = path.stat().st_size
            stored = await client.head(location.bucket, key)
            if result.size != size or stored is None or stored.size != size:
                raise BackupError(
                    f"{location}: {relative} was {size} bytes here, the store has"
                    f" {'no object' if stored is None else f'{stored.size} bytes'}: the backup is unfinished"
                )
            lines.write(json.dumps({"path": relative, "size": size, "sha256": result.sha256}) + "\n")
            report.files += 1
            report.bytes += size
            report.multipart += result.parts > 0
    result = await client.put_file(location.bucket, location.key(MANIFEST), manifest)
    stored = await client.head(location.bucket, location.key(MANIFEST))
    if stored is None or stored.size != result.size:
        raise BackupError(f"{location}: the manifest did not arrive whole: the backup is unfinished")
    report.seconds = time.monotonic() - started


async def _remove_partial(client: S3Client, location: S3Location) -> str:
    """Delete what a failed backup uploaded (the prefix held nothing before it), multipart uploads
    left pending by an interruption included; what was done."""
    removed = aborted = 0
    try:
        async for found in client.list_objects(location.bucket, location.key("")):
            await client.delete(location.bucket, found.key)
            removed += 1
        for key, upload_id in await client.pending_uploads(location.bucket, location.key("")):
            await client.abort_upload(location.bucket, key, upload_id)
            aborted += 1
    except S3Error as exc:
        return (
            f"the {removed} object(s) removed of what it uploaded, not the rest ({exc}): {location} holds an"
            " unfinished backup (no manifest, restore refuses it); delete it or give another prefix"
            " (e.g. `aws s3 rm --recursive`; pending multipart uploads: `aws s3api list-multipart-uploads`)"
        )
    pending = f", {aborted} unfinished upload(s) aborted" if aborted else ""
    return f"the {removed} object(s) it had uploaded to {location} were removed{pending}"


def _files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += [Path(root) / name for name in sorted(names)]
    return found


async def _download(client: S3Client, location: S3Location, dest: Path, report: TransferReport) -> None:
    started = time.monotonic()
    manifest = dest / f".{MANIFEST}.partial"
    try:
        await client.get_file(location.bucket, location.key(MANIFEST), manifest, MAX_MANIFEST)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NotFound"):
            raise BackupError(
                f"no finished backup at {location}: {MANIFEST} is missing (an interrupted backup, or a wrong prefix)"
            ) from None
        raise
    folders: set[Path] = {dest}
    try:
        with open(manifest, "rb") as lines:
            while line := lines.readline(MAX_MANIFEST_LINE + 1):
                relative, size, sha256 = _entry(line, location)
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                folders.add(target.parent)
                try:  # never more than the manifest's size: a hostile store cannot fill the disk
                    got, digest = await client.get_file(location.bucket, location.key(relative), target, size)
                except S3Error as exc:
                    if exc.code != "too_large":
                        raise
                    raise BackupError(
                        f"{location}: {relative} is larger than the manifest's {size} bytes: the backup is damaged"
                    ) from None
                if got != size or digest != sha256:
                    raise BackupError(
                        f"{location}: {relative} differs from the manifest ({got} bytes, SHA-256 {digest[:12]}...;"
                        f" expected {size} bytes, {sha256[:12]}...): the backup is damaged"
                    )
                report.files += 1
                report.bytes += got
                report.multipart += got > client.settings.part_size
    finally:
        manifest.unlink(missing_ok=True)
    for root, _dirs, names in os.walk(dest):
        for name in names:
            fsync_file(os.path.join(root, name))
    for folder in folders:
        fsync_dir(folder)
    report.seconds = time.monotonic() - started


def _entry(line: bytes, location: S3Location) -> tuple[str, int, str]:
    """(relative path, size, sha256) of one manifest line, refused unless plainly safe."""
    try:
        if len(line) > MAX_MANIFEST_LINE:
            raise ValueError("line too long")
        doc = json.loads(line)
        relative, size, sha256 = doc["path"], doc["size"], doc["sha256"]
        if not (isinstance(relative, str) and _SAFE_PATH.fullmatch(relative)) or ".." in relative.split("/"):
            raise ValueError(f"unsafe path {relative!r}"[:120])
        if (
            not isinstance(size, int)
            or size < 0
            or not (isinstance(sha256, str) and re.fullmatch("[0-9a-f]{64}", sha256))
        ):
            raise ValueError("bad size or sha256")
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{location}: a line of {MANIFEST} is not valid ({exc}): refused") from None
    return relative, size, sha256

# `mailhub storage check` and `storage verify` with the mail on object storage (storage.blobs =
# "s3://BUCKET/PREFIX"). check:
# every index row's object is asked for (HEAD, a bounded number at once) and must be there with at
# least the row's message bytes and a trailer; the objects under the prefix that no index row names
# are listed as orphans (REPORTED only: one may be a commit in flight, or freed mail not deleted yet).
# Memory stays bounded on any index: the rows are read a page at a time (keyset on the queue ID), the
# listing is matched against the index a page at a time. Must never write to the index or the store,
# verify downloads each row's object (streamed into a SHA-256, a few at once, at most `rate` bytes a
# second) and names those whose message bytes are not the ones recorded at ingest; the CLI has them
# marked damaged as in the folder mode (storage/verify.py). Must never write to the index or the
# store, nor read or fill the node's cache (blobs/ there holds only some of the mail).
import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import envelope, sql
from .s3 import S3Client, S3Error, S3Location

PAGE = 500  # index rows (and listed objects) handled per round
CONCURRENCY = 16  # HEAD requests in flight at most
DOWNLOADS = 4  # verify's downloads in flight at most
MAX_LISTED = 1000  # missing objects and orphans named in the report at most (all are counted)
PROGRESS_EVERY = 5.0  # seconds between progress lines


@dataclass
class ObjectCheckReport:
    location: str
    messages: int = 0  # index rows whose object was asked for
    message_bytes: int = 0
    objects: int = 0  # objects listed under the prefix
    object_bytes: int = 0
    missing: int = 0
    short: int = 0
    orphans: int = 0
    problems: list[str] = field(default_factory=list)  # missing or short objects (exit status 1)
    orphan_keys: list[str] = field(default_factory=list)  # report only

    def as_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "messages": self.messages,
            "message_bytes": self.message_bytes,
            "objects": self.objects,
            "object_bytes": self.object_bytes,
            "missing": self.missing,
            "short": self.short,
            "orphans": self.orphans,
            "orphan_keys": self.orphan_keys,
            "problems": self.problems,
        }


def index_rows(conn: sql.Connection, page: int = PAGE) -> Iterator[list[tuple[str, str, int]]]:
    """The index's mails (queue ID, blob, bytes the object must hold at least) a page at a time."""
    after = ""
    while True:
        rows = conn.execute(
            "SELECT queue_id, blob, blob_offset + size FROM messages WHERE queue_id > ? ORDER BY queue_id LIMIT ?",
            (after, page),
        ).fetchall()
        if not rows:
            return
        yield [(str(q), str(b), int(n)) for q, b, n in rows]
        after = rows[-1][0]


def _indexed(conn: sql.Connection, blobs: list[str]) -> set[str]:
    """Which of `blobs` an index row names, or the blob trash still holds (freed, its object not
    deleted yet)."""
    if not blobs:
        return set()
    marks = ",".join("?" * len(blobs))
    found = {b for (b,) in conn.execute(f"SELECT DISTINCT blob FROM messages WHERE blob IN ({marks})", blobs)}
    return found | {b for (b,) in conn.execute(f"SELECT blob FROM blob_trash WHERE blob IN ({marks})", blobs)}


def _still_indexed(conn: sql.Connection, queue_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone() is not None


async def check_objects(
    conn: sql.Connection,
    client: S3Client,
    location: S3Location,
    progress: Callable[[str], None] | None = None,
    concurrency: int = CONCURRENCY,
    clock: Callable[[], float] = time.monotonic,
) -> ObjectCheckReport:
    report = ObjectCheckReport(str(location))
    gate = asyncio.Semaphore(concurrency)
    last = clock()

    def tell(force: bool = False) -> None:
        nonlocal last
        if progress is not None and (force or clock() - last >= PROGRESS_EVERY):
            last = clock()
            progress(f"{report.messages} mail(s) checked, {report.missing} missing, {report.short} short")

    async def head(row: tuple[str, str, int]) -> tuple[tuple[str, str, int], int | None]:
        async with gate:
            info = await client.head(location.bucket, location.key(row[1]))
        return row, None if info is None else info.size

    for rows in index_rows(conn):
        for (queue_id, blob, needed), size in await asyncio.gather(*(head(row) for row in rows)):
            report.messages += 1
            report.message_bytes += needed
            if size is None and not _still_indexed(conn, queue_id):
                continue  # freed while the check ran: its object goes after its row
            if size is None:
                report.missing += 1
                problem = f"mail {queue_id}: object {location.bucket}/{location.key(blob)} missing"
            elif size < needed + envelope.HEADER_SIZE:
                report.short += 1
                problem = (
                    f"mail {queue_id}: object {location.bucket}/{location.key(blob)} has {size} bytes,"
                    f" fewer than its {needed} message bytes and trailer"
                )
            else:
                continue
            if len(report.problems) < MAX_LISTED:
                report.problems.append(problem)
        tell()
    tell(force=True)

    strip = len(location.key(""))
    page: list[str] = []

    def match() -> None:
        known = _indexed(conn, page)
        for blob in page:
            if blob not in known:
                report.orphans += 1
                if len(report.orphan_keys) < MAX_LISTED:
                    report.orphan_keys.append(f"{location.bucket}/{location.key(blob)}")
        page.clear()

    async for info in client.list_objects(location.bucket, location.key("")):
        report.objects += 1
        report.object_bytes += info.size
        page.append(info.key[strip:])
        if len(page) >= PAGE:
            match()
    match()
    if len(report.problems) < report.missing + report.short:
        report.problems.append(f"... and {report.missing + report.short - len(report.problems)} more")
    return report


def rows_to_verify(
    conn: sql.Connection, site_id: int | None = None, page: int = PAGE
) -> Iterator[list[tuple[str, str, int, int, str]]]:
    """(queue ID, blob, offset, size, SHA-256) of every stored mail, or of one site's mailbox, in
    queue ID order, a page at a time."""
    columns = "m.queue_id, m.blob, m.blob_offset, m.size, m.sha256"
    after = ""
    while True:
        if site_id is None:
            rows = conn.execute(
                f"SELECT {columns} FROM messages m WHERE m.queue_id > ? ORDER BY m.queue_id LIMIT ?", (after, page)
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT DISTINCT {columns} FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id"
                " WHERE b.site_id = ? AND m.queue_id > ? ORDER BY m.queue_id LIMIT ?",
                (site_id, after, page),
            ).fetchall()
        if not rows:
            return
        yield [(str(q), str(b), int(o), int(n), str(h)) for q, b, o, n, h in rows]
        after = rows[-1][0]


class AsyncPacer:
    """storage.verify.Pacer for coroutines: at most `rate` bytes a second (0: as fast as it goes)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._start = clock()
        self._bytes = 0

    async def wait(self, count: int) -> None:
        if self.rate <= 0:
            return
        self._bytes += count
        ahead = self._bytes / self.rate - (self._clock() - self._start)
        if ahead > 0:
            await asyncio.sleep(ahead)
        elif ahead < -1.0:  # idle for a while: no burst to catch up
            self._start, self._bytes = self._clock(), 0


async def object_problem(
    client: S3Client, location: S3Location, blob: str, offset: int, size: int, sha256: str, pacer: AsyncPacer
) -> str | None:
    """Why the object of a mail does not hold the bytes acknowledged (missing, short, another
    SHA-256), or None. Streamed: a chunk at a time into the digest, nothing kept."""
    digest = hashlib.sha256()
    seen = 0
    end = offset + size

    async def sink(data: bytes) -> None:
        nonlocal seen
        start, seen = seen, seen + len(data)
        if start < end and seen > offset:
            digest.update(data[max(0, offset - start) : end - start])
        if seen > end + envelope.MAX_RECORD + envelope.HEADER_SIZE:
            raise S3Error(f"GET {location.bucket}/{location.key(blob)}: larger than its mail", 200, "too_large")
        await pacer.wait(len(data))

    try:
        await client.get(location.bucket, location.key(blob), sink)
    except S3Error as exc:
        if exc.status == 404:
            return "object missing from the object store"
        if exc.code == "too_large":
            return "object larger than its mail, envelope and trailer"
        raise
    if seen < end + envelope.HEADER_SIZE:
        return f"object cut short ({seen} bytes for a mail of {size} bytes and its trailer)"
    if digest.hexdigest() != sha256:
        return "SHA-256 differs from the one recorded at ingest"
    return None


async def verify_objects(
    conn: sql.Connection,
    client: S3Client,
    location: S3Location,
    found: Callable[[str, int, str | None], None],
    site_id: int | None = None,
    rate: float = 0,
    downloads: int = DOWNLOADS,
) -> None:
    """Each mail's object checked (object_problem); found(queue ID, size, problem or None) called for
    each in queue ID order. A mail deleted while it was read is no damage (None)."""
    gate = asyncio.Semaphore(downloads)
    pacer = AsyncPacer(rate)

    async def one(row: tuple[str, str, int, int, str]) -> str | None:
        async with gate:
            return await object_problem(client, location, *row[1:], pacer)

    for rows in rows_to_verify(conn, site_id, page=max(downloads * 4, 1)):
        for row, problem in zip(rows, await asyncio.gather(*(one(row) for row in rows)), strict=True):
            if problem is not None and not _still_indexed(conn, row[0]):
                problem = None
            found(row[0], row[3], problem)

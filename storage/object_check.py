# `mailhub storage check` with the mail on object storage (storage.blobs = "s3://BUCKET/PREFIX"):
# every index row's object is asked for (HEAD, a bounded number at once) and must be there with at
# least the row's message bytes and a trailer; the objects under the prefix that no index row names
# are listed as orphans (REPORTED only: one may be a commit in flight, or freed mail not deleted yet).
# Memory stays bounded on any index: the rows are read a page at a time (keyset on the queue ID), the
# listing is matched against the index a page at a time. Must never write to the index or the store,
# nor read the node's cache (blobs/ there holds only some of the mail).
import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import envelope, sql
from .s3 import S3Client, S3Location

PAGE = 500  # index rows (and listed objects) handled per round
CONCURRENCY = 16  # HEAD requests in flight at most
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

# API: record(conn, event, site, queue_id, message_id, study_id, size, sha256, actor, detail=None, at=None)
#      in the caller's transaction; record_entries(conn, event, site_id, uids, actor, detail, at) for
#      mailbox entries before they go; query(conn, site=, study=, since=, until=, ...) -> [AuditRecord]
#      (records(...): the same, one by one in bounded memory);
#      prune(conn, before). In the running hub: Storage.audit(...) and Storage.remove_entries(...).
# The audit trail (issue 25): an append-only record of what happened to each mail in a site's mailbox,
# for the medical record: who received, fetched, expired, deleted, exported or returned what, and
# when. One row per event with the mailbox's site (by name, so that the row outlives the site and the
# mail), queue ID, Message-ID, study (X-TELEMEDICINE-SETID), size, SHA-256 and who did it (the actor:
# the sending site, the site itself, "hub", or the operator's user name). The schema refuses UPDATE
# and any DELETE other than pruning past the retention (events.audit_retention_days).
# Must never: hold message content (no header but Message-ID, no body), or be written outside the
# transaction that changes the state it describes.
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from . import db, sql

ACCEPTED = "accepted"  # delivered into the site's mailbox; actor: the sending site (or envelope sender)
FETCHED = "fetched"  # downloaded whole by the site (POP3 RETR, IMAP body fetch); actor: the site
DELETED_BY_SITE = "deleted_by_site"  # removed by the site (POP3 DELE + QUIT, IMAP EXPUNGE); actor: the site
EXPIRED = "expired"  # removed because not fetched within the retention time; actor: "hub"
DELETED_BY_OPERATOR = "deleted_by_operator"  # `mailhub mailbox delete`, `mailhub site remove`; actor: operator
EXPORTED = "exported"  # raw bytes copied out by `mailhub mailbox export`; actor: operator
RETURNED = "returned"  # removed and the sender notified (`mailhub mailbox return`); actor: operator
EVENTS = (ACCEPTED, FETCHED, DELETED_BY_SITE, EXPIRED, DELETED_BY_OPERATOR, EXPORTED, RETURNED)
HUB_ACTOR = "hub"  # the actor of what the hub does on its own (expiry)
PRUNE_BATCH = 5000  # rows per pruning transaction: short enough not to hold up the writer
MAX_TEXT = 300  # characters kept of any text column (Message-ID, actor, detail: client-controlled)

COLUMNS = ("at", "event", "site", "queue_id", "message_id", "study_id", "size", "sha256", "actor", "detail")
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# Rows for mailbox entries that still exist (before they are removed): everything from the index.
_ENTRY_ROWS = (
    "INSERT INTO audit (at, event, site, queue_id, message_id, study_id, size, sha256, actor, detail)"
    " SELECT ?, ?, s.name, m.queue_id, m.message_id, m.set_id, m.size, m.sha256, coalesce(?, s.name), ?"
    " FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id JOIN sites s ON s.id = b.site_id"
    " WHERE b.site_id = ? AND b.uid = ?"
)
# A row for a stored message and a site given by id (a download: the entry may be gone by then)
_MESSAGE_ROW = (
    "INSERT INTO audit (at, event, site, queue_id, message_id, study_id, size, sha256, actor, detail)"
    " SELECT ?, ?, (SELECT name FROM sites WHERE id = ?), m.queue_id, m.message_id, m.set_id, m.size,"
    " m.sha256, coalesce(?, (SELECT name FROM sites WHERE id = ?)), ? FROM messages m WHERE m.queue_id = ?"
)


@dataclass(slots=True)
class AuditRecord:
    """One row of the audit trail (what `mailhub audit` shows and exports)."""

    id: int
    at: float
    event: str
    site: str | None
    queue_id: str | None
    message_id: str | None
    study_id: str | None
    size: int | None
    sha256: str | None
    actor: str | None
    detail: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: str | None) -> str | None:
    return None if value is None else value[:MAX_TEXT]


def row(
    event: str,
    site: str | None,
    queue_id: str | None,
    message_id: str | None,
    study_id: str | None,
    size: int | None,
    sha256: str | None,
    actor: str | None,
    detail: str | None = None,
    at: float | None = None,
) -> tuple[Any, ...]:
    """The values of one audit row (COLUMNS order); `event` is one of EVENTS."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r} (known: {', '.join(EVENTS)})")
    return (
        time.time() if at is None else at,
        event,
        site,
        queue_id,
        _text(message_id),
        _text(study_id),
        size,
        sha256,
        _text(actor),
        _text(detail),
    )


def record(
    conn: sql.Connection,
    event: str,
    site: str | None,
    queue_id: str | None,
    message_id: str | None,
    study_id: str | None,
    size: int | None,
    sha256: str | None,
    actor: str | None,
    detail: str | None = None,
    at: float | None = None,
) -> None:
    """Append one audit row (in the caller's transaction, if any)."""
    conn.execute(_INSERT, row(event, site, queue_id, message_id, study_id, size, sha256, actor, detail, at))


def record_rows(conn: sql.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Append rows made by row() (in the caller's transaction)."""
    conn.executemany(_INSERT, rows)


def record_entries(
    conn: sql.Connection,
    event: str,
    site_id: int,
    uids: list[int],
    actor: str | None,
    detail: str | None = None,
    at: float | None = None,
) -> None:
    """Rows for these mailbox entries of a site, read from the index: call it before removing them,
    in the same transaction. actor None: the site itself."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    when = time.time() if at is None else at
    conn.executemany(_ENTRY_ROWS, [(when, event, _text(actor), _text(detail), site_id, uid) for uid in uids])


_ACCEPTED_ROW = (
    "INSERT INTO audit (at, event, site, queue_id, message_id, study_id, size, sha256, actor)"
    f" VALUES (?, '{ACCEPTED}', coalesce(?, (SELECT name FROM sites WHERE id = ?)), ?, ?, ?, ?, ?, ?)"
)


def record_accepted(conn: sql.Connection, rows: list[tuple[Any, ...]]) -> None:
    """ACCEPTED rows of a group commit, one per mailbox entry: (at, site name or None, site id,
    queue ID, Message-ID, study, size, SHA-256, actor), in the commit's transaction."""
    conn.executemany(
        _ACCEPTED_ROW,
        [
            (at, name, sid, qid, _text(mid), _text(study), size, sha, _text(actor))
            for at, name, sid, qid, mid, study, size, sha, actor in rows
        ],
    )


# The same from the mail's accepted tracking event (storage/events.py: SHA-256 in its detail), for a
# mail freed before the session that fetched it ended (removed by another session or an operator)
_EVENT_ROW = (
    "INSERT INTO audit (at, event, site, queue_id, message_id, study_id, size, sha256, actor, detail)"
    " SELECT ?, ?, (SELECT name FROM sites WHERE id = ?), e.queue_id, e.message_id, e.set_id, e.size,"
    " e.detail, coalesce(?, (SELECT name FROM sites WHERE id = ?)), ? FROM events e"
    " WHERE e.queue_id = ? AND e.kind = 'accepted' LIMIT 1"
)

# ... or by queue ID and size alone (stored before the tracking record, or its events pruned)
_BARE_ROW = (
    "INSERT INTO audit (at, event, site, queue_id, size, actor, detail) VALUES"
    " (?, ?, (SELECT name FROM sites WHERE id = ?), ?, ?, (SELECT name FROM sites WHERE id = ?), ?)"
)


def record_downloads(
    conn: sql.Connection, site_id: int, retrieved: dict[str, tuple[float, int]], detail: str | None
) -> None:
    """FETCHED rows for the mails a session downloaded whole (queue ID -> (time, octets)); the
    site is the actor. Call it before the session's deletions, in the same transaction. A mail freed
    meanwhile is described from its tracking event, or by queue ID and size alone."""
    for qid, (at, size) in retrieved.items():
        values = (at, FETCHED, site_id, None, site_id, _text(detail), qid)
        if conn.execute(_MESSAGE_ROW, values).rowcount or conn.execute(_EVENT_ROW, values).rowcount:
            continue
        conn.execute(_BARE_ROW, (at, FETCHED, site_id, qid, size, site_id, _text(detail)))


def query(conn: sql.Connection, **filters: Any) -> list[AuditRecord]:
    """The records matching every given filter (those of records()), oldest first (until is exclusive)."""
    return list(records(conn, **filters))


def records(
    conn: sql.Connection,
    *,
    site: str | None = None,
    study: str | None = None,
    since: float | None = None,
    until: float | None = None,
    event: str | None = None,
    queue_id: str | None = None,
    message_id: str | None = None,
    limit: int | None = None,
) -> Iterator[AuditRecord]:
    """query's records one by one, read as they are needed (an export of any size in bounded
    memory, on PostgreSQL through a server-side cursor: storage.sql.rows)."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("site", site),
        ("study_id", study),
        ("event", event),
        ("queue_id", queue_id),
        ("message_id", message_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("at >= ?")
        args.append(since)
    if until is not None:
        where.append("at < ?")
        args.append(until)
    text = "SELECT id, " + ", ".join(COLUMNS) + " FROM audit"
    if where:
        text += " WHERE " + " AND ".join(where)
    text += " ORDER BY at, id"
    if limit is not None:
        text += " LIMIT ?"
        args.append(limit)
    return (AuditRecord(*r) for r in sql.rows(conn, text, args))


def prune_batch(conn: sql.Connection, before: float, limit: int = PRUNE_BATCH) -> int:
    """Delete up to `limit` of the oldest records older than `before` in one transaction; the count.
    The schema's guard lets a DELETE through only below the mark set here in the same transaction."""
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_prune_before', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (before,),
        )
        deleted = conn.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at < ? ORDER BY at LIMIT ?)", (before, limit)
        ).rowcount
        conn.execute("UPDATE meta SET value = 0 WHERE key = 'audit_prune_before'")
    return deleted


def prune(conn: sql.Connection, before: float) -> int:
    """Delete every record older than `before`, batch by batch; the count."""
    total = 0
    while (deleted := prune_batch(conn, before)) > 0:
        total += deleted
        if deleted < PRUNE_BATCH:
            break
    return total

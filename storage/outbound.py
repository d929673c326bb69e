# The outbound queue in the index (issue 8): rows of remote recipients of stored messages, read
# and updated by the relay's scheduler (in the index writer process) and by `mailhub queue`.
# Synchronous functions on an index connection (storage.sql: SQLite or PostgreSQL). Must never
# delete a row before its recipient was accepted by the next hop or its bounce was stored: the row
# is the only record of the duty.
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import db, events, sql


@dataclass(slots=True)
class QueuedRecipient:
    id: int
    queue_id: str
    rcpt: str
    queued_at: float
    next_attempt_at: float
    attempts: int
    warned: bool
    last_error: str | None
    blob: Path
    offset: int  # where the message starts in the blob file
    size: int
    dot_lines: bool
    mail_from: str

    @property
    def domain(self) -> str:
        return self.rcpt.rpartition("@")[2].lower()


@dataclass(slots=True)
class Deferral:
    id: int
    next_attempt_at: float
    attempts: int
    error: str
    warned: bool


_SELECT = (
    "SELECT o.id, o.queue_id, o.rcpt, o.queued_at, o.next_attempt_at, o.attempts, o.warned,"
    " o.last_error, m.blob, m.blob_offset, m.size, m.dot_lines, m.mail_from FROM outbound o"
    " JOIN messages m ON m.queue_id = o.queue_id"
)


def _rows(conn: sql.Connection, text: str, params: Sequence[object], blob_dir: Path) -> list[QueuedRecipient]:
    return [
        QueuedRecipient(i, q, r, qa, na, a, bool(w), e, blob_dir / b, o, s, bool(d), f)
        for i, q, r, qa, na, a, w, e, b, o, s, d, f in sql.rows(conn, text, params)
    ]


def due(
    conn: sql.Connection,
    blob_dir: Path,
    now: float,
    fresh: bool,
    limit: int,
    exclude: str = "[]",
    node: str = "",
    index_clock: bool = False,
) -> list[QueuedRecipient]:
    """Rows whose next attempt is due: never tried yet (fresh) or deferred, oldest first; `exclude`
    is a JSON list of row ids (those in flight); rows another node claimed until later are left
    out (and on PostgreSQL, rows another transaction is claiming right now: SKIP LOCKED). With
    `index_clock`, a claim's end is compared with the index's clock (PostgreSQL's), not `now`."""
    where = "o.attempts = 0" if fresh else "o.attempts > 0"
    dialect = sql.dialect(conn)
    locking = sql.CLAIM_ROWS[dialect] if conn.in_transaction else ""  # a claim is made in a write transaction
    clock = sql.INDEX_CLOCK[dialect] if index_clock else None
    return _rows(
        conn,
        f"{_SELECT} WHERE o.next_attempt_at <= ? AND {where}"
        f" AND o.id NOT IN ({sql.JSON_INTEGERS[dialect]})"
        f" AND (o.claimed_until IS NULL OR o.claimed_until <= {clock or '?'} OR o.claimed_by = ?)"
        f" ORDER BY o.next_attempt_at, o.id LIMIT ?{locking}",
        (now, exclude, node, limit) if clock else (now, exclude, now, node, limit),
        blob_dir,
    )


def _lease_end(conn: sql.Connection, until: float, lease: float | None) -> tuple[str, float]:
    """The SQL of a claim's end and its parameter: the index's clock + `lease` when given and the
    index has a clock of its own (PostgreSQL), else `until` (the caller's clock)."""
    clock = sql.INDEX_CLOCK[sql.dialect(conn)] if lease is not None else None
    return (f"{clock} + ?", lease) if clock and lease is not None else ("?", until)


def claim(conn: sql.Connection, ids: list[int], node: str, until: float, lease: float | None = None) -> None:
    """Mark rows as being delivered by `node` until `until` (taken, or renewed while it delivers);
    with `lease`, until the index's clock + lease on PostgreSQL (the nodes' clocks may disagree)."""
    end, value = _lease_end(conn, until, lease)
    conn.executemany(
        f"UPDATE outbound SET claimed_by = ?, claimed_until = {end} WHERE id = ?", [(node, value, i) for i in ids]
    )


def renew(conn: sql.Connection, ids: list[int], node: str, until: float, lease: float | None = None) -> int:
    """Extend this node's claims on rows it still delivers (not those another node took over after
    the lease ran out); how many were renewed. `lease` as for claim()."""
    end, value = _lease_end(conn, until, lease)
    renewed = 0
    for i in ids:
        renewed += conn.execute(
            f"UPDATE outbound SET claimed_until = {end} WHERE id = ? AND claimed_by = ?", (value, i, node)
        ).rowcount
    return renewed


def all_rows(conn: sql.Connection, blob_dir: Path) -> list[QueuedRecipient]:
    return _rows(conn, f"{_SELECT} ORDER BY o.queue_id, o.id", (), blob_dir)


def remove(conn: sql.Connection, ids: list[int]) -> None:
    """Rows done (delivered or bounced); their message references go with them."""
    conn.executemany("DELETE FROM outbound WHERE id = ?", [(i,) for i in ids])


def defer(conn: sql.Connection, deferrals: list[Deferral], attempted_at: float) -> None:
    conn.executemany(
        "UPDATE outbound SET next_attempt_at = ?, attempts = ?, last_error = ?, warned = ?,"
        " last_attempt_at = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
        [(d.next_attempt_at, d.attempts, d.error[:500], int(d.warned), attempted_at, d.id) for d in deferrals],
    )


def retry_now(conn: sql.Connection, now: float, queue_id: str | None) -> int:
    """Make rows due now (all, or one message's) and tell the server to forget its back-off of
    next hops (retry_version); returns how many rows."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'outbound_retry'")
    if queue_id is None:
        return conn.execute("UPDATE outbound SET next_attempt_at = ?", (now,)).rowcount
    return conn.execute("UPDATE outbound SET next_attempt_at = ? WHERE queue_id = ?", (now, queue_id)).rowcount


def retry_version(conn: sql.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'outbound_retry'").fetchone()[0])


def delete(conn: sql.Connection, queue_id: str, rcpt: str | None) -> int:
    """Drop a message's rows (or one recipient's) without delivery; returns how many."""
    if rcpt is None:
        return conn.execute("DELETE FROM outbound WHERE queue_id = ?", (queue_id,)).rowcount
    return conn.execute(
        "DELETE FROM outbound WHERE queue_id = ? AND rcpt = ? COLLATE NOCASE", (queue_id, rcpt)
    ).rowcount


def retry_queued(conn: sql.Connection, now: float, queue_id: str | None) -> int:
    """`mailhub queue retry`: retry_now in a transaction of its own; how many rows."""
    with db.transaction(conn):
        count = retry_now(conn, now, queue_id)
    return count


def drop_queued(conn: sql.Connection, queue_id: str, rcpt: str | None) -> int:
    """`mailhub queue delete`: delete in a transaction of its own; how many rows."""
    with db.transaction(conn):
        count = delete(conn, queue_id, rcpt)
    return count


def totals(conn: sql.Connection) -> tuple[int, int, float | None]:
    """(messages, recipients, oldest queued_at) of the whole queue."""
    messages, recipients, oldest = conn.execute(
        "SELECT count(DISTINCT queue_id), count(*), min(queued_at) FROM outbound"
    ).fetchone()
    return messages, recipients, oldest


def due_and_version(
    conn: sql.Connection,
    blob_dir: Path,
    now: float,
    busy: str,
    free: int,
    deferred_share: int,
    node: str = "",
    lease: float = 0.0,
    index_clock: bool = False,
) -> tuple[int, list[QueuedRecipient]]:
    """The retry version and due rows, fresh ones first, then deferred ones (at most
    deferred_share), none in flight, none another node claimed; with a `lease`, the rows are
    claimed for `node` until now + lease (in the caller's transaction: two nodes never take one row).
    `index_clock`: leases are judged and set by the index's clock (PostgreSQL's), not `now`."""
    fresh = due(conn, blob_dir, now, True, free, busy, node, index_clock)
    room = min(free - len(fresh), deferred_share)
    rows = fresh + (due(conn, blob_dir, now, False, room, busy, node, index_clock) if room > 0 else [])
    if lease > 0 and rows:
        claim(conn, [r.id for r in rows], node, now + lease, lease if index_clock else None)
    return retry_version(conn), rows


def settle(
    conn: sql.Connection,
    removed: list[int],
    deferrals: list[Deferral],
    now: float,
    tracked: Sequence[tuple[Any, ...]] = (),
) -> None:
    """Delivered or expired rows go, deferred ones get their next attempt, with the tracking event
    rows of the outcomes (one transaction)."""
    remove(conn, removed)
    defer(conn, deferrals, now)
    conn.executemany(events.INSERT, tracked)

# The tracking record (issue 7): one `events` row per thing that happened to a mail (accepted,
# delivered, downloaded, deleted; for a remote recipient each relay attempt's outcome: relayed,
# relay_deferred, bounced) and per SMTP refusal (refused = 5xx, deferred = 4xx), so that
# `mailhub trace` can follow a mail after its blob is gone and `mailhub stats` can sum volumes.
# Rows are written by the storage writer inside the transactions that change the state they
# describe; this module only builds rows and prunes. Must never read message content.
from dataclasses import dataclass
from typing import Any

from . import sql

ACCEPTED, DELIVERED, DOWNLOADED, DELETED = "accepted", "delivered", "downloaded", "deleted"
REFUSED, DEFERRED = "refused", "deferred"
RELAYED, RELAY_DEFERRED, BOUNCED = "relayed", "relay_deferred", "bounced"
PRUNE_BATCH = 5000  # rows per pruning transaction: short enough not to hold up the writer


@dataclass(slots=True)
class Event:
    """One row of the `events` table (see storage/schema.sql for what each column means per kind)."""

    at: float
    kind: str
    queue_id: str | None = None
    site: str | None = None
    peer_site: str | None = None
    sender: str | None = None
    rcpt: str | None = None
    peer: str | None = None
    size: int | None = None
    message_id: str | None = None
    set_id: str | None = None
    set_part: int | None = None
    set_total: int | None = None
    detail: str | None = None


COLUMNS = (
    "at",
    "kind",
    "queue_id",
    "site",
    "peer_site",
    "sender",
    "rcpt",
    "peer",
    "size",
    "message_id",
    "set_id",
    "set_part",
    "set_total",
    "detail",
)
INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def row(e: Event) -> tuple[Any, ...]:
    return (
        e.at,
        e.kind,
        e.queue_id,
        e.site,
        e.peer_site,
        e.sender,
        e.rcpt,
        e.peer,
        e.size,
        e.message_id,
        e.set_id,
        e.set_part,
        e.set_total,
        e.detail,
    )


def refusal(
    at: float,
    reply: str,
    *,
    site: str | None,
    sender: str | None,
    rcpt: str | None = None,
    to_site: str | None = None,
    peer: str | None = None,
    queue_id: str | None = None,
    message_id: str | None = None,
    set_id: str | None = None,
    size: int | None = None,
) -> Event:
    """An SMTP refusal of a recipient or of the data: 4xx is a deferral, anything else a refusal."""
    return Event(
        at,
        DEFERRED if reply.startswith("4") else REFUSED,
        queue_id=queue_id,
        site=site,
        peer_site=to_site,
        sender=sender,
        rcpt=rcpt,
        peer=peer,
        size=size,
        message_id=message_id,
        set_id=set_id,
        detail=reply.split("\r\n", 1)[0][:300],
    )


def relay_outcome(at: float, kind: str, queue_id: str, rcpt: str, hop: str | None, size: int, text: str) -> Event:
    """A relay attempt's outcome for one remote recipient: the next hop took it (relayed), deferred
    it (relay_deferred: tried again later) or it was returned to the sender (bounced: refused for
    good, or its lifetime ended); `text` is the next hop's reply or why."""
    return Event(at, kind, queue_id=queue_id, rcpt=rcpt, peer=hop, size=size, detail=text.split("\r\n", 1)[0][:300])


def prune_batch(conn: sql.Connection, before: float, limit: int = PRUNE_BATCH) -> int:
    """Delete up to `limit` of the oldest events older than `before` in one transaction; the count."""
    conn.execute(sql.BEGIN_WRITE[sql.dialect(conn)])
    try:
        deleted = conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? ORDER BY at LIMIT ?)", (before, limit)
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return deleted


def prune(conn: sql.Connection, before: float) -> int:
    """Delete every event older than `before`, batch by batch; the count."""
    total = 0
    while (deleted := prune_batch(conn, before)) > 0:
        total += deleted
        if deleted < PRUNE_BATCH:
            break
    return total

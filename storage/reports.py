# Read-only queries over the tracking events and the mailboxes, for what the command line reports:
# `mailhub stats` (volumes and refusals over a period, backlogs now), `mailhub site show` (a site's
# recent activity) and `mailhub trace` (the events of a mail, a study or an address). Each returns
# plain rows or storage.events.Event objects; the reports are built and formatted in mailhub/.
# Must never write to the index; every query is bounded by an index and, where it can grow with
# the store, by a LIMIT or a chunked IN list.
from collections.abc import Iterator

from . import liveness, sql
from .events import COLUMNS, Event

_COLUMNS = ", ".join(COLUMNS)
_CHUNK = 500  # queue IDs per IN (...) lookup
_PARTY_COLUMNS = ("site", "peer_site", "sender", "rcpt")  # the columns a party is looked up by


def _party_column(column: str) -> str:
    if column not in _PARTY_COLUMNS:
        raise ValueError(f"not a party column of the events: {column!r}")
    return column


def volumes(conn: sql.Connection, since: float, until: float) -> list[tuple[str, str, str, int, int]]:
    """(kind, site, peer site, count, octets) of the events in [since, until); '-' for no site."""
    return conn.execute(
        "SELECT kind, coalesce(site, '-'), coalesce(peer_site, '-'), count(*), coalesce(sum(size), 0)"
        " FROM events WHERE at >= ? AND at < ? GROUP BY 1, 2, 3",
        (since, until),
    ).fetchall()


def refusal_counts(conn: sql.Connection, since: float, until: float) -> list[tuple[str, str, str, str, int, float]]:
    """(kind, site, site it was for, reply, count, last time) of the refusals and deferrals in
    [since, until), the most frequent first."""
    return conn.execute(
        "SELECT kind, coalesce(site, '-'), coalesce(peer_site, '-'), detail, count(*), max(at)"
        " FROM events WHERE kind IN ('refused', 'deferred') AND at >= ? AND at < ?"
        " GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2, 3, 4",
        (since, until),
    ).fetchall()


def backlogs(conn: sql.Connection, top: int, site_id: int | None = None) -> list[tuple[str, int, int, float]]:
    """(site, messages, octets, oldest delivery time) of the mail waiting now (not fetched yet by
    its site: storage.liveness.WAITING), the largest backlogs first (at most `top`), or one site's."""
    return liveness.backlogs(conn, top, site_id)


def mailbox_totals(conn: sql.Connection, site_id: int) -> tuple[int, int]:
    """(messages, octets) held in one site's mailbox, fetched or not (what its quotas count)."""
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(m.size), 0) FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id"
        " WHERE b.site_id = ?",
        (site_id,),
    ).fetchone()
    return count, size


def downloads_since(conn: sql.Connection, site: str, since: float) -> tuple[int, int]:
    """(messages, octets) the site downloaded since `since`."""
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM events WHERE kind = 'downloaded' AND site = ? AND at >= ?",
        (site, since),
    ).fetchone()
    return count, size


def refusals_since(conn: sql.Connection, column: str, name: str, since: float) -> list[tuple[str, str, int, float]]:
    """(kind, reply, count, last time) of the refusals and deferrals since `since` whose `column`
    ('site': the sender's site, 'peer_site': the recipient's) is `name`, the most frequent first."""
    return conn.execute(
        f"SELECT kind, detail, count(*), max(at) FROM events WHERE {_party_column(column)} = ? AND at >= ?"
        " AND kind IN ('refused', 'deferred') GROUP BY 1, 2 ORDER BY 3 DESC, 2",
        (name, since),
    ).fetchall()


def address_known(conn: sql.Connection, address: str) -> bool:
    """Whether the address is a site's or appears as a sender or recipient in the events."""
    return (
        conn.execute(
            "SELECT 1 FROM addresses WHERE address = ? UNION ALL"
            " SELECT 1 FROM events WHERE sender = ? UNION ALL"
            " SELECT 1 FROM events WHERE rcpt = ? LIMIT 1",
            (address, address, address),
        ).fetchone()
        is not None
    )


def queue_ids_by_message_id(conn: sql.Connection, message_ids: tuple[str, ...]) -> list[str]:
    """The queue IDs of the mails with any of these Message-IDs."""
    marks = ",".join("?" * len(message_ids))
    return [
        q
        for (q,) in conn.execute(f"SELECT DISTINCT queue_id FROM events WHERE message_id IN ({marks})", message_ids)
        if q is not None
    ]


def queue_ids_by_set(conn: sql.Connection, set_id: str) -> list[str]:
    """The queue IDs of the parts of an X-TELEMEDICINE-SETID."""
    return [
        q for (q,) in conn.execute("SELECT DISTINCT queue_id FROM events WHERE set_id = ?", (set_id,)) if q is not None
    ]


def latest_mails_of(conn: sql.Connection, column: str, address: str, kind: str, limit: int) -> list[tuple[str, float]]:
    """(queue ID, time) of the latest `limit` events of `kind` whose `column` ('sender' or 'rcpt')
    is the address, the latest first."""
    return conn.execute(
        f"SELECT queue_id, at FROM events WHERE {_party_column(column)} = ? AND kind = ? ORDER BY id DESC LIMIT ?",
        (address, kind, limit),
    ).fetchall()


def latest_events_of(conn: sql.Connection, column: str, address: str, kind: str, limit: int) -> list[Event]:
    """The latest `limit` events of `kind` whose `column` ('sender' or 'rcpt') is the address."""
    return [
        Event(*r)
        for r in conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE {_party_column(column)} = ? AND kind = ? ORDER BY id DESC LIMIT ?",
            (address, kind, limit),
        )
    ]


def events_of_mails(conn: sql.Connection, queue_ids: list[str]) -> Iterator[Event]:
    """Every event of these mails, in time order within each chunk of _CHUNK queue IDs."""
    for start in range(0, len(queue_ids), _CHUNK):
        chunk = queue_ids[start : start + _CHUNK]
        for r in sql.rows(
            conn,
            f"SELECT {_COLUMNS} FROM events WHERE queue_id IN ({','.join('?' * len(chunk))}) ORDER BY at, id",
            chunk,
        ):
            yield Event(*r)

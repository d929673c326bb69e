# Site liveness as the index knows it: per site, the mail held and the mail waiting, the oldest
# waiting mail, the last login and the last fetch, the contact address for notices, and whether the
# hub has found it stale (persisted, so a restart repeats no notice). The ONE definition of
# "waiting" lives here: a mailbox entry its site has not fetched yet (`fetched_at IS NULL`: no POP3
# RETR, no whole IMAP body fetch), kept or not; metrics, `mailhub stats` and `mailhub site show`
# all read it through this module (or the mailbox_usage triggers, which count the same thing).
# "Held" is every entry still in the mailbox, fetched or not: what the mailbox quotas count.
# Must never decide what is stale (mailhub/liveness.py does, from these rows and a clock).
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from . import sql
from .index import IndexLocation
from .sites import SiteError

WAITING = "b.fetched_at IS NULL"  # the definition, as SQL over the mailbox table aliased b


@dataclass(frozen=True, slots=True)
class SiteLiveness:
    site_id: int
    name: str
    contact: str | None  # where notices go (None: the operator only)
    held_messages: int
    held_bytes: int
    waiting_messages: int
    waiting_bytes: int
    oldest_waiting_at: float | None  # delivery time of the first mail (in arrival order) not fetched yet
    last_login_at: float | None  # login time of the latest session recorded
    last_fetch_at: float | None  # time the site last fetched a whole mail
    stale_since: float | None  # set while the hub holds the site stale (its notice sent)


# Counts and octets from mailbox_usage (kept by the schema's triggers in the mailbox's own
# transactions, waiting = the same `fetched_at IS NULL`), the oldest waiting mail as the first
# one in arrival (uid) order through the mailbox_site index: 650 sites over 300,000 entries read in
# about 10 ms, where a join over every entry took about 1 s.
_SQL = (
    "SELECT s.id, s.name, c.address, coalesce(u.held_messages, 0), coalesce(u.held_bytes, 0),"
    " coalesce(u.waiting_messages, 0), coalesce(u.waiting_bytes, 0),"
    f" (SELECT b.delivered_at FROM mailbox b WHERE b.site_id = s.id AND {WAITING} ORDER BY b.uid LIMIT 1),"
    " d.last_poll_at, d.last_fetch_at, st.stale_since"
    " FROM sites s LEFT JOIN (SELECT receiver_id, sum(held_messages) AS held_messages,"
    " sum(held_bytes) AS held_bytes, sum(waiting_messages) AS waiting_messages,"
    " sum(waiting_bytes) AS waiting_bytes FROM mailbox_usage GROUP BY receiver_id) u ON u.receiver_id = s.id"
    " LEFT JOIN site_contact c ON c.site_id = s.id LEFT JOIN site_downloads d ON d.site_id = s.id"
    " LEFT JOIN site_stale st ON st.site_id = s.id"
)


def open_reader(index: "IndexLocation | Path") -> sql.Connection:
    """A read-only connection to the index (a data folder: its SQLite one) for a worker thread
    (metrics at scrape time, the monitor)."""
    if not isinstance(index, IndexLocation):
        index = IndexLocation(Path(index))
    if index.is_postgresql:
        return index.connect_readonly(any_thread=True)
    uri = (Path(index.data_dir) / "index.sqlite3").resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5)


def read(conn: sql.Connection, site_id: int | None = None) -> list[SiteLiveness]:
    """Every site's liveness figures by name (or one site's)."""
    where, params = (" WHERE s.id = ?", (site_id,)) if site_id is not None else ("", ())
    rows = conn.execute(_SQL + where + " ORDER BY s.name", params).fetchall()
    return [SiteLiveness(*row) for row in rows]


def backlogs(conn: sql.Connection, top: int, site_id: int | None = None) -> list[tuple[str, int, int, float]]:
    """(site, messages, octets, oldest delivery time) of the mail waiting now, the largest backlogs
    first (at most `top`), or one site's."""
    where = " AND b.site_id = ?" if site_id is not None else ""
    return conn.execute(
        "SELECT s.name, count(*), sum(m.size), min(b.delivered_at) FROM mailbox b"
        " JOIN messages m ON m.queue_id = b.queue_id JOIN sites s ON s.id = b.site_id"
        f" WHERE {WAITING}{where} GROUP BY b.site_id, s.name ORDER BY 3 DESC, 1 LIMIT ?",
        ((site_id,) if site_id is not None else ()) + (top,),
    ).fetchall()


# ---- what the hub and the command line write (one transaction each, the caller's) -------------


def mark_stale(conn: sql.Connection, site_id: int, since: float, noticed_at: float) -> None:
    conn.execute(
        "INSERT INTO site_stale (site_id, stale_since, noticed_at) VALUES (?, ?, ?) ON CONFLICT (site_id) DO NOTHING",
        (site_id, since, noticed_at),
    )


def mark_recovered(conn: sql.Connection, site_id: int) -> None:
    conn.execute("DELETE FROM site_stale WHERE site_id = ?", (site_id,))


def validate_contact(address: str) -> str:
    """An address for notices (any domain: the site's own staff); raises SiteError."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() or c in '<>,;"' for c in address.strip()):
        raise SiteError(f"invalid contact address {address!r}: expected name@example.org")
    if len(address.strip()) > 254:
        raise SiteError("contact address longer than 254 characters")
    return address.strip()


def set_contact(conn: sql.Connection, site_id: int, address: str | None) -> None:
    """A site's contact address for notices; None or '' removes it."""
    if address:
        address = validate_contact(address)
        conn.execute(
            "INSERT INTO site_contact (site_id, address) VALUES (?, ?)"
            " ON CONFLICT (site_id) DO UPDATE SET address = excluded.address",
            (site_id, address),
        )
    else:
        conn.execute("DELETE FROM site_contact WHERE site_id = ?", (site_id,))


def contact(conn: sql.Connection, site_id: int) -> str | None:
    row = conn.execute("SELECT address FROM site_contact WHERE site_id = ?", (site_id,)).fetchone()
    return row[0] if row else None

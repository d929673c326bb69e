# What the quota policy reads from and writes to the index: per-site limit overrides, mailbox usage
# per (receiver, sender), volumes per UTC day and month, download counters, and the server's live
# throttle state. The usage tables are kept by triggers (schema.sql) in the same transactions as the
# mailbox; this module only reads them, rebuilds them at start and stores limits. Never decides.
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import db, sql
from .sites import SiteError, get_site

# Limit names, in display order, as `mailhub site set` options and site_limits columns.
LIMIT_NAMES = (
    "mailbox_bytes",
    "mailbox_messages",
    "max_message_size",
    "submitted_per_day",
    "submitted_per_month",
    "received_per_day",
    "received_per_month",
    "max_drain_time",
    "downlink",
)
UNLIMITED = -1


@dataclass
class UsageSnapshot:
    """Index figures the throttle loads: usage rows (receiver, sender, held_bytes, held_messages,
    waiting_bytes, waiting_messages), volumes {(site, period): (submitted, received)}, downloads
    {site: (bytes, last_poll_at)}."""

    taken_at: float
    usage: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    volumes: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    downloads: dict[int, tuple[int, float]] = field(default_factory=dict)


VOLUME_WINDOW_DAYS = 40  # days of volume periods loaded at start (as quotas.ledger keeps them)


def periods(now: float) -> tuple[str, str]:
    """The UTC day and month keys of site_volume for `now`."""
    return time.strftime("%Y-%m-%d", time.gmtime(now)), time.strftime("%Y-%m", time.gmtime(now))


def window_start(now: float) -> tuple[str, str]:
    """The oldest day and month key of the volumes the throttle loads at Unix time `now`."""
    return periods(now - VOLUME_WINDOW_DAYS * 86400)


USAGE_SQL = (
    "SELECT receiver_id, sender_id, held_bytes, held_messages, waiting_bytes, waiting_messages"
    " FROM mailbox_usage WHERE held_messages > 0"
)
# every period since window_start (days are 10 characters long, months 7): a wall clock stepped
# back after start finds the earlier periods' counts
VOLUME_SQL = (
    "SELECT site_id, period, submitted_bytes, received_bytes FROM site_volume"
    " WHERE (length(period) = 10 AND period >= ?) OR (length(period) = 7 AND period >= ?)"
)
DOWNLOADS_SQL = "SELECT site_id, bytes, last_poll_at FROM site_downloads"
LIMITS_SQL = f"SELECT site_id, {', '.join(LIMIT_NAMES)} FROM site_limits"


def snapshot_from_rows(
    now: float, usage: Iterable[Sequence[Any]], volumes: Iterable[Sequence[Any]], downloads: Iterable[Sequence[Any]]
) -> UsageSnapshot:
    return UsageSnapshot(
        now,
        [tuple(r) for r in usage],
        {(site, period): (sub, rec) for site, period, sub, rec in volumes},
        {site: (octets, last) for site, octets, last in downloads},
    )


def read_snapshot(conn: sql.Connection, now: float) -> UsageSnapshot:
    return snapshot_from_rows(
        now, conn.execute(USAGE_SQL), conn.execute(VOLUME_SQL, window_start(now)), conn.execute(DOWNLOADS_SQL)
    )


def read_limits(conn: sql.Connection) -> dict[int, dict[str, float]]:
    """Per-site overrides: {site_id: {limit: value}} with only the limits that are set."""
    return {
        row[0]: {name: value for name, value in zip(LIMIT_NAMES, row[1:]) if value is not None}
        for row in conn.execute(LIMITS_SQL)
    }


def set_limits(conn: sql.Connection, name: str, values: dict[str, float | None]) -> None:
    """Set (number), reset to the config default (None) or lift (UNLIMITED) limits of a site."""
    unknown = set(values) - set(LIMIT_NAMES)
    if unknown:
        raise SiteError(f"unknown limit(s): {', '.join(sorted(unknown))}")
    with db.transaction(conn):
        site = get_site(conn, name)
        conn.execute("INSERT INTO site_limits (site_id) VALUES (?) ON CONFLICT DO NOTHING", (site.id,))
        for key, value in values.items():
            conn.execute(f"UPDATE site_limits SET {key} = ? WHERE site_id = ?", (value, site.id))


def rebuild_usage(conn: sql.Connection) -> None:
    """Recompute mailbox_usage from the mailbox (at start, before any listener opens)."""
    with db.transaction(conn):
        conn.execute("DELETE FROM mailbox_usage")
        conn.execute(
            "INSERT INTO mailbox_usage (receiver_id, sender_id, held_bytes, held_messages, waiting_bytes,"
            " waiting_messages) SELECT b.site_id, coalesce(m.sender_site, 0), sum(m.size), count(*),"
            " sum(CASE WHEN b.fetched_at IS NULL THEN m.size ELSE 0 END),"
            " sum(CASE WHEN b.fetched_at IS NULL THEN 1 ELSE 0 END)"
            " FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id GROUP BY 1, 2"
        )


def site_usage(conn: sql.Connection, site_id: int, now: float) -> dict[str, Any]:
    """One site's usage figures for `mailhub site show`."""
    held_b, held_m, wait_b, wait_m = conn.execute(
        "SELECT coalesce(sum(held_bytes), 0), coalesce(sum(held_messages), 0),"
        " coalesce(sum(waiting_bytes), 0), coalesce(sum(waiting_messages), 0)"
        " FROM mailbox_usage WHERE receiver_id = ?",
        (site_id,),
    ).fetchone()
    day, month = periods(now)
    volumes = {
        period: (sub, rec)
        for period, sub, rec in conn.execute(
            "SELECT period, submitted_bytes, received_bytes FROM site_volume WHERE site_id = ? AND period IN (?, ?)",
            (site_id, day, month),
        )
    }
    return {
        "mailbox_bytes": held_b,
        "mailbox_messages": held_m,
        "waiting_bytes": wait_b,
        "waiting_messages": wait_m,
        "submitted_per_day": volumes.get(day, (0, 0))[0],
        "submitted_per_month": volumes.get(month, (0, 0))[0],
        "received_per_day": volumes.get(day, (0, 0))[1],
        "received_per_month": volumes.get(month, (0, 0))[1],
    }


def download_totals(conn: sql.Connection, site_id: int) -> tuple[int, int, int, float, float | None, float | None]:
    """(sessions, messages, octets, seconds spent sending, first poll, last poll) of one site's
    downloads since it was added."""
    row = conn.execute(
        "SELECT sessions, messages, bytes, send_seconds, first_poll_at, last_poll_at"
        " FROM site_downloads WHERE site_id = ?",
        (site_id,),
    ).fetchone()
    return tuple(row) if row else (0, 0, 0, 0.0, None, None)


def write_throttle_states(conn: sql.Connection, states: dict[int, dict[str, Any]], now: float) -> None:
    conn.executemany(
        "INSERT INTO site_throttle (site_id, updated_at, state) SELECT ?, ?, ? WHERE EXISTS"
        " (SELECT 1 FROM sites WHERE id = ?) ON CONFLICT (site_id) DO UPDATE SET"
        " updated_at = excluded.updated_at, state = excluded.state",
        [(site_id, now, json.dumps(state), site_id) for site_id, state in states.items()],
    )


def read_throttle_state(conn: sql.Connection, site_id: int) -> tuple[float, dict[str, Any]] | None:
    row = conn.execute("SELECT updated_at, state FROM site_throttle WHERE site_id = ?", (site_id,)).fetchone()
    return None if row is None else (row[0], json.loads(row[1]))

# The index side of the mailbox lifecycle (issue 25): mail that waits unfetched past its site's
# retention (expiry warnings, expiry with one RFC 3464 notice per study), quota warning levels, the
# outbox of notices the hub owes, receipts (MDNs) linked to the mail they answer, and the study
# figures behind the lifecycle metrics. Reads run on any connection (the hub's lifecycle thread, the
# command line); writes are functions (conn, ...) run in one transaction by the index writer
# (Storage.queue_op / Storage.remove_with) or by the command line (db.transaction).
# Decides nothing (relay/expiry.py plans, relay/lifecycle.py runs) and must never read or keep
# message content: notices carry IDs, sizes and dates only.
# Tracking events written here (storage/events.py for the columns):
#   expired   site = mailbox site, peer_site = sending site, queue_id, size, message_id, set_id/part/
#             total, detail = why ("not fetched within N days")
#   receipt   queue_id = the mail answered (None if unknown), site = the site whose receipt it is,
#             peer_site = the answered mail's sending site, sender = the receipt's envelope sender,
#             message_id = its Original-Message-ID, set_id/part/total of the answered mail,
#             detail = "DISPOSITION [mdn QUEUEID]"
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import audit, events, sql
from .sites import SiteError, get_site

EXPIRED, RECEIPT = "expired", "receipt"
NOTICE_MARK = "lifecycle_notice_sent"  # meta: the id of the last notice sent (in its mail's commit)
EXPIRY_WARNING, EXPIRY_DSN = "expiry_warning", "expiry_dsn"
QUOTA_WARNING, QUOTA_OPERATOR = "quota_warning", "quota_operator"
OPERATOR = ""  # rcpt of a notice for the operator (lifecycle.operator_address at send time)
_MAX_DETAIL = 300


@dataclass(frozen=True, slots=True)
class Waiting:
    """An unfetched mailbox entry with what expiry needs of it (no content)."""

    uid: int
    site_id: int
    site: str
    queue_id: str
    delivered_at: float
    warned_at: float | None
    size: int
    mail_from: str
    message_id: str | None
    set_id: str | None
    set_part: int | None
    set_total: int | None
    retention_days: float  # the site's effective retention (0: keep)
    site_address: str  # the site's first address (where its warnings go)


@dataclass(slots=True)
class ExpiryGroup:
    """Mailbox entries of one study (or one mail without a study) from one sender in one site's
    mailbox that expire together, with one notice to the sender."""

    site_id: int
    site: str
    sender: str  # envelope sender of the mails ('' : no notice)
    set_id: str | None
    uids: list[int]
    retention_days: float


@dataclass(slots=True)
class WarningGroup:
    """Entries of one site's mailbox whose expiry is near: one notice to the site."""

    site_id: int
    site: str
    rcpt: str
    uids: list[int]
    expires_at: dict[int, float] = field(default_factory=dict)  # uid -> when it expires


@dataclass(frozen=True, slots=True)
class Notice:
    id: int
    kind: str
    created_at: float
    rcpt: str
    facts: dict[str, Any]


# ---- reads ---------------------------------------------------------------------------------------


def waiting_entries(
    conn: sql.Connection, default_days: float, now: float | None = None, warn_before: float = 0.0
) -> list[Waiting]:
    """Every unfetched mailbox entry of a site whose retention is not 0 (keep); with `now`, only
    those of a study (or a mail without one) from one sender (lower() of ASCII, as relay/expiry.py
    groups) in a mailbox whose newest part is due to expire by now + warn_before seconds, each
    study whole: a backlog that is not due is neither read into memory nor planned over."""
    inner = (
        "SELECT b.uid, b.site_id, s.name, b.queue_id, b.delivered_at, b.warned_at, m.size, m.mail_from,"
        " m.message_id, m.set_id, m.set_part, m.set_total, coalesce(r.days, ?) AS days,"
        " (SELECT a.address FROM addresses a WHERE a.site_id = b.site_id"
        f"  ORDER BY lower(a.address){sql.BYTE_ORDER[sql.dialect(conn)]} LIMIT 1),"
        " max(b.delivered_at) OVER (PARTITION BY b.site_id, CASE WHEN m.set_id IS NOT NULL AND m.set_id != ''"
        "  THEN 'set:' || m.set_id ELSE 'mail:' || b.queue_id END, lower(m.mail_from)) AS newest"
        " FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id JOIN sites s ON s.id = b.site_id"
        " LEFT JOIN site_retention r ON r.site_id = b.site_id"
        " WHERE b.fetched_at IS NULL AND coalesce(r.days, ?) > 0"
    )
    if now is None:
        rows = conn.execute(inner + " ORDER BY b.uid", (default_days, default_days)).fetchall()
    else:
        rows = conn.execute(
            f"SELECT * FROM ({inner}) AS w WHERE newest + days * 86400.0 - ? <= ? ORDER BY uid",
            (default_days, default_days, max(0.0, warn_before), now),
        ).fetchall()
    return [_waiting(row[:14]) for row in rows]


def _waiting(row: tuple[Any, ...]) -> Waiting:
    uid, site_id, site, qid, delivered_at, warned_at, size, mail_from, mid, set_id, part, total, days, address = row
    return Waiting(
        uid, site_id, site, qid, delivered_at, warned_at, size, mail_from, mid, set_id, part, total, days, address or ""
    )


def retention_overrides(conn: sql.Connection) -> dict[int, float]:
    return dict(conn.execute("SELECT site_id, days FROM site_retention").fetchall())


def set_retention(conn: sql.Connection, name: str, days: float | None) -> None:
    """A site's retention in days (0: keep until fetched), or None: back to the config default."""
    if days is not None and (days < 0 or days != days):
        raise SiteError(f"retention must be 0 (keep) or more days, got {days!r}")
    site = get_site(conn, name)
    if days is None:
        conn.execute("DELETE FROM site_retention WHERE site_id = ?", (site.id,))
    else:
        conn.execute(
            "INSERT INTO site_retention (site_id, days) VALUES (?, ?)"
            " ON CONFLICT (site_id) DO UPDATE SET days = excluded.days",
            (site.id, days),
        )


def pending_notices(conn: sql.Connection, limit: int = 100) -> list[Notice]:
    """Notices not sent yet, oldest first."""
    return [
        Notice(i, kind, at, rcpt, json.loads(facts))
        for i, kind, at, rcpt, facts in conn.execute(
            "SELECT id, kind, created_at, rcpt, facts FROM lifecycle_notices"
            " WHERE id > (SELECT value FROM meta WHERE key = ?) ORDER BY id LIMIT ?",
            (NOTICE_MARK, limit),
        )
    ]


def quota_levels(conn: sql.Connection) -> dict[int, set[int]]:
    """Site id -> the warning levels it is recorded at or above."""
    found: dict[int, set[int]] = {}
    for site_id, level in conn.execute("SELECT site_id, level FROM quota_warnings"):
        found.setdefault(site_id, set()).add(level)
    return found


def study_rows(conn: sql.Connection, since: float, until: float | None = None) -> list[tuple[Any, ...]]:
    """Per (study, receiving site) of the studies with a part accepted in [since, until): (set_id,
    site, set_total, parts accepted, first accepted, last accepted, parts delivered, parts
    downloaded, last download, parts with a receipt, last receipt, its detail, parts still in the
    mailbox unfetched), the latest studies first. From the tracking events, so bounded by their
    retention."""
    return conn.execute(
        "WITH sets AS (SELECT DISTINCT set_id FROM events WHERE kind = 'accepted' AND set_id IS NOT NULL"
        "   AND at >= ? AND at < ?),"
        " acc AS (SELECT e.queue_id, e.set_id, e.set_part, e.set_total, e.at FROM events e JOIN sets USING (set_id)"
        "   WHERE e.kind = 'accepted'),"
        " dlv AS (SELECT e.queue_id, e.site, a.set_id, a.set_part FROM events e JOIN acc a ON a.queue_id = e.queue_id"
        "   WHERE e.kind = 'delivered'),"
        " dl AS (SELECT e.queue_id, e.site, max(e.at) AS at FROM events e JOIN acc a ON a.queue_id = e.queue_id"
        "   WHERE e.kind = 'downloaded' GROUP BY 1, 2),"
        " rc AS (SELECT e.queue_id, e.site, max(e.at) AS at FROM events e JOIN acc a ON a.queue_id = e.queue_id"
        "   WHERE e.kind = 'receipt' GROUP BY 1, 2)"
        " SELECT d.set_id, d.site, (SELECT max(set_total) FROM acc WHERE acc.set_id = d.set_id),"
        "  (SELECT count(DISTINCT set_part) FROM acc WHERE acc.set_id = d.set_id),"
        "  (SELECT min(at) FROM acc WHERE acc.set_id = d.set_id),"
        "  (SELECT max(at) FROM acc WHERE acc.set_id = d.set_id),"
        "  count(DISTINCT d.set_part), count(DISTINCT CASE WHEN dl.at IS NOT NULL THEN d.set_part END), max(dl.at),"
        "  count(DISTINCT CASE WHEN rc.at IS NOT NULL THEN d.set_part END), max(rc.at),"
        "  (SELECT detail FROM events r WHERE r.kind = 'receipt' AND r.set_id = d.set_id AND r.site = d.site"
        "    ORDER BY r.at DESC LIMIT 1),"
        "  (SELECT count(*) FROM mailbox b JOIN sites s ON s.id = b.site_id"
        "    WHERE s.name = d.site AND b.fetched_at IS NULL AND b.queue_id IN"
        "     (SELECT queue_id FROM acc WHERE acc.set_id = d.set_id))"
        " FROM dlv d LEFT JOIN dl ON dl.queue_id = d.queue_id AND dl.site = d.site"
        " LEFT JOIN rc ON rc.queue_id = d.queue_id AND rc.site = d.site"
        " GROUP BY d.set_id, d.site ORDER BY 6 DESC, 1, 2",
        (since, float("inf") if until is None else until),
    ).fetchall()


# ---- writes (one transaction each) -------------------------------------------------------------

_ENTRY = (
    "SELECT b.uid, b.queue_id, b.delivered_at, b.rcpt, m.size, m.sender_site, m.message_id, m.set_id, m.set_part,"
    " m.set_total, m.sha256, (SELECT name FROM sites WHERE id = m.sender_site)"
    " FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id WHERE b.uid = ? AND b.site_id = ?"
    " AND b.fetched_at IS NULL"
)


def expire(
    conn: sql.Connection, now: float, groups: Sequence[ExpiryGroup]
) -> tuple[list[tuple[int, int, int | None, int, bool]], dict[str, Any]]:
    """Remove the groups' entries that are still unfetched, with an `expired` event and audit record
    (storage/audit.py, actor "hub") each and, per
    group with a sender, one expiry notice (queued in the outbox). Returns the removed entries
    [(site_id, uid, sender_site, size, was_waiting)] and a summary {"mails", "bytes", "notices",
    "expired": [(site, queue_id, size, sha256, message_id, set_id)]} (the last for the audit)."""
    removed: list[tuple[int, int, int | None, int, bool]] = []
    tracked: list[tuple[Any, ...]] = []
    summary: dict[str, Any] = {"mails": 0, "bytes": 0, "notices": 0, "expired": []}
    for group in groups:
        why = f"not fetched within {group.retention_days:g} days"
        mails = []
        for uid in group.uids:
            # (locked: a concurrent expiry of the same entry - two leaders for a moment - waits and
            # skips it, where both counted it, recorded it and sent the sender two notices)
            row = conn.execute(_ENTRY + sql.LOCK_ENTRY[sql.dialect(conn)], (uid, group.site_id)).fetchone()
            if row is None:  # fetched or deleted meanwhile
                continue
            _, qid, delivered_at, rcpt, size, sender_site, message_id, set_id, set_part, set_total, sha256, sender = row
            audit.record_entries(conn, audit.EXPIRED, group.site_id, [uid], audit.HUB_ACTOR, why, now)
            conn.execute("DELETE FROM mailbox WHERE uid = ?", (uid,))
            removed.append((group.site_id, uid, sender_site, size, True))
            tracked.append(
                events.row(
                    events.Event(
                        now,
                        EXPIRED,
                        qid,
                        group.site,
                        sender,
                        size=size,
                        message_id=message_id,
                        set_id=set_id,
                        set_part=set_part,
                        set_total=set_total,
                        detail=why,
                    )
                )
            )
            mails.append(
                {
                    "queue_id": qid,
                    "message_id": message_id,
                    "rcpt": rcpt,
                    "set_part": set_part,
                    "set_total": set_total,
                    "size": size,
                    "delivered_at": delivered_at,
                }
            )
            summary["expired"].append((group.site, qid, size, sha256, message_id, set_id))
            summary["mails"] += 1
            summary["bytes"] += size
        if mails and group.sender:
            facts = {
                "site": group.site,
                "set_id": group.set_id,
                "retention_days": group.retention_days,
                "expired_at": now,
                "mails": mails,
            }
            _queue_notice(conn, now, EXPIRY_DSN, group.sender, facts)
            summary["notices"] += 1
    conn.executemany(events.INSERT, tracked)
    return removed, summary


def warn(conn: sql.Connection, now: float, groups: Sequence[WarningGroup]) -> int:
    """Mark the groups' entries that are still unfetched and unwarned as warned, and queue one
    warning per group to its site; the number of notices queued."""
    queued = 0
    for group in groups:
        mails = []
        for uid in group.uids:
            row = conn.execute(
                _ENTRY + " AND b.warned_at IS NULL" + sql.LOCK_ENTRY[sql.dialect(conn)], (uid, group.site_id)
            ).fetchone()
            if row is None:
                continue
            conn.execute("UPDATE mailbox SET warned_at = ? WHERE uid = ?", (now, uid))
            _, qid, delivered_at, _, size, _, message_id, set_id, set_part, set_total, _, sender = row
            mails.append(
                {
                    "queue_id": qid,
                    "message_id": message_id,
                    "set_id": set_id,
                    "set_part": set_part,
                    "set_total": set_total,
                    "size": size,
                    "from_site": sender,
                    "delivered_at": delivered_at,
                    "expires_at": group.expires_at.get(uid),
                }
            )
        if mails and group.rcpt:
            _queue_notice(conn, now, EXPIRY_WARNING, group.rcpt, {"site": group.site, "mails": mails})
            queued += 1
    return queued


def quota_crossed(
    conn: sql.Connection,
    now: float,
    site_id: int,
    crossed: Sequence[int],
    left: Sequence[int],
    notices: Sequence[tuple[str, str, dict[str, Any]]],
) -> None:
    """Record the levels a site's mailbox crossed (and forget those it fell below), with the
    notices (kind, rcpt, facts) the crossing owes, in one transaction: a restart resends none."""
    conn.executemany("DELETE FROM quota_warnings WHERE site_id = ? AND level = ?", [(site_id, lv) for lv in left])
    conn.executemany(
        "INSERT INTO quota_warnings (site_id, level, crossed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        [(site_id, level, now) for level in crossed],
    )
    for kind, rcpt, facts in notices:
        _queue_notice(conn, now, kind, rcpt, facts)


def notice_done(conn: sql.Connection, notice_id: int) -> None:
    """A notice that cannot be sent (no mailbox or route for its recipient) counts as sent."""
    conn.execute(  # SQLite's max(value, ?) on both engines (no NULL here: value is NOT NULL)
        "UPDATE meta SET value = CASE WHEN value >= ? THEN value ELSE ? END WHERE key = ?",
        (notice_id, notice_id, NOTICE_MARK),
    )


def prune_notices(conn: sql.Connection) -> int:
    """Delete the notices sent (the outbox keeps its newest row: AUTOINCREMENT never reuses an id)."""
    return conn.execute(
        "DELETE FROM lifecycle_notices WHERE id <= (SELECT value FROM meta WHERE key = ?)", (NOTICE_MARK,)
    ).rowcount


def record_receipt(
    conn: sql.Connection,
    at: float,
    mdn_queue_id: str,
    site: str | None,
    sender: str,
    original_message_id: str,
    disposition: str,
) -> dict[str, Any] | None:
    """Link a receipt (MDN) to the mail it answers, by the Original-Message-ID: a `receipt` event
    on that mail (the latest accepted with that Message-ID that went where the receipt comes from:
    delivered to the receipt's site, or, for a receipt from another network (no site), relayed
    out). A receipt naming a mail that never reached its sender links to nothing: one site cannot
    acknowledge another's mail. Returns the answered mail's {queue_id, set_id, set_part} or None if
    none is known (the event is written all the same, with the Message-ID only)."""
    if site is not None:
        went = "d.kind = 'delivered' AND d.site = ?"
        args: tuple[Any, ...] = (original_message_id, site)
    else:
        went = "d.kind = 'relayed'"
        args = (original_message_id,)
    found = conn.execute(
        "SELECT a.queue_id, a.site, a.set_id, a.set_part, a.set_total FROM events a"
        " WHERE a.kind = 'accepted' AND a.message_id = ?"
        f" AND EXISTS (SELECT 1 FROM events d WHERE d.queue_id = a.queue_id AND {went})"
        " ORDER BY a.at DESC LIMIT 1",
        args,
    ).fetchone()
    qid, from_site, set_id, set_part, set_total = found if found is not None else (None, None, None, None, None)
    detail = f"{disposition[:200]} [mdn {mdn_queue_id}]"
    conn.execute(
        events.INSERT,
        events.row(
            events.Event(
                at,
                RECEIPT,
                qid,
                site,
                from_site,
                sender=sender,
                message_id=original_message_id,
                set_id=set_id,
                set_part=set_part,
                set_total=set_total,
                detail=detail[:_MAX_DETAIL],
            )
        ),
    )
    return None if qid is None else {"queue_id": qid, "set_id": set_id, "set_part": set_part}


def disposition_of(detail: str | None) -> str | None:
    """The disposition a `receipt` event's detail holds."""
    if detail is None:
        return None
    return detail.rsplit(" [mdn ", 1)[0]


def _queue_notice(conn: sql.Connection, now: float, kind: str, rcpt: str, facts: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO lifecycle_notices (kind, created_at, rcpt, facts) VALUES (?, ?, ?, ?)",
        (kind, now, rcpt, json.dumps(facts, separators=(",", ":"))),
    )

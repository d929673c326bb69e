# `mailhub stats` and the live part of `mailhub site show`: volumes per site and per pair of sites
# over a period, refusals and deferrals by reason and site (from the tracking events), and the
# backlogs waiting now and each site's liveness (from the mailbox table), read through
# storage.reports and storage.liveness on a connection the caller opens. Must never write to the
# index, nor hold SQL of its own (it lives in storage/).
import calendar
import re
import sqlite3
import time

from storage import lifecycle, reports
from storage import liveness as storage_liveness

from . import liveness
from .report_format import human_size, iso_time, printable

_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S")
# events kind -> (messages key, bytes key) of a site's line
_SITE_COLUMNS = {
    "accepted": ("submitted_messages", "submitted_bytes"),
    "delivered": ("received_messages", "received_bytes"),
    "downloaded": ("downloaded_messages", "downloaded_bytes"),
    "deleted": ("deleted_messages", None),
    "refused": ("refused", None),
    "deferred": ("deferred", None),
}
ACTIVITY_WINDOW = 3600.0  # seconds of recent activity that `site show` reports


def parse_when(text: str, now: float) -> float:
    """'24h', '30m', '7d', '2w' (that long before now), 'now', or a UTC date/time such as
    '2026-11-01' or '2026-11-01T12:00'; raises ValueError."""
    text = text.strip()
    span = _SPAN.match(text)
    if span:
        return now - float(span.group(1)) * _UNITS[span.group(2)]
    if text == "now":
        return now
    for fmt in _DATE_FORMATS:
        try:
            return float(calendar.timegm(time.strptime(text.removesuffix("Z"), fmt)))
        except ValueError:
            pass
    raise ValueError(f"expected a span like 24h or 7d, or a UTC date like 2026-11-01 or 2026-11-01T12:00, got {text!r}")


def report(
    conn: sqlite3.Connection,
    since: float,
    until: float,
    top: int = 10,
    stale_after: float = 21600.0,
    now: float | None = None,
) -> dict:
    """The --json output of `mailhub stats` for [since, until); liveness as of `now`."""
    sites: dict[str, dict] = {}
    pairs: dict[tuple[str, str], dict] = {}
    # one pass over the period: per site and kind, and per pair of sites
    for kind, site, peer_site, count, size in reports.volumes(conn, since, until):
        line = sites.setdefault(site, {"site": site, **{k: 0 for pair in _SITE_COLUMNS.values() for k in pair if k}})
        messages_key, bytes_key = _SITE_COLUMNS.get(kind, (None, None))
        if messages_key:
            line[messages_key] += count
        if bytes_key:
            line[bytes_key] += size
        if kind == "delivered":
            pairs[(peer_site, site)] = {"from": peer_site, "to": site, "messages": count, "bytes": size}
    refusals = [
        {"kind": kind, "site": site, "to_site": to_site, "reply": reply, "count": count, "last_at": iso_time(last)}
        for kind, site, to_site, reply, count, last in reports.refusal_counts(conn, since, until)
    ]
    lines = sorted(sites.values(), key=lambda s: s["site"])
    totals = {
        key: sum(s[key] for s in lines)
        for key in (
            "submitted_messages",
            "submitted_bytes",
            "received_messages",
            "received_bytes",
            "downloaded_messages",
            "downloaded_bytes",
            "refused",
            "deferred",
        )
    }
    return {
        "since": iso_time(since),
        "until": iso_time(until),
        "totals": totals,
        "sites": lines,
        "pairs": sorted(pairs.values(), key=lambda p: (-p["bytes"], p["from"], p["to"])),
        "refusals": refusals,
        "backlogs": backlogs(conn, top),
        "studies": studies(conn, since, until, top),
        "liveness": liveness_report(conn, stale_after, time.time() if now is None else now),
    }


def studies(conn: sqlite3.Connection, since: float, until: float, top: int) -> list[dict]:
    """The latest `top` studies with a part accepted in [since, until), per receiving site: parts
    accepted, delivered, fetched and acknowledged by a receipt (and its disposition), with times."""
    found = []
    for row in lifecycle.study_rows(conn, since, until)[:top]:
        (
            set_id,
            site,
            total,
            parts,
            first,
            last,
            delivered,
            fetched,
            last_fetch,
            acked,
            last_receipt,
            detail,
            waiting,
        ) = row
        found.append(
            {
                "set_id": set_id,
                "site": site,
                "set_total": total,
                "parts_accepted": parts,
                "first_accepted_at": iso_time(first),
                "last_accepted_at": iso_time(last),
                "parts_delivered": delivered,
                "parts_fetched": fetched,
                "last_fetched_at": iso_time(last_fetch),
                "parts_acknowledged": acked,
                "last_receipt_at": iso_time(last_receipt),
                "disposition": lifecycle.disposition_of(detail),
                "parts_waiting": waiting,
            }
        )
    return found


def liveness_report(conn: sqlite3.Connection, stale_after: float, now: float) -> list[dict]:
    """Every site's liveness (mailhub/liveness.py), stale ones first, then by oldest waiting mail."""
    lines = [liveness.summary(s, stale_after, now) for s in storage_liveness.read(conn)]
    return sorted(lines, key=lambda s: (not s["stale"], -s["oldest_waiting_age_seconds"], s["site"]))


def site_liveness(conn: sqlite3.Connection, site_id: int, stale_after: float, now: float) -> dict:
    """One site's liveness for `mailhub site show`."""
    return liveness.summary(storage_liveness.read(conn, site_id)[0], stale_after, now)


def backlogs(conn: sqlite3.Connection, top: int, site_id: int | None = None) -> list[dict]:
    """Mail waiting now (not fetched yet by its site, fetched and kept is not waiting), the largest
    backlogs first (or one site's)."""
    return [
        {"site": name, "messages": count, "bytes": size, "oldest_at": iso_time(oldest)}
        for name, count, size, oldest in reports.backlogs(conn, top, site_id)
    ]


def site_activity(
    conn: sqlite3.Connection, site_id: int, name: str, now: float, window: float = ACTIVITY_WINDOW
) -> dict:
    """One site's recent activity from the tracking record (beside the server's throttle state):
    the oldest mail waiting for it, what it downloaded in the last `window` seconds, and how its
    submissions, and mail sent to it, were refused or deferred in that time."""
    since = now - window
    messages, octets = reports.downloads_since(conn, name, since)
    waiting = backlogs(conn, 1, site_id)
    return {
        "window_seconds": window,
        "oldest_waiting_at": waiting[0]["oldest_at"] if waiting else None,
        "downloaded_messages": messages,
        "downloaded_bytes": octets,
        "download_rate_bytes_per_second": octets / window,
        "refusals_as_sender": _refusals(conn, "site", name, since),
        "refusals_as_recipient": _refusals(conn, "peer_site", name, since),
    }


def _refusals(conn: sqlite3.Connection, column: str, name: str, since: float) -> list[dict]:
    return [
        {"kind": kind, "reply": reply, "count": count, "last_at": iso_time(last)}
        for kind, reply, count, last in reports.refusals_since(conn, column, name, since)
    ]


# ---- text output -----------------------------------------------------------------------------


def render(r: dict) -> str:
    t = r["totals"]
    lines = [
        f"period {r['since']} .. {r['until']}",
        f"accepted {t['submitted_messages']} mail(s), {human_size(t['submitted_bytes'])}; delivered"
        f" {t['received_messages']} mailbox entries, {human_size(t['received_bytes'])}; downloaded"
        f" {t['downloaded_messages']}, {human_size(t['downloaded_bytes'])}; refused {t['refused']},"
        f" deferred {t['deferred']}",
        "",
        f"{'site':<20} {'submitted':>20} {'received':>20} {'downloaded':>20} {'refused':>8} {'deferred':>8}",
    ]
    for s in r["sites"]:
        lines.append(
            f"{s['site']:<20} {_volume(s['submitted_messages'], s['submitted_bytes']):>20}"
            f" {_volume(s['received_messages'], s['received_bytes']):>20}"
            f" {_volume(s['downloaded_messages'], s['downloaded_bytes']):>20}"
            f" {s['refused']:>8} {s['deferred']:>8}"
        )
    lines += ["", f"{'from':<20} {'to':<20} {'volume':>20}"]
    lines += [f"{p['from']:<20} {p['to']:<20} {_volume(p['messages'], p['bytes']):>20}" for p in r["pairs"]]
    lines += ["", "refusals and deferrals:" if r["refusals"] else "refusals and deferrals: none"]
    lines += [f"  {x['count']:>6} x {x['kind']:<8} {x['site']} -> {x['to_site']}: {x['reply']}" for x in r["refusals"]]
    lines += ["", "backlogs now (not fetched yet):" if r["backlogs"] else "backlogs now: none"]
    lines += [
        f"  {b['site']:<20} {_volume(b['messages'], b['bytes']):>20}  oldest {b['oldest_at']}" for b in r["backlogs"]
    ]
    stale = [s for s in r["liveness"] if s["stale"]]
    lines += ["", f"liveness: {len(stale)} stale site(s) of {len(r['liveness'])}"]
    shown = [s for s in r["liveness"] if s["stale"] or s["waiting_messages"]][: max(len(stale), len(r["backlogs"]))]
    lines += [f"  {s['site']:<20} {liveness.render(s)}" for s in shown]
    lines += ["", "studies (per receiving site):" if r.get("studies") else "studies: none"]
    for st in r.get("studies", []):
        receipt = (
            f", receipts {st['parts_acknowledged']} (last {st['last_receipt_at']}: {st['disposition']})"
            if st["parts_acknowledged"]
            else ", no receipt"
        )
        lines.append(
            f"  {st['set_id']} -> {st['site']}: accepted {st['parts_accepted']} of {st['set_total'] or '?'}"
            f" (last {st['last_accepted_at']}), fetched {st['parts_fetched']}"
            f"{' (last ' + st['last_fetched_at'] + ')' if st['last_fetched_at'] else ''}{receipt}"
        )
    return "\n".join(printable(line) for line in lines)


def render_activity(a: dict) -> list[str]:
    minutes = a["window_seconds"] / 60
    lines = [
        f"last {minutes:.0f} min: downloaded {a['downloaded_messages']} mail(s),"
        f" {human_size(a['downloaded_bytes'])}"
        f" ({human_size(a['download_rate_bytes_per_second'])}/s)"
    ]
    if a["oldest_waiting_at"]:
        lines.append(f"oldest waiting: {a['oldest_waiting_at']}")
    for label, key in (
        ("refused/deferred as sender", "refusals_as_sender"),
        ("refused/deferred for its mailbox", "refusals_as_recipient"),
    ):
        for x in a[key]:
            lines.append(f"{label}: {x['count']} x {x['reply']} (last {x['last_at']})")
    return lines


def _volume(messages: int, octets: int) -> str:
    return f"{messages} / {human_size(octets)}"

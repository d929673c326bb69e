# `mailhub trace QUERY`: where is a mail or a study? Reads the tracking events (storage/events.py)
# through storage.reports on a read-only connection, so it runs beside a live hub. QUERY is a queue ID, a Message-ID, a
# sender or recipient address or an X-TELEMEDICINE-SETID (guessed, or named by a flag). Builds one
# path per mail (accepted, delivered, downloaded, deleted, relay attempts, refusals) and, for a set,
# the study view.
# Must never write to the index, nor hold SQL of its own (it lives in storage/).
import re
import sqlite3
from dataclasses import dataclass, field

from storage import reports
from storage.events import COLUMNS, Event
from storage.lifecycle import disposition_of

from .report_format import human_size, iso_time, printable

QUEUE_ID = re.compile(r"[0-9A-F]{19}\Z")  # storage.spool.new_queue_id
KINDS = {
    "queue-id": "a queue ID",
    "message-id": "a Message-ID",
    "address": "a sender or recipient address",
    "set": "an X-TELEMEDICINE-SETID",
}


@dataclass
class Recipient:
    site: str
    rcpt: str | None = None
    delivered_at: float | None = None
    downloads: list[Event] = field(default_factory=list)
    deleted_at: float | None = None
    expired_at: float | None = None  # removed unfetched after the site's retention
    receipts: list[Event] = field(default_factory=list)  # the site's receipts (MDNs) for the mail

    @property
    def state(self) -> str:
        if self.expired_at is not None:
            return "expired"
        if self.deleted_at is not None:
            return "deleted"
        return "downloaded" if self.downloads else "waiting"


@dataclass
class RemoteRecipient:
    """A recipient of another network, as its relay attempts left it."""

    rcpt: str
    state: str = "queued"  # relayed, retrying (the next hop deferred it) or bounced
    attempts: int = 0
    hop: str | None = None
    last_reply: str | None = None
    at: float | None = None


_RELAY_STATES = {"relayed": "relayed", "relay_deferred": "retrying", "bounced": "bounced"}


@dataclass
class Mail:
    queue_id: str
    events: list[Event] = field(default_factory=list)
    accepted: Event | None = None
    recipients: dict[str, Recipient] = field(default_factory=dict)
    remote: dict[str, RemoteRecipient] = field(default_factory=dict)

    def add(self, e: Event) -> None:
        self.events.append(e)
        if e.kind == "accepted":
            self.accepted = e
        elif e.kind in ("delivered", "downloaded", "deleted", "expired", "receipt"):
            r = self.recipients.setdefault(e.site or "-", Recipient(e.site or "-"))
            if e.kind == "delivered":
                r.rcpt, r.delivered_at = e.rcpt, e.at
            elif e.kind == "downloaded":
                r.downloads.append(e)
            elif e.kind == "receipt":
                r.receipts.append(e)
            else:
                r.deleted_at = e.at
                if e.kind == "expired":
                    r.expired_at = e.at
        elif e.kind in _RELAY_STATES:
            remote = self.remote.setdefault(e.rcpt or "-", RemoteRecipient(e.rcpt or "-"))
            remote.state, remote.last_reply, remote.at = _RELAY_STATES[e.kind], e.detail, e.at
            if e.peer is not None:  # an attempt (a bounce at the end of the lifetime without a route is none)
                remote.attempts += 1
                remote.hop = e.peer


def detect(conn: sqlite3.Connection, query: str) -> str:
    """The kind of QUERY: a queue ID by its form, <...> a Message-ID, an address the hub knows (a
    site's or one seen in the events) an address, anything else with '@' a Message-ID, else a set."""
    if QUEUE_ID.match(query):
        return "queue-id"
    if query.startswith("<") and query.endswith(">"):
        return "message-id"
    if "@" in query:
        return "address" if reports.address_known(conn, query) else "message-id"
    return "set"


def trace(conn: sqlite3.Connection, query: str, kind: str | None = None, limit: int = 100) -> dict:
    """Everything known about QUERY, as plain data (the --json output)."""
    kind = kind or detect(conn, query)
    refusals: list[Event] = []  # an address's refusals (those of a mail are listed with the mail)
    if kind == "queue-id":
        queue_ids = [query]
    elif kind == "message-id":
        ids = (query, query if query.startswith("<") else f"<{query}>")
        queue_ids = reports.queue_ids_by_message_id(conn, ids)
    elif kind == "set":
        queue_ids = reports.queue_ids_by_set(conn, query)
    else:
        queue_ids, refusals = _by_address(conn, query, limit)
    mails = _mails(conn, queue_ids, by_part=kind == "set")
    result: dict[str, object] = {
        "query": query,
        "looked_up_as": kind,
        "mails": [_mail_json(m) for m in mails],
        "refusals": [_refusal_json(e) for e in refusals],
    }
    if kind == "set":
        result["study"] = study(query, mails)
    return result


def _by_address(conn: sqlite3.Connection, address: str, limit: int) -> tuple[list[str], list[Event]]:
    """The latest `limit` mails from or to the address (queue IDs), and its latest refusals."""
    latest: dict[str, float] = {}
    refusals: list[Event] = []
    for column, kinds in (("sender", ("accepted",)), ("rcpt", ("delivered", *_RELAY_STATES))):
        for kind in kinds:
            for queue_id, at in reports.latest_mails_of(conn, column, address, kind, limit):
                latest[queue_id] = max(at, latest.get(queue_id, at))
        for kind in ("refused", "deferred"):
            refusals += reports.latest_events_of(conn, column, address, kind, limit)
    queue_ids = sorted(latest, key=latest.__getitem__, reverse=True)[:limit]
    unique = {(e.at, e.kind, e.queue_id, e.sender, e.rcpt): e for e in refusals}  # sender = rcpt: once
    return queue_ids, sorted(unique.values(), key=lambda e: e.at)[-limit:]


def _mails(conn: sqlite3.Connection, queue_ids: list[str], by_part: bool) -> list[Mail]:
    """The mails' paths in time order (a set's in part order)."""
    mails = {q: Mail(q) for q in queue_ids}
    for event in reports.events_of_mails(conn, queue_ids):
        assert event.queue_id is not None  # selected by queue ID
        mails[event.queue_id].add(event)
    found = [m for m in mails.values() if m.events]
    if by_part:
        return sorted(found, key=lambda m: ((m.accepted.set_part or 0) if m.accepted else 0, m.events[0].at))
    return sorted(found, key=lambda m: m.events[0].at)


def study(set_id: str, mails: list[Mail]) -> dict:
    """The study view of a set: parts received of SETTOTAL, per recipient site how many parts were
    delivered, downloaded, deleted and are waiting, first and last times."""
    accepted = [m.accepted for m in mails if m.accepted is not None]
    parts = {a.set_part for a in accepted if a.set_part is not None}
    totals = {a.set_total for a in accepted if a.set_total is not None}
    total = max(totals) if totals else None
    recipients: dict[str, dict] = {}
    for m in mails:
        for r in m.recipients.values():
            s = recipients.setdefault(
                r.site,
                {
                    "site": r.site,
                    "delivered": 0,
                    "downloaded": 0,
                    "deleted": 0,
                    "expired": 0,
                    "waiting": 0,
                    "first_download_at": None,
                    "last_download_at": None,
                    "acknowledged": 0,
                    "last_receipt_at": None,
                    "disposition": None,
                },
            )
            s["delivered"] += r.delivered_at is not None
            s["downloaded"] += bool(r.downloads)
            s["deleted"] += r.deleted_at is not None and r.expired_at is None
            s["expired"] += r.expired_at is not None
            s["acknowledged"] += bool(r.receipts)
            for receipt in r.receipts:
                if s["last_receipt_at"] is None or receipt.at >= s["last_receipt_at"]:
                    s["last_receipt_at"], s["disposition"] = receipt.at, disposition_of(receipt.detail)
            # waiting: not fetched yet by its site (a mail fetched and kept is no longer waiting)
            s["waiting"] += r.delivered_at is not None and r.state == "waiting"
            for d in r.downloads:
                s["first_download_at"] = _earliest(s["first_download_at"], d.at)
                s["last_download_at"] = max(s["last_download_at"] or d.at, d.at)
    for s in recipients.values():
        for key in ("first_download_at", "last_download_at", "last_receipt_at"):
            s[key] = iso_time(s[key])
    times = [a.at for a in accepted]
    return {
        "set_id": set_id,
        "parts_received": len(parts),
        "set_total": total,
        "missing_parts": sorted(set(range(1, total + 1)) - parts) if total and total < 100000 else [],
        "mails_accepted": len(accepted),
        "bytes": sum(a.size or 0 for a in accepted),
        "senders": sorted({a.site or "-" for a in accepted}),
        "first_accepted_at": iso_time(min(times)) if times else None,
        "last_accepted_at": iso_time(max(times)) if times else None,
        "recipients": sorted(recipients.values(), key=lambda s: s["site"]),
        "refusals": sum(1 for m in mails for e in m.events if e.kind in ("refused", "deferred")),
    }


def _earliest(current: float | None, value: float) -> float:
    return value if current is None else min(current, value)


def _mail_json(m: Mail) -> dict:
    a = m.accepted
    return {
        "queue_id": m.queue_id,
        "message_id": a.message_id if a else next((e.message_id for e in m.events if e.message_id), None),
        "set_id": a.set_id if a else next((e.set_id for e in m.events if e.set_id), None),
        "set_part": a.set_part if a else None,
        "set_total": a.set_total if a else None,
        "accepted_at": iso_time(a.at) if a else None,
        "size": a.size if a else None,
        "sha256": a.detail if a else None,
        "from_site": a.site if a else None,
        "sender": a.sender if a else None,
        "client": a.peer if a else None,
        "recipients": [
            {
                "site": r.site,
                "rcpt": r.rcpt,
                "state": r.state,
                "delivered_at": iso_time(r.delivered_at),
                "downloads": [{"at": iso_time(d.at), "protocol": d.detail, "client": d.peer} for d in r.downloads],
                "deleted_at": iso_time(r.deleted_at),
                "expired_at": iso_time(r.expired_at),
                "receipts": [{"at": iso_time(e.at), "disposition": disposition_of(e.detail)} for e in r.receipts],
            }
            for r in m.recipients.values()
        ],
        "remote_recipients": [
            {
                "rcpt": r.rcpt,
                "state": r.state,
                "attempts": r.attempts,
                "hop": r.hop,
                "last_reply": r.last_reply,
                "at": iso_time(r.at),
            }
            for r in m.remote.values()
        ],
        "refusals": [_refusal_json(e) for e in m.events if e.kind in ("refused", "deferred")],
        "events": [_event_json(e) for e in m.events],
    }


def _event_json(e: Event) -> dict:
    values = ((name, getattr(e, name)) for name in COLUMNS)
    return {k: (iso_time(v) if k == "at" else v) for k, v in values if v is not None}


def _refusal_json(e: Event) -> dict:
    return {
        "at": iso_time(e.at),
        "kind": e.kind,
        "code": (e.detail or "")[:3],
        "reply": e.detail,
        "site": e.site,
        "sender": e.sender,
        "rcpt": e.rcpt,
        "client": e.peer,
        "queue_id": e.queue_id,
    }


# ---- text output -----------------------------------------------------------------------------


def render(result: dict) -> str:
    lines = []
    if "study" in result:
        lines += _render_study(result["study"])
    for mail in result["mails"]:
        lines += [""] if lines else []
        lines += _render_mail(mail)
    if result["refusals"]:
        lines += [""] if lines else []
        lines.append(f"refusals and deferrals of {result['query']} ({len(result['refusals'])}):")
        lines += ["  " + _refusal_line(r) for r in result["refusals"]]
    return "\n".join(printable(line) for line in lines)


def _render_study(s: dict) -> list[str]:
    total = s["set_total"] if s["set_total"] is not None else "?"
    lines = [
        f"study {s['set_id']}: {s['parts_received']} of {total} part(s) received"
        f" ({s['mails_accepted']} mail(s), {human_size(s['bytes'])}) from {', '.join(s['senders']) or '-'}",
        f"  first accepted {s['first_accepted_at'] or '-'}, last accepted {s['last_accepted_at'] or '-'}",
    ]
    if s["missing_parts"]:
        lines.append(f"  missing parts: {_ranges(s['missing_parts'])}")
    if s["recipients"]:
        lines.append(
            f"  {'recipient':<20} {'downloaded':>13} {'deleted':>8} {'expired':>8} {'waiting':>8}"
            "  first / last download"
        )
    for r in s["recipients"]:
        lines.append(
            f"  {r['site']:<20} {r['downloaded']:>5} of {r['delivered']:<4}"
            f" {r['deleted']:>8} {r['expired']:>8} {r['waiting']:>8}"
            f"  {r['first_download_at'] or '-'} / {r['last_download_at'] or '-'}"
        )
        if r["acknowledged"]:
            lines.append(
                f"  {'':<20} receipts for {r['acknowledged']} of {r['delivered']} part(s), last"
                f" {r['last_receipt_at']}: {r['disposition']}"
            )
    if s["refusals"]:
        lines.append(f"  refused or deferred attempts: {s['refusals']}")
    return lines


def _render_mail(m: dict) -> list[str]:
    head = f"mail {m['queue_id']}"
    if m["set_id"]:
        head += f" set {m['set_id']} part {m['set_part'] or '?'}/{m['set_total'] or '?'}"
    if m["message_id"]:
        head += f" Message-ID {m['message_id']}"
    lines = [head]
    for e in m["events"]:
        lines.append(f"  {e['at']}  {e['kind']:<10}  {_describe(e)}")
    waiting = [r["site"] for r in m["recipients"] if r["state"] not in ("deleted", "expired")]
    if waiting:
        lines.append(f"  still in the mailbox of: {', '.join(waiting)}")
    retrying = [f"<{r['rcpt']}>" for r in m["remote_recipients"] if r["state"] == "retrying"]
    if retrying:
        lines.append(f"  still queued for: {', '.join(retrying)}")
    return lines


def _describe(e: dict) -> str:
    kind = e["kind"]
    if kind == "accepted":
        return (
            f"from {e.get('site', '-')} <{e.get('sender', '')}> [{e.get('peer', '-')}],"
            f" {human_size(e.get('size', 0))}, sha256 {e.get('detail', '-')}"
        )
    if kind == "delivered":
        return f"to {e.get('site', '-')} <{e.get('rcpt', '')}>"
    if kind == "downloaded":
        return (
            f"by {e.get('site', '-')} over {e.get('detail', '?')} [{e.get('peer', '-')}],"
            f" {human_size(e.get('size', 0))}"
        )
    if kind == "expired":
        return f"from the mailbox of {e.get('site', '-')}: {e.get('detail', '-')}"
    if kind == "receipt":
        return f"receipt from {e.get('site', '-')} <{e.get('sender', '')}>: {e.get('detail', '-')}"
    if kind == "deleted":
        how = e.get("detail", "?")
        return f"from the mailbox of {e.get('site', '-')} ({how}{' [' + e['peer'] + ']' if 'peer' in e else ''})"
    if kind in _RELAY_STATES:
        via = f" via {e['peer']}" if "peer" in e else ""
        return f"to <{e.get('rcpt', '')}>{via}: {e.get('detail', '-')}"
    return _refusal_line(
        {
            "reply": e.get("detail"),
            "site": e.get("site"),
            "sender": e.get("sender"),
            "rcpt": e.get("rcpt"),
            "client": e.get("peer"),
        },
        with_time=False,
    )


def _refusal_line(r: dict, with_time: bool = True) -> str:
    who = f"{r.get('site') or '-'} <{r.get('sender') or ''}> [{r.get('client') or '-'}]"
    target = f" to <{r['rcpt']}>" if r.get("rcpt") else ""
    prefix = f"{r['at']}  {r['kind']:<10}  " if with_time else ""
    return f"{prefix}{who}{target}: {r.get('reply')}"


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)

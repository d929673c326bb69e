# The mailbox changes one hub node tells the others (issue 27: several nodes on one PostgreSQL
# index): what storage.store.MailboxListener hears (committed, fetched_committed, removed, with the
# calls' arguments), the sites whose IMAP flags changed (IDLE sessions show them), plus the live
# downloads and polls the throttle's drain rates measure and its reservations of mails in flight (a
# snapshot of the node's whole set, in a payload of its own: reservations_payload), as the
# payloads of NOTIFY on the channel `mailhub_events`, each naming the node that sent it. The index
# writer sends the mailbox changes in the same transaction as the change (delivered at its commit,
# never for a rolled-back one); the node's cluster link (storage/postgres/cluster.py) sends the
# downloads and receives everything. Payloads stay under PostgreSQL's 8000-byte limit: a long list
# is split over several NOTIFYs. A payload of committed rows from a group commit names its number
# ("k"), and a reservations snapshot the node's last group commit counted when it was taken: the
# two travel on different connections, and the others tell by it a snapshot older than a commit
# they heard (quotas/ledger.py).
# Must never import psycopg (the PostgreSQL extra is optional) nor trust a payload: anything that
# does not decode into the expected shape is refused with one line (any database user may NOTIFY);
# its figures are bounded (ids positive, sizes up to 1 TiB, a commit's time not days ahead).
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Final

from . import sql

CHANNEL: Final = "mailhub_events"
# A question to every node (`mailhub sessions --all`, `--kick SITE`): {"q": QUESTION, "r": REPLY CHANNEL,
# "a": ARGUMENT (a site name, only for sessions.kick)}; each node answers on the reply channel with its
# rows, split over payloads {"n", "k": part, "of": parts, "rows"}
ASK_CHANNEL: Final = "mailhub_ask"
QUESTIONS: Final = ("sessions", "sessions.kick")
ARGUMENT_MAX: Final = 200  # characters of a question's argument
REPLY_CHANNEL: Final = re.compile(r"mailhub_reply_[0-9a-f]{16}")
MAX_ANSWER_ROWS: Final = 10_000
MAX_PAYLOAD: Final = 7800  # bytes; PostgreSQL refuses a payload of 8000 or more
NODE_MAX: Final = 200  # characters of a node name


class BadPayload(ValueError):
    """A payload on the channel that is not one of ours (its reason in one line)."""


@dataclass(slots=True)
class Changes:
    """What one node tells: rows of each kind (the listener calls' arguments, in order)."""

    node: str
    committed: list[tuple[int | None, list[int], int, float]] = field(default_factory=list)
    fetched: list[tuple[int, int, int | None, int]] = field(default_factory=list)  # site, uid, sender, size
    removed: list[tuple[int, int, int | None, int, bool]] = field(default_factory=list)
    downloaded: list[tuple[int, int]] = field(default_factory=list)  # site, bytes sent (live)
    polled: list[int] = field(default_factory=list)  # sites that logged in
    flagged: list[int] = field(default_factory=list)  # sites whose IMAP flags changed
    # the node's reservations in flight, all of them (None: not in this payload): rows (receiver,
    # sender or 0, bytes, mails) and the senders' submitted bytes (sender, bytes)
    reserved: list[tuple[int, int, int, int]] | None = None
    submitting: list[tuple[int, int]] = field(default_factory=list)
    # the node's group commit: of the committed rows, or for a snapshot the last one it had counted
    seq: int | None = None

    def __len__(self) -> int:
        return (
            len(self.committed)
            + len(self.fetched)
            + len(self.removed)
            + len(self.downloaded)
            + len(self.polled)
            + len(self.flagged)
        )


_KINDS: Final = ("committed", "fetched", "removed", "downloaded", "polled", "flagged")
_KEYS: Final = {"committed": "c", "fetched": "f", "removed": "r", "downloaded": "d", "polled": "p", "flagged": "g"}


# rows of a reservations snapshot (and of its senders), so that it fits one payload whatever the
# figures (100 x 49 + 50 x 28 bytes at most); beyond, the smallest are left out
MAX_RESERVED_ROWS: Final = 100
MAX_SUBMITTING_ROWS: Final = 50


def reservations_payload(
    node: str, rows: list[tuple[int, int, int, int]], submitting: list[tuple[int, int]], counted: int | None = None
) -> str:
    """A node's reservations in flight as one payload (the largest MAX_RESERVED_ROWS rows and
    MAX_SUBMITTING_ROWS senders: under MAX_PAYLOAD whatever the figures), with `counted`, the last
    group commit of the node whose mails were counted (no longer reserved) when it was taken."""
    if len(rows) > MAX_RESERVED_ROWS:
        rows = sorted(rows, key=lambda row: row[2], reverse=True)[:MAX_RESERVED_ROWS]
    if len(submitting) > MAX_SUBMITTING_ROWS:
        submitting = sorted(submitting, key=lambda row: row[1], reverse=True)[:MAX_SUBMITTING_ROWS]
    doc: dict[str, Any] = {"z": rows, "zs": submitting}
    if counted is not None:
        doc["k"] = counted
    body = json.dumps(doc, separators=(",", ":"))
    return f'{{"n":{json.dumps(node[:NODE_MAX])},{body[1:]}'


def payloads(changes: Changes) -> list[str]:
    """The changes as NOTIFY payloads of at most MAX_PAYLOAD bytes each (none when there are none)."""
    node = json.dumps(changes.node[:NODE_MAX])
    if changes.seq is not None:  # (each payload of a group commit's rows names it)
        node += f',"k":{changes.seq:d}'
    out: list[str] = []
    parts: dict[str, list[str]] = {}
    size = 0
    base = len(node) + 10

    def flush() -> None:
        nonlocal size
        if parts:
            body = ",".join(f'"{key}":[{",".join(rows)}]' for key, rows in parts.items())
            out.append(f'{{"n":{node},{body}}}')
        parts.clear()
        size = 0

    for kind in _KINDS:
        key = _KEYS[kind]
        for row in getattr(changes, kind):
            text = json.dumps(row, separators=(",", ":"))
            extra = len(text.encode()) + 1 + (0 if key in parts else 7)  # a comma; `,"k":[` and `]`
            if base + size + extra > MAX_PAYLOAD:
                flush()
            parts.setdefault(key, []).append(text)
            size += extra
    flush()
    return out


MAX_ID: Final = 2**31 - 1  # site ids (a PostgreSQL integer) are positive and at most this
MAX_SEQ: Final = 2**63 - 1  # a node's group commit numbers
MAX_SIZE: Final = 2**40  # bytes of one mail or one download report (far above any message limit)
AT_SLACK: Final = 86_400.0  # a commit's time more than a day ahead of this node's clock is taken as now


def _int(value: Any, low: int = 1, high: int = MAX_ID) -> int:
    # (bounded: a hostile payload's negative or huge figures would skew the ledger's mailbox usage
    # and volumes - a mailbox "full" or a quota bypassed - until the next resync)
    if type(value) is not int or not low <= value <= high:
        raise BadPayload(f"not an integer in [{low}, {high}]: {str(value)[:40]!r}")
    return value


def _size(value: Any) -> int:
    return _int(value, 0, MAX_SIZE)


def _site(value: Any) -> int | None:
    return None if value is None else _int(value)


def _at(value: Any, now: float) -> float:
    """A commit's Unix time (a recovered commit's may be old); one more than AT_SLACK ahead of this
    node's clock is taken as now (its day decides the ledger's volume periods: a time years ahead
    emptied every period), one before 1970 or not finite is refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadPayload("bad committed row")
    at = float(value)
    if not math.isfinite(at) or at < 0:
        raise BadPayload("bad commit time")
    return min(at, now) if at - now > AT_SLACK else at


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def decode(payload: str, now: float | None = None) -> Changes:
    """A payload back as Changes (figures bounded, `now`: this node's Unix time); BadPayload for
    anything else."""
    if len(payload) > 8000:
        raise BadPayload("payload too long")
    now = time.time() if now is None else now
    try:
        doc = json.loads(payload, parse_constant=_no_constant)  # (NaN and Infinity refused)
    except ValueError:
        raise BadPayload("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("n"), str):
        raise BadPayload("no node name")
    changes = Changes(doc["n"][:NODE_MAX])
    try:
        for s, receivers, size, at in doc.get("c", []):
            if not isinstance(receivers, list):
                raise BadPayload("bad committed row")
            changes.committed.append((_site(s), [_int(r) for r in receivers], _size(size), _at(at, now)))
        for site, uid, sender, size in doc.get("f", []):
            changes.fetched.append((_int(site), _int(uid, 1, 2**63 - 1), _site(sender), _size(size)))
        for site, uid, sender, size, waiting in doc.get("r", []):
            changes.removed.append((_int(site), _int(uid, 1, 2**63 - 1), _site(sender), _size(size), bool(waiting)))
        for site, sent in doc.get("d", []):
            changes.downloaded.append((_int(site), _size(sent)))
        for site in doc.get("p", []):
            changes.polled.append(_int(site))
        for site in doc.get("g", []):
            changes.flagged.append(_int(site))
        if "z" in doc:
            changes.reserved = [
                (_int(r), _int(sender, 0), _size(size), _int(count, 1)) for r, sender, size, count in doc["z"]
            ]
            changes.submitting = [(_int(sender), _size(size)) for sender, size in doc.get("zs", [])]
        if "k" in doc:
            changes.seq = _int(doc["k"], 0, MAX_SEQ)
    except (TypeError, ValueError) as exc:
        raise BadPayload(f"bad row: {str(exc)[:80]}") from None
    return changes


def question_payload(question: str, reply: str, argument: str = "") -> str:
    """The payload on ASK_CHANNEL of `question` (one of QUESTIONS) answered on `reply`."""
    doc = {"q": question, "r": reply}
    return json.dumps({**doc, "a": argument} if argument else doc)


def decode_question(payload: str) -> tuple[str, str, str]:
    """(question, reply channel, argument or "") of a payload on ASK_CHANNEL; BadPayload for anything
    else (sessions.kick without a site name, an argument too long)."""
    try:
        doc = json.loads(payload[:1000])
    except ValueError:
        raise BadPayload("not JSON") from None
    if not isinstance(doc, dict) or doc.get("q") not in QUESTIONS:
        raise BadPayload("not a question this hub answers")
    reply = doc.get("r")
    if not isinstance(reply, str) or not REPLY_CHANNEL.fullmatch(reply):
        raise BadPayload("no reply channel")
    argument = doc.get("a", "")
    if not isinstance(argument, str) or len(argument) > ARGUMENT_MAX or (doc["q"] == "sessions.kick") != bool(argument):
        raise BadPayload("bad argument")
    return doc["q"], reply, argument


def answer_payloads(node: str, rows: list[dict[str, Any]]) -> list[str]:
    """A node's answer (at most MAX_ANSWER_ROWS rows; a row too long for a payload is left out) as
    payloads of at most MAX_PAYLOAD bytes, each saying its part and the number of parts."""
    name = json.dumps(node[:NODE_MAX])
    room = MAX_PAYLOAD - len(name) - 60
    groups: list[list[str]] = [[]]
    size = 0
    for row in rows[:MAX_ANSWER_ROWS]:
        text = json.dumps(row, separators=(",", ":"))
        if len(text.encode()) > room:
            continue
        if size + len(text.encode()) + 1 > room and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text.encode()) + 1
    return [f'{{"n":{name},"k":{k},"of":{len(groups)},"rows":[{",".join(g)}]}}' for k, g in enumerate(groups)]


def decode_answer(payload: str) -> tuple[str, int, int, list[dict[str, Any]]]:
    """(node, part, parts, rows) of an answer payload; BadPayload for anything else."""
    try:
        doc = json.loads(payload)
    except ValueError:
        raise BadPayload("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("n"), str) or not isinstance(doc.get("rows"), list):
        raise BadPayload("not an answer")
    part, parts = doc.get("k"), doc.get("of")
    if type(part) is not int or type(parts) is not int or not 0 <= part < parts <= MAX_ANSWER_ROWS:
        raise BadPayload("bad part numbers")
    return doc["n"][:NODE_MAX], part, parts, [r for r in doc["rows"] if isinstance(r, dict)]


def notify(conn: sql.Connection, changes: Changes) -> None:
    """NOTIFY the changes on PostgreSQL (inside the caller's transaction: sent at its commit);
    nothing on SQLite (one node: the listeners hear of them in the process)."""
    if sql.dialect(conn) != sql.POSTGRESQL or not len(changes):
        return
    for payload in payloads(changes):
        conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))

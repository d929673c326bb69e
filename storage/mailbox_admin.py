# What `mailhub mailbox list|show|export|delete|return|search` read of the index: a site's mailbox
# entries with their message's metadata (queue ID, arrival, size, sender, Message-ID, study
# SETID/part/total, fetched or not, SHA-256, where the bytes are, the MIME structure recorded at
# ingest), filtered; and the same across all mailboxes by Message-ID or study. Read-only (the
# removals go through Storage.remove_entries); the callers hold a read connection.
# Must never: read message bytes (the callers stream them from `path`), or change the index.
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sql

_SELECT = (
    "SELECT s.name, b.uid, m.queue_id, b.delivered_at, m.size, m.mail_from, m.message_id, m.set_id,"
    " m.set_part, m.set_total, b.fetched_at, b.rcpt, m.sha256, m.blob, m.blob_offset, m.dot_lines"
    " FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id JOIN sites s ON s.id = b.site_id"
)


@dataclass(slots=True)
class AdminEntry:
    """One mailbox entry as an operator sees it (no content)."""

    site: str
    uid: int
    queue_id: str
    arrived_at: float  # delivered into the mailbox (Unix time)
    size: int
    sender: str  # envelope sender ('' for the null sender)
    message_id: str | None
    set_id: str | None
    set_part: int | None
    set_total: int | None
    fetched_at: float | None  # first download; None: not fetched yet
    rcpt: str
    sha256: str
    blob: str
    offset: int
    dot_lines: bool

    def path(self, data_dir: Path) -> Path:
        return Path(data_dir) / "blobs" / self.blob

    def as_dict(self) -> dict[str, Any]:
        """The fields --json shows (where the bytes are stays inside)."""
        return {
            "site": self.site,
            "uid": self.uid,
            "queue_id": self.queue_id,
            "arrived_at": self.arrived_at,
            "size": self.size,
            "sender": self.sender,
            "rcpt": self.rcpt,
            "message_id": self.message_id,
            "set_id": self.set_id,
            "set_part": self.set_part,
            "set_total": self.set_total,
            "fetched": self.fetched_at is not None,
            "fetched_at": self.fetched_at,
            "sha256": self.sha256,
        }


def _entries(conn: sql.Connection, where: list[str], args: list[Any], limit: int | None) -> list[AdminEntry]:
    text = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY b.uid"
    if limit is not None:
        text += " LIMIT ?"
        args = [*args, limit]
    found = []
    for row in sql.rows(conn, text, args):
        values: list[Any] = list(row)
        values[15] = bool(values[15])
        found.append(AdminEntry(*values))
    return found


def site_entries(
    conn: sql.Connection,
    site_id: int,
    *,
    arrived_before: float | None = None,
    study: str | None = None,
    sender: str | None = None,
    larger_than: int | None = None,
    queue_ids: list[str] | None = None,
    fetched: bool | None = None,
    limit: int | None = None,
) -> list[AdminEntry]:
    """A site's mailbox entries in delivery order, matching every filter given: arrived before a
    time, of a study (SETID), from an envelope sender (case-insensitive), larger than `larger_than`
    bytes, one of `queue_ids`, fetched or not."""
    where: list[str] = ["b.site_id = ?"]
    args: list[Any] = [site_id]
    if arrived_before is not None:
        where.append("b.delivered_at < ?")
        args.append(arrived_before)
    if study is not None:
        where.append("m.set_id = ?")
        args.append(study)
    if sender is not None:
        where.append("m.mail_from = ? COLLATE NOCASE")
        args.append(sender)
    if larger_than is not None:
        where.append("m.size > ?")
        args.append(larger_than)
    if queue_ids is not None:
        where.append(f"m.queue_id IN ({','.join('?' * len(queue_ids))})")
        args.extend(queue_ids)
    if fetched is not None:
        where.append("b.fetched_at IS NOT NULL" if fetched else "b.fetched_at IS NULL")
    return _entries(conn, where, args, limit)


def search(
    conn: sql.Connection, message_id: str | None = None, study: str | None = None, limit: int | None = None
) -> list[AdminEntry]:
    """Entries of every mailbox holding a mail with this Message-ID and/or of this study."""
    where: list[str] = []
    args: list[Any] = []
    if message_id is not None:
        where.append("m.message_id = ?")
        args.append(message_id)
    if study is not None:
        where.append("m.set_id = ?")
        args.append(study)
    if not where:
        raise ValueError("search by Message-ID or study")
    return _entries(conn, where, args, limit)


def structure_json(conn: sql.Connection, queue_id: str) -> str | None:
    """The MIME structure recorded at ingest (JSON text), or None (unknown, or stored before)."""
    row = conn.execute("SELECT structure FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return None if row is None else row[0]


def site_id_of(conn: sql.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM sites WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def site_of_address(conn: sql.Connection, address: str) -> tuple[int, str] | None:
    """(id, name) of the site an address belongs to, or None (not a local address)."""
    row = conn.execute(
        "SELECT s.id, s.name FROM addresses a JOIN sites s ON s.id = a.site_id WHERE a.address = ?", (address,)
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))

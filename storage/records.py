# What storage and its callers pass around: a received message's metadata, its deliveries, a
# mailbox entry, a session's downloads. Plain data, no I/O; pickled to the index writer process.
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def pickled_by_fields(cls: type[T]) -> type[T]:
    """Pickle a slotted dataclass as (cls, its field values): what crosses to the index writer
    per message, at half the cost of the default (which calls dataclasses.fields() per object)."""
    values = operator.attrgetter(*cls.__slots__)  # type: ignore[attr-defined]
    cls.__reduce__ = lambda self: (cls, values(self))  # type: ignore[method-assign]
    return cls


@pickled_by_fields
@dataclass(slots=True)
class MessageMeta:
    """What the ingest learnt about a message while it streamed."""

    mail_from: str
    sender_site: int | None
    dot_lines: bool
    message_id: str | None = None
    set_id: str | None = None
    set_part: int | None = None
    set_total: int | None = None
    sender_name: str | None = None  # the sending site's name (for the tracking record)
    peer: str | None = None  # the client's IP address
    structure: dict[str, Any] | None = None  # MIME structure record (relay.mime.structure), offsets in the blob
    # the sending site's submitted-volume quotas (None: unlimited), checked once more inside the
    # commit's transaction against the index's volumes, as Delivery's limits are
    max_submitted_day: int | None = None
    max_submitted_month: int | None = None


@pickled_by_fields
@dataclass(slots=True)
class Delivery:
    site_id: int
    rcpt: str
    site_name: str | None = None  # for the tracking record
    # the receiving mailbox's limits (None: unlimited), checked once more inside the commit's
    # transaction against what the index holds: the last word, whatever the server's ledger said
    max_bytes: int | None = None
    max_messages: int | None = None
    max_received_day: int | None = None  # its received-volume quotas, checked the same way
    max_received_month: int | None = None


@dataclass(slots=True)
class MailboxEntry:
    uid: int
    queue_id: str
    size: int
    dot_lines: bool
    path: Path
    sha256: str
    sender_site: int | None = None
    fetched: bool = False  # downloaded before (by an earlier session)
    flags: int = 0  # IMAP flag bits (relay.imap.fetch: \Seen 1, \Answered 2, ...)
    delivered_at: float = 0.0
    offset: int = 0  # where the message starts in its blob file (a pack of small messages)
    crc32: int | None = None  # zlib CRC-32 of the message, checked while it is served (None: stored before)


@dataclass(slots=True)
class Downloads:
    """What one mailbox session sent to its site (added to running totals per site)."""

    polled_at: float  # login time (time.time())
    messages: int = 0  # whole messages (RETR)
    bytes: int = 0  # message octets (RETR and TOP)
    send_seconds: float = 0.0
    fetched_uids: list[int] = field(default_factory=list)  # entries downloaded for the first time
    protocol: str = "pop3"
    peer: str | None = None  # the client's IP address
    retrieved: dict[str, tuple[float, int]] = field(default_factory=dict)  # queue ID -> (time, octets)
    sessions: int = 1  # 0 for a later part of a session already counted (IMAP records at each expunge)


@pickled_by_fields
@dataclass(slots=True)
class Removal:
    """Why mailbox entries are removed when not by their site (Storage.remove_entries): the audit
    event (storage.audit: EXPIRED, DELETED_BY_OPERATOR, RETURNED), who (the operator's user name,
    or "hub") and a note for the audit record."""

    event: str
    actor: str
    detail: str | None = None

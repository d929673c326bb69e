# Data and events of the IMAP core (relay/imap/protocol.py): the messages of a mailbox view, the
# snapshot the adapter answers a MailboxRequest with, and the events the core emits. Plain data only.
from __future__ import annotations

import datetime
import enum
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "ImapProtocolError",
    "State",
    "Message",
    "Snapshot",
    "SendBytes",
    "SendFile",
    "AuthRequest",
    "StartTls",
    "MailboxRequest",
    "LoadRequest",
    "PartHeaderRequest",
    "ScanBudget",
    "ScanRequest",
    "StoreFlags",
    "ExpungeRequest",
    "CloseConnection",
    "NEED_DATA",
    "PAUSED",
    "CLOSED",
    "YIELD",
    "Probe",
    "ProbeAnswer",
    "Request",
    "Event",
    "Step",
    "Task",
]


class ImapProtocolError(Exception):
    """The adapter used the core wrongly.  Never raised because of client input."""


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


# A SEARCH probe (named by relay/imap/search.py, answered by relay/imap/scan.py): a header field
# contains a text ("H", FIELD, text), the Date: header's day ("D",), the body or the whole message
# contains octets ("B", octets) / ("T", octets); and its answer (a day or None for "D", else a bool).
Probe: TypeAlias = tuple[Literal["H"], str, str] | tuple[Literal["D"]] | tuple[Literal["B", "T"], bytes]
ProbeAnswer: TypeAlias = bool | datetime.date | None


@dataclass(eq=False)
class Message:
    uid: int
    size: int
    flags: int
    internal_date: float
    ref: object = None  # the adapter's handle (storage entry)
    structure: dict[str, Any] | None = None  # loaded on demand (LoadRequest), dropped after use
    header: bytes | None = None  # top-level header block incl. the blank line, likewise
    probes: dict[Probe, ProbeAnswer] | None = None  # SEARCH probe -> answer (relay/imap/scan.py), likewise
    gone: bool = False  # expunged by another session, EXPUNGE not yet sent
    damaged: str | None = None  # why it must not be served (LoadRequest with check), or None


@dataclass
class Snapshot:
    uid_validity: int
    uid_next: int
    messages: list[Message]


# ---- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendBytes:
    data: bytes


@dataclass(frozen=True)
class SendFile:
    ref: object
    start: int
    length: int
    whole: bool
    seen_now: bool = False  # this FETCH set the message's \Seen flag (taken back if found damaged)


@dataclass(frozen=True)
class AuthRequest:
    user: str
    password: str = field(repr=False)
    failed_so_far: int = 0


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class MailboxRequest:
    pass


@dataclass(frozen=True)
class LoadRequest:
    messages: list[Message]
    structure: bool
    header: bool
    check: bool = False  # set msg.damaged before any byte of a body literal is sent (damaged: none is)


@dataclass(frozen=True)
class PartHeaderRequest:
    """The header block of part `part` ("1.2", a message/rfc822 part's N.HEADER) of the message;
    resume with the bytes (at most MAX_HEADER) or None."""

    message: Message
    part: str


@dataclass
class ScanBudget:
    """What one SEARCH may still read: octets, and seconds from its first ScanRequest (the adapter
    sets the deadline then; the core has no clock)."""

    bytes_left: int
    seconds: float
    deadline: float | None = None


@dataclass(frozen=True)
class ScanRequest:
    """Answer `probes` (relay/imap/search.py) for each message into msg.probes within the budget;
    resume(True), or resume(False) when the budget ran out."""

    messages: list[Message]
    probes: tuple[Probe, ...]
    budget: ScanBudget


@dataclass(frozen=True)
class StoreFlags:
    uids: list[int]
    add: int
    remove: int


@dataclass(frozen=True)
class ExpungeRequest:
    uids: list[int]


@dataclass(frozen=True)
class CloseConnection:
    pass


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA, PAUSED, CLOSED = _Sentinel("NEED_DATA"), _Sentinel("PAUSED"), _Sentinel("CLOSED")
# A long command reached a point where other clients may run first: call next_event() again (after
# letting the event loop run, when the session has worked for a while).
YIELD = _Sentinel("YIELD")
_FLUSH, _LINE, _LINE_OR_CHANGE, _CHANGED = (
    _Sentinel(n) for n in ("<flush>", "<line>", "<line-or-change>", "<changed>")
)

# The requests a command asks the adapter to answer (resume()), what next_event() returns, and a
# command's generator: it yields requests or the core's own waits (_FLUSH, _LINE, ...) and is sent
# the answers, whose type depends on the request (relay/imap/protocol.py's header lists them; each
# yield site annotates what it receives).
Request: TypeAlias = (
    AuthRequest
    | StartTls
    | MailboxRequest
    | LoadRequest
    | PartHeaderRequest
    | ScanRequest
    | StoreFlags
    | ExpungeRequest
)
Event: TypeAlias = SendBytes | SendFile | CloseConnection | Request | _Sentinel
Step: TypeAlias = Request | _Sentinel
Task: TypeAlias = Generator[Step, Any, None]

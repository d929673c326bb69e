# IMAP FETCH responses (RFC 3501 sec. 6.4.5 and 7.4.2) for one message: which data the requested
# attributes need (the MIME structure recorded at ingest, the top-level header block), and the
# response as a stream of pieces, item by item: bytes the core sends as they are, FileRange parts
# of the stored blob that the adapter streams (sendfile) as literal contents, and PartHeader asks
# for the header block of a part (HEADER.FIELDS of a message/rfc822 part), sent in when needed and
# dropped after its item. Pure functions, no I/O.
# Must never: put a body section in memory (only header blocks of at most MAX_HEADER bytes, one at
# a time besides the top-level one), or announce a literal whose length differs from what the
# FileRange sends.
from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from relay.imap.events import Message
from relay.imap.parser import FetchAtt

__all__ = [
    "FileRange",
    "PartHeader",
    "Piece",
    "Renderers",
    "FetchPlan",
    "fetch_response",
    "flag_list",
    "internal_date",
    "filter_header",
    "FLAG_BITS",
    "SEEN",
    "ANSWERED",
    "FLAGGED",
    "DELETED",
    "DRAFT",
    "ALL_FLAGS",
]

SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16
ALL_FLAGS = SEEN | ANSWERED | FLAGGED | DELETED | DRAFT
FLAG_BITS = {"\\SEEN": SEEN, "\\ANSWERED": ANSWERED, "\\FLAGGED": FLAGGED, "\\DELETED": DELETED, "\\DRAFT": DRAFT}
_FLAG_NAMES = (
    (ANSWERED, "\\Answered"),
    (FLAGGED, "\\Flagged"),
    (DELETED, "\\Deleted"),
    (SEEN, "\\Seen"),
    (DRAFT, "\\Draft"),
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class FileRange:
    start: int
    length: int
    whole: bool  # the entire message (counts as one downloaded message)


@dataclass(frozen=True)
class PartHeader:
    part: str  # "1.2": fetch_response needs that part's header block (send it in, or None)


# What fetch_response() yields: bytes to send, a FileRange to stream, a PartHeader to answer.
Piece: TypeAlias = bytes | FileRange | PartHeader


class Renderers(Protocol):
    """The MIME structure's IMAP forms (relay.mime.structure; tests pass fakes)."""

    def bodystructure(self, structure: dict[str, Any], /, extensible: bool = True) -> bytes: ...

    def envelope(self, structure: dict[str, Any], /) -> bytes: ...

    def section_range(self, structure: dict[str, Any], section: str, /) -> tuple[int, int] | None: ...


def flag_list(flags: int) -> str:
    return "(" + " ".join(name for bit, name in _FLAG_NAMES if flags & bit) + ")"


def internal_date(timestamp: float) -> str:
    t = time.gmtime(timestamp)
    return (
        f'"{t.tm_mday:2d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"'
    )


class FetchPlan:
    """What a list of fetch attributes needs and does."""

    def __init__(self, atts: list[FetchAtt]):
        self.atts = atts
        self.names = {att.name for att in atts}
        self.structure = False
        self.header = False
        self.sets_seen = False
        # FLAGS, UID, RFC822.SIZE, INTERNALDATE only: answerable from the session's view alone
        # a literal of the stored bytes: checked first (LoadRequest.check), a damaged mail is not sent
        self.body = any(
            att.name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT") or att.section is not None for att in atts
        )
        self.reads_message = any(att.name not in ("FLAGS", "UID", "RFC822.SIZE", "INTERNALDATE") for att in atts)
        for att in atts:
            name, section = att.name, att.section
            if name in ("ENVELOPE", "BODYSTRUCTURE", "BODY") and section is None:
                self.structure = True
            if name in ("RFC822", "RFC822.TEXT") or (name == "BODY" and section is not None):
                self.sets_seen = True
            if (
                section is not None
                and section.startswith(("HEADER", "TEXT"))
                or name in ("RFC822.HEADER", "RFC822.TEXT")
            ):
                self.header = True  # the top-level header's end (and its fields)
            elif section:
                self.structure = True  # a numbered part


def fetch_response(
    seq: int, msg: Message, plan: FetchPlan, renderers: Renderers, with_flags: bool
) -> Generator[Piece, bytes | None, None]:
    """`* seq FETCH (...)` for msg (its .structure and .header loaded as the plan needs), a generator
    of pieces; a PartHeader is sent the part's header block (or None)."""
    yield f"* {seq} FETCH (".encode()
    for i, att in enumerate(plan.atts):
        if i:
            yield b" "
        part_header = None
        if att.fields and att.section and att.section[0].isdigit():
            part_header = yield PartHeader(att.section.split(".HEADER.FIELDS")[0])
        yield from _item(msg, att, renderers, part_header)
    if with_flags and "FLAGS" not in plan.names:
        yield f" FLAGS {flag_list(msg.flags)}".encode()
    yield b")\r\n"


def _item(msg: Message, att: FetchAtt, renderers: Renderers, part_header: bytes | None) -> list[Piece]:
    name = att.name
    if name == "FLAGS":
        return [f"FLAGS {flag_list(msg.flags)}".encode()]
    if name == "UID":
        return [f"UID {msg.uid}".encode()]
    if name == "RFC822.SIZE":
        return [f"RFC822.SIZE {msg.size}".encode()]
    if name == "INTERNALDATE":
        return [f"INTERNALDATE {internal_date(msg.internal_date)}".encode()]
    if name == "ENVELOPE":
        return [b"ENVELOPE " + renderers.envelope(_structure(msg))]
    if name == "BODYSTRUCTURE" or (name == "BODY" and att.section is None):
        return [name.encode() + b" " + renderers.bodystructure(_structure(msg), extensible=name == "BODYSTRUCTURE")]
    if name == "RFC822":
        return _literal(b"RFC822", FileRange(0, msg.size, True))
    header_end = len(msg.header) if msg.header is not None else 0
    if name == "RFC822.HEADER":
        return _literal(b"RFC822.HEADER", FileRange(0, header_end, False))
    if name == "RFC822.TEXT":
        return _literal(b"RFC822.TEXT", FileRange(header_end, msg.size - header_end, False))
    section = att.section or ""
    label = "BODY[" + section + (" (" + " ".join(att.fields) + ")" if att.fields else "") + "]"
    if att.fields:
        block = msg.header if not section[0].isdigit() else part_header
        data = filter_header(block or b"", set(att.fields), section.endswith(".NOT"))
        return _literal(_partial_label(label, att), _cut_bytes(data, att.partial))
    span: tuple[int, int] | None
    if section == "":
        span = (0, msg.size)
    elif section == "HEADER":
        span = (0, header_end)
    elif section == "TEXT":
        span = (header_end, msg.size)
    else:
        span = renderers.section_range(msg.structure, section) if msg.structure is not None else None
    if span is None:
        return [_partial_label(label, att) + b' ""']
    start, end = span
    whole = section == "" and att.partial is None
    return _literal(_partial_label(label, att), _cut_range(start, end, att.partial, whole))


def _structure(msg: Message) -> dict[str, Any]:
    assert msg.structure is not None  # loaded for the FetchPlan (else the message is not answered)
    return msg.structure


def _partial_label(label: str, att: FetchAtt) -> bytes:
    if att.partial is not None:
        label += f"<{att.partial[0]}>"
    return label.encode()


def _cut_range(start: int, end: int, partial: tuple[int, int] | None, whole: bool) -> FileRange:
    if partial is not None:
        offset, count = partial
        start = min(end, start + offset)
        end = min(end, start + count)
    return FileRange(start, max(0, end - start), whole)


def _cut_bytes(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is not None:
        offset, count = partial
        data = data[offset : offset + count]
    return data


def _literal(label: bytes, content: bytes | FileRange) -> list[Piece]:
    length = len(content) if isinstance(content, bytes) else content.length
    head = label + b" {%d}\r\n" % length
    if isinstance(content, bytes):
        return [head + content]
    return [head, content] if length else [head]


def filter_header(header: bytes, names: set[str], exclude: bool) -> bytes:
    """The header fields whose names are (or, exclude=True, are not) in `names` (upper-case), in their
    original order and form, followed by the blank line (RFC 3501 HEADER.FIELDS)."""
    kept = bytearray()
    keep = False
    for line in header.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                kept += line + b"\r\n"
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").upper()
        keep = (name in names) != exclude
        if keep:
            kept += line + b"\r\n"
    return bytes(kept) + b"\r\n"

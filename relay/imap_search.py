# IMAP SEARCH criteria (RFC 3501 sec. 6.4.4): parse the search keys into one predicate over a message
# (flags, UID, sequence number, size, internal date, header fields) and say whether it needs the
# message's header block. Body text search (BODY, TEXT) is not offered: it would read whole blobs.
# Pure functions, no I/O; malformed criteria raise ParseError (a BAD reply).
from __future__ import annotations

import datetime
import email.utils

from .imap_fetch import ANSWERED, DELETED, DRAFT, FLAG_BITS, FLAGGED, SEEN
from .imap_parser import Atom, ParseError, astring, imap_date, in_sequence_set, sequence_set

__all__ = ["Search", "parse_search"]

_FLAG_KEYS = {"ANSWERED": (ANSWERED, True), "DELETED": (DELETED, True), "DRAFT": (DRAFT, True),
              "FLAGGED": (FLAGGED, True), "SEEN": (SEEN, True), "UNANSWERED": (ANSWERED, False),
              "UNDELETED": (DELETED, False), "UNDRAFT": (DRAFT, False), "UNFLAGGED": (FLAGGED, False),
              "UNSEEN": (SEEN, False)}
_HEADER_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT"}
_DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_CHARSETS = {"US-ASCII", "UTF-8"}


class Search:
    """A parsed SEARCH: match(seq, msg, largest_seq, largest_uid) -> bool."""

    def __init__(self, predicate, needs_header: bool):
        self.match = predicate
        self.needs_header = needs_header


def parse_search(args: list) -> Search:
    if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
        if astring(args[1]).upper() not in _CHARSETS:
            raise ParseError("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
        args = args[2:]
    if not args:
        raise ParseError("SEARCH needs criteria")
    parser = _Parser(args)
    predicates = []
    while not parser.at_end():
        predicates.append(parser.key())
    return Search(_all_of(predicates), parser.needs_header)


def _all_of(predicates):
    return lambda *a: all(p(*a) for p in predicates)


class _Parser:
    def __init__(self, tokens: list):
        self.tokens = tokens
        self.pos = 0
        self.needs_header = False

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def take(self):
        if self.at_end():
            raise ParseError("search key needs an argument")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def key(self):
        token = self.take()
        if isinstance(token, list):
            inner = _Parser(token)
            if inner.at_end():
                raise ParseError("empty search list")
            predicates = []
            while not inner.at_end():
                predicates.append(inner.key())
            self.needs_header |= inner.needs_header
            return _all_of(predicates)
        if not isinstance(token, Atom):
            raise ParseError("search key expected")
        name = token.upper()
        if name == "ALL":
            return lambda *a: True
        if name in _FLAG_KEYS:
            bit, wanted = _FLAG_KEYS[name]
            return lambda seq, msg, *a: bool(msg.flags & bit) == wanted
        if name in ("NEW", "RECENT"):
            return lambda *a: False          # no message is ever \Recent here
        if name == "OLD":
            return lambda *a: True
        if name in ("KEYWORD", "UNKEYWORD"):
            keyword = astring(self.take())
            bit = FLAG_BITS.get(keyword.upper(), 0) if keyword.startswith("\\") else 0
            wanted = name == "KEYWORD"
            return lambda seq, msg, *a: bool(msg.flags & bit) == wanted if bit else not wanted
        if name == "NOT":
            inner = self.key()
            return lambda *a: not inner(*a)
        if name == "OR":
            left, right = self.key(), self.key()
            return lambda *a: left(*a) or right(*a)
        if name in ("LARGER", "SMALLER"):
            number = self.take()
            if not (isinstance(number, Atom) and number.isdigit() and len(number) <= 20):
                raise ParseError(f"{name} needs a number")
            limit = int(number)
            if name == "LARGER":
                return lambda seq, msg, *a: msg.size > limit
            return lambda seq, msg, *a: msg.size < limit
        if name == "UID":
            ranges = sequence_set(self.take())
            return lambda seq, msg, largest_seq, largest_uid: in_sequence_set(msg.uid, ranges, largest_uid)
        if name in _DATE_KEYS:
            return self._date_key(name, imap_date(self.take()))
        if name in _HEADER_KEYS or name == "HEADER":
            field = name if name != "HEADER" else astring(self.take()).upper()
            value = astring(self.take()).lower()
            self.needs_header = True
            return lambda seq, msg, *a: _header_contains(msg.header or b"", field, value)
        if name in ("BODY", "TEXT"):
            raise ParseError(f"[CANNOT] {name} search is not supported")
        if name[:1].isdigit() or name[:1] == "*":
            ranges = sequence_set(token)
            return lambda seq, msg, largest_seq, largest_uid: in_sequence_set(seq, ranges, largest_seq)
        raise ParseError("unknown search key " + name[:30])

    def _date_key(self, name: str, day: datetime.date):
        if name.startswith("SENT"):
            self.needs_header = True
            def when(msg):
                return _sent_date(msg.header or b"")
            name = name[4:]
        else:
            def when(msg):
                return datetime.datetime.fromtimestamp(msg.internal_date, datetime.timezone.utc).date()
        if name == "BEFORE":
            return lambda seq, msg, *a: (d := when(msg)) is not None and d < day
        if name == "ON":
            return lambda seq, msg, *a: when(msg) == day
        return lambda seq, msg, *a: (d := when(msg)) is not None and d >= day


def _fields(header: bytes, field: str) -> list[str]:
    """Unfolded values of every header field named `field` (upper-case)."""
    values, current = [], None
    for line in header.decode("utf-8", "replace").split("\r\n"):
        if not line:
            break
        if line[:1] in (" ", "\t"):
            if current is not None:
                values[current] += line
            continue
        name, sep, value = line.partition(":")
        current = None
        if sep and name.strip().upper() == field:
            values.append(value)
            current = len(values) - 1
    return values


def _header_contains(header: bytes, field: str, needle: str) -> bool:
    return any(needle in value.lower() for value in _fields(header, field))


def _sent_date(header: bytes) -> datetime.date | None:
    values = _fields(header, "DATE")
    if not values:
        return None
    try:
        return email.utils.parsedate_to_datetime(values[0].strip()).date()
    except (TypeError, ValueError, IndexError):
        return None

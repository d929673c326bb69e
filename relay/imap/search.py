# IMAP SEARCH criteria (RFC 3501 sec. 6.4.4): parse the search keys into predicates over a message
# (flags, UID, sequence number, size, internal date; header fields, the Date: header, body and whole
# text), bounded in depth and number (BAD past MAX_SEARCH_DEPTH / MAX_SEARCH_KEYS). Keys that need
# the message's contents become probes: ("H", FIELD, text), ("D",), ("B", octets), ("T", octets),
# answered per message by relay/imap/scan.py off the event loop (msg.probes) within a byte and time
# budget. The keys of the top level are split in two: the cheap ones (no probe) are checked first,
# and only messages that pass them are read.
# Pure functions, no I/O; malformed criteria raise ParseError (a BAD reply).
from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TypeAlias

from relay.imap.events import Message, Probe, ProbeAnswer
from relay.imap.fetch import ANSWERED, DELETED, DRAFT, FLAG_BITS, FLAGGED, SEEN
from relay.imap.limits import MAX_SEARCH_DEPTH, MAX_SEARCH_KEYS
from relay.imap.parser import Atom, ParseError, SequenceSet, Token, astring, imap_date

__all__ = ["Search", "parse_search"]

_FLAG_KEYS = {
    "ANSWERED": (ANSWERED, True),
    "DELETED": (DELETED, True),
    "DRAFT": (DRAFT, True),
    "FLAGGED": (FLAGGED, True),
    "SEEN": (SEEN, True),
    "UNANSWERED": (ANSWERED, False),
    "UNDELETED": (DELETED, False),
    "UNDRAFT": (DRAFT, False),
    "UNFLAGGED": (FLAGGED, False),
    "UNSEEN": (SEEN, False),
}
_HEADER_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT"}
_DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_CHARSETS = {"US-ASCII", "UTF-8"}
SENT_DATE: Probe = ("D",)
# (sequence number, message, largest sequence number, largest UID) -> whether the message matches
Predicate: TypeAlias = Callable[[int, Message, int, int], bool]


class Search:
    """A parsed SEARCH. cheap(seq, msg, largest_seq, largest_uid) needs only the session's view;
    full(...) also reads msg.probes, which must hold an answer for each of `probes` (empty: cheap
    is the whole search)."""

    def __init__(self, cheap: Predicate, full: Predicate, probes: tuple[Probe, ...]) -> None:
        self.cheap = cheap
        self.full = full
        self.probes = probes


def parse_search(args: list[Token]) -> Search:
    if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
        if astring(args[1]).upper() not in _CHARSETS:
            raise ParseError("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
        args = args[2:]
    if not args:
        raise ParseError("SEARCH needs criteria")
    parser = _Parser(args)
    cheap: list[Predicate] = []
    full: list[Predicate] = []
    while not parser.at_end():
        probes_before = len(parser.probes)
        key = parser.key(1)
        (full if len(parser.probes) > probes_before else cheap).append(key)
    return Search(_all_of(cheap), _all_of(full), tuple(dict.fromkeys(parser.probes)))


def _all_of(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    return lambda *a: all(p(*a) for p in predicates)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.stack = [(tokens, 0)]  # (tokens, position) of each open parenthesized list
        self.keys = 0
        self.probes: list[Probe] = []

    def at_end(self) -> bool:
        tokens, pos = self.stack[-1]
        return pos >= len(tokens)

    def take(self) -> Token:
        tokens, pos = self.stack[-1]
        if pos >= len(tokens):
            raise ParseError("search key needs an argument")
        self.stack[-1] = (tokens, pos + 1)
        return tokens[pos]

    def key(self, depth: int) -> Predicate:
        if depth > MAX_SEARCH_DEPTH:
            raise ParseError(f"search keys nested too deeply (at most {MAX_SEARCH_DEPTH} levels)")
        self.keys += 1
        if self.keys > MAX_SEARCH_KEYS:
            raise ParseError(f"too many search keys (at most {MAX_SEARCH_KEYS})")
        token = self.take()
        if isinstance(token, list):
            if not token:
                raise ParseError("empty search list")
            self.stack.append((token, 0))
            predicates: list[Predicate] = []
            while not self.at_end():
                predicates.append(self.key(depth + 1))
            self.stack.pop()
            return _all_of(predicates)
        if not isinstance(token, Atom):
            raise ParseError("search key expected")
        name = token.upper()
        if name == "NOT":
            inner = self.key(depth + 1)
            return lambda *a: not inner(*a)
        if name == "OR":
            left, right = self.key(depth + 1), self.key(depth + 1)
            return lambda *a: left(*a) or right(*a)
        return self._simple(name, token)

    def _simple(self, name: str, token: Atom) -> Predicate:
        if name in ("ALL", "OLD"):
            return lambda *a: True
        if name in ("NEW", "RECENT"):
            return lambda *a: False  # no message is ever \Recent here
        if name in _FLAG_KEYS:
            bit, wanted = _FLAG_KEYS[name]
            return lambda seq, msg, *a: bool(msg.flags & bit) == wanted
        if name in ("KEYWORD", "UNKEYWORD"):
            keyword = astring(self.take())
            bit = FLAG_BITS.get(keyword.upper(), 0) if keyword.startswith("\\") else 0
            wanted = name == "KEYWORD"
            return lambda seq, msg, *a: bool(msg.flags & bit) == wanted if bit else not wanted
        if name in ("LARGER", "SMALLER"):
            number = self.take()
            if not (isinstance(number, Atom) and number.isdigit() and len(number) <= 20):
                raise ParseError(f"{name} needs a number")
            limit = int(number)
            if name == "LARGER":
                return lambda seq, msg, *a: msg.size > limit
            return lambda seq, msg, *a: msg.size < limit
        if name == "UID":
            uids = SequenceSet(self.take())
            return lambda seq, msg, largest_seq, largest_uid: uids.contains(msg.uid, largest_uid)
        if name in _DATE_KEYS:
            return self._date_key(name, imap_date(self.take()))
        if name in _HEADER_KEYS or name == "HEADER":
            field = name if name != "HEADER" else astring(self.take()).upper()
            return self._probe(("H", field, astring(self.take()).lower()))
        if name in ("BODY", "TEXT"):
            text = astring(self.take()).encode("utf-8").lower()
            return self._probe(("B" if name == "BODY" else "T", text))
        if name[:1].isdigit() or name[:1] == "*":
            numbers = SequenceSet(token)
            return lambda seq, msg, largest_seq, largest_uid: numbers.contains(seq, largest_seq)
        raise ParseError("unknown search key " + name[:30])

    def _probe(self, probe: Probe) -> Predicate:
        self.probes.append(probe)
        return lambda seq, msg, *a: _answer(msg, probe) is True

    def _date_key(self, name: str, day: datetime.date) -> Predicate:
        if name.startswith("SENT"):
            self.probes.append(SENT_DATE)

            def when(msg: Message) -> datetime.date | None:
                answer = _answer(msg, SENT_DATE)
                return answer if isinstance(answer, datetime.date) else None

            name = name[4:]
        else:

            def when(msg: Message) -> datetime.date | None:
                return datetime.datetime.fromtimestamp(msg.internal_date, datetime.UTC).date()

        if name == "BEFORE":
            return lambda seq, msg, *a: (d := when(msg)) is not None and d < day
        if name == "ON":
            return lambda seq, msg, *a: when(msg) == day
        return lambda seq, msg, *a: (d := when(msg)) is not None and d >= day


def _answer(msg: Message, probe: Probe) -> ProbeAnswer:
    assert msg.probes is not None  # full() runs after the ScanRequest answered the probes
    return msg.probes[probe]

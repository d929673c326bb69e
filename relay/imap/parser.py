# IMAP4rev1 command syntax (RFC 3501 sec. 9, literals also RFC 7888 LITERAL+): the framer cuts the
# client's byte stream into whole commands (lines plus the literals {n} / {n+} they announce), the
# tokenizer turns one command into atoms, strings and parenthesized lists, and small parsers read
# sequence sets, fetch attributes and dates. Pure functions and classes, no I/O.
# Must never: raise anything but ParseError on client input, or buffer more than its limits allow.
from __future__ import annotations

import bisect
import datetime
import re
from dataclasses import dataclass
from typing import TypeAlias

from relay.imap.limits import MAX_LIST_DEPTH, MAX_TOKENS

__all__ = [
    "ParseError",
    "CommandFramer",
    "Command",
    "LiteralRequest",
    "TooLong",
    "Overflow",
    "Atom",
    "Token",
    "tokenize",
    "astring",
    "sequence_set",
    "SequenceSet",
    "fetch_att",
    "FetchAtt",
    "imap_date",
]


class ParseError(Exception):
    """Malformed client input; the text is the BAD reply's reason."""


# ---- framing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    tag: str
    segments: tuple[bytes, ...]  # text, literal, text, literal, ..., text (each text without CRLF)


@dataclass(frozen=True)
class LiteralRequest:
    """A synchronizing literal {n} was announced: call accept_literal() (and send "+") or
    reject_literal() (and send the tagged NO or BAD reply)."""

    tag: str
    size: int
    verb: str = ""  # the command's name, upper-case, when it is readable


@dataclass(frozen=True)
class TooLong:
    tag: str


@dataclass(frozen=True)
class Overflow:
    """Too much input or a non-synchronizing literal over the limit: answer BYE and close."""


_LITERAL_AT_END = re.compile(rb"\{([0-9]{1,10})(\+?)\}\r?$")
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]{1,64}')  # ASTRING-CHARs but "+"


class CommandFramer:
    def __init__(self, max_command: int, max_buffer: int):
        self.set_limits(max_command, max_buffer)
        self._buf = bytearray()
        self._segments: list[bytes] = []
        self._size = 0
        self._literal: int | None = None  # size of the announced literal still to read
        self._waiting = False  # a LiteralRequest is unanswered
        self._discarding = False  # skipping the rest of an over-long line
        self._overflowed = False

    def set_limits(self, max_command: int, max_buffer: int) -> None:
        """Octets of one command with its literals, and of input waiting beyond it (login raises
        both; the command being read keeps counting against the new ones)."""
        self.max_command = max_command
        self.max_buffer = max_buffer

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._overflowed:
            return
        self._buf += data
        if len(self._buf) > self.max_buffer + self.max_command:
            self._overflowed = True

    def drop_input(self) -> None:
        """Forget everything buffered (STARTTLS: bytes sent before the handshake are void)."""
        self._buf.clear()
        self._reset()

    def _reset(self) -> None:
        self._segments, self._size, self._literal, self._waiting = [], 0, None, False

    def _tag(self) -> str:
        first = self._segments[0] if self._segments else bytes(self._buf[:64])
        tag = first.split(b" ", 1)[0]
        return tag.decode("ascii") if _TAG.fullmatch(tag) else "*"

    def next_line(self) -> bytes | None:
        """One raw line without CRLF (IDLE's DONE, an AUTHENTICATE response), or None."""
        item = self._line()
        return item if isinstance(item, bytes) else None

    def _line(self) -> bytes | TooLong | Overflow | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if self._overflowed:
                    return Overflow()
                if len(self._buf) + self._size > self.max_command and not self._discarding:
                    tag = self._tag()
                    self._discarding = True
                    self._buf.clear()
                    self._reset()
                    return TooLong(tag)
                if self._discarding:
                    self._buf.clear()
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False
                continue
            return line[:-1] if line.endswith(b"\r") else line

    def next_item(self) -> Command | LiteralRequest | TooLong | Overflow | None:
        """Command, LiteralRequest, TooLong, Overflow, or None when more input is needed."""
        while True:
            if self._waiting:
                return None
            if self._literal is not None:
                if len(self._buf) < self._literal:
                    return Overflow() if self._overflowed else None
                self._segments.append(bytes(self._buf[: self._literal]))
                del self._buf[: self._literal]
                self._literal = None
            item = self._line()
            if not isinstance(item, bytes):
                return item
            self._size += len(item) + 2
            if self._size > self.max_command:
                tag = self._tag() if self._segments else _line_tag(item)
                self._reset()
                return TooLong(tag)
            self._segments.append(item)
            m = _LITERAL_AT_END.search(item)
            if not m:
                command = Command(self._tag(), tuple(self._segments))
                self._reset()
                return command
            size = int(m.group(1))
            if size + self._size > self.max_command:
                if m.group(2):
                    self._overflowed = True
                    return Overflow()
                tag = self._tag()
                self._reset()
                return TooLong(tag)
            self._size += size
            self._literal = size
            if not m.group(2):
                self._waiting = True
                return LiteralRequest(self._tag(), size, self._verb())

    def accept_literal(self) -> None:
        self._waiting = False

    def reject_literal(self) -> None:
        self._reset()

    def _verb(self) -> str:
        words = self._segments[0].split(b" ", 2)
        return words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""


def _line_tag(line: bytes) -> str:
    tag = line.split(b" ", 1)[0]
    return tag.decode("ascii") if _TAG.fullmatch(tag) else "*"


# ---- tokens ---------------------------------------------------------------------------------


class Atom(str):
    """An atom (also NIL, numbers, sequence sets, fetch attributes with their [section]<partial>)."""


# A token of a command: an atom, a string (quoted or literal), or a parenthesized list of tokens.
Token: TypeAlias = "Atom | bytes | list[Token]"

_ATOM_STOP = set(b'(){ "\\') | set(range(0x00, 0x20)) | {0x7F}


def tokenize(command: Command) -> list[Token]:
    """Tag and everything after it as tokens: Atom, bytes (quoted string or literal), list."""
    tokens: list[Token] = []
    stack: list[list[Token]] = [tokens]
    segments = command.segments
    count = 0  # tokens so far (atoms, strings, literals, lists)
    for index in range(0, len(segments), 2):
        text = segments[index]
        literal = segments[index + 1] if index + 1 < len(segments) else None
        pos, end = 0, len(text)
        if literal is not None:
            end = text.rindex(b"{")
        while pos < end:
            c = text[pos]
            if c == 0x20:
                pos += 1
                if pos < end and text[pos] == 0x20:
                    raise ParseError("two spaces in a row")
                continue
            count += c != 0x29  # a list counts once, at its "("
            if count > MAX_TOKENS:
                raise ParseError(f"too many tokens in one command (at most {MAX_TOKENS})")
            if c == 0x28:  # (
                if len(stack) > MAX_LIST_DEPTH:
                    raise ParseError(f"parentheses nested too deeply (at most {MAX_LIST_DEPTH})")
                stack.append([])
                stack[-2].append(stack[-1])
                pos += 1
            elif c == 0x29:  # )
                if len(stack) == 1:
                    raise ParseError("unbalanced parenthesis")
                stack.pop()
                pos += 1
            elif lexeme := _LEXEME.match(text, pos, end):  # the common tokens, in one step
                if lexeme.lastgroup == "quoted":
                    stack[-1].append(lexeme.group("quoted"))
                else:
                    try:
                        stack[-1].append(Atom(lexeme.group("atom").decode("ascii")))
                    except UnicodeDecodeError:
                        raise ParseError("8-bit characters in an atom") from None
                pos = lexeme.end()
            elif c == 0x22:  # " (with escapes, or malformed)
                value, pos = _quoted(text, pos + 1, end)
                stack[-1].append(value)
            else:
                atom, pos = _atom(text, pos, end)
                stack[-1].append(atom)
        if literal is not None:
            if end > 0 and text[end - 1] not in b" (":
                raise ParseError("literal must follow a space or a parenthesis")
            stack[-1].append(literal)
            count += 1
            if count > MAX_TOKENS:
                raise ParseError(f"too many tokens in one command (at most {MAX_TOKENS})")
    if len(stack) != 1:
        raise ParseError("unbalanced parenthesis")
    return tokens


# A quoted string without escapes, or an atom without nested sections that ends at a space, a
# parenthesis or the end, taken in one regex step (possessive: no backtracking); anything else
# (escapes, nested "[", malformed input) goes through the character loops below, which decide.
_LEXEME = re.compile(
    rb'"(?P<quoted>[^"\\\x00\r\n]*+)"'
    rb'|(?P<atom>\\?(?:[^(){ "\\\x00-\x1f\x7f\[\]]++|\[[^\[\]\r\n\x00{]*+\]|\])++)(?=[ ()]|\Z)'
)


def _quoted(text: bytes, pos: int, end: int) -> tuple[bytes, int]:
    out = bytearray()
    while pos < end:
        c = text[pos]
        if c == 0x22:
            return bytes(out), pos + 1
        if c == 0x5C:
            if pos + 1 >= end or text[pos + 1] not in b'"\\':
                raise ParseError("invalid escape in quoted string")
            out.append(text[pos + 1])
            pos += 2
            continue
        if c in (0x00, 0x0D, 0x0A):
            raise ParseError("invalid character in quoted string")
        out.append(c)
        pos += 1
    raise ParseError("unterminated quoted string")


def _atom(text: bytes, pos: int, end: int) -> tuple[Atom, int]:
    start = pos
    depth = 0
    while pos < end:
        c = text[pos]
        if c == 0x5B:  # [ opens a section: spaces and parentheses allowed inside
            depth += 1
        elif c == 0x5D:
            depth = max(0, depth - 1)  # outside a section "]" is an ASTRING-CHAR
        elif depth == 0 and c in _ATOM_STOP and not (c == 0x5C and pos == start):  # flags: \Seen
            break
        elif depth and c in (0x0D, 0x0A, 0x00, 0x7B):
            raise ParseError("invalid character in section")
        pos += 1
    if depth:
        raise ParseError("unterminated [")
    if pos == start:
        raise ParseError("unexpected character %r" % chr(text[pos]))
    try:
        return Atom(text[start:pos].decode("ascii")), pos
    except UnicodeDecodeError:
        raise ParseError("8-bit characters in an atom") from None


def astring(token: Token) -> str:
    """An astring argument (atom, quoted or literal) as text."""
    if isinstance(token, list):
        raise ParseError("expected a string, got a list")
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError("string is not UTF-8") from None
    return str(token)


# ---- sequence sets ----------------------------------------------------------------------------

_SEQ_RANGE = re.compile(r"(\*|[1-9][0-9]{0,9})(?::(\*|[1-9][0-9]{0,9}))?")
STAR = 0  # stands for "*" (the largest number in use) until resolved


def sequence_set(token: Token) -> list[tuple[int, int]]:
    """'1:3,7,9:*' -> [(1, 3), (7, 7), (9, STAR)] (STAR = 0: resolve against the largest number)."""
    if not isinstance(token, Atom):
        raise ParseError("expected a sequence set")
    ranges = []
    for part in token.split(","):
        m = _SEQ_RANGE.fullmatch(part)
        if not m:
            raise ParseError("invalid sequence set")
        lo = 0 if m.group(1) == "*" else int(m.group(1))
        hi = lo if m.group(2) is None else (0 if m.group(2) == "*" else int(m.group(2)))
        if lo > 0xFFFFFFFF or hi > 0xFFFFFFFF:
            raise ParseError("number out of range")
        ranges.append((lo, hi))
    return ranges


class SequenceSet:
    """A parsed sequence set, asked about numbers in O(log ranges): the ranges are resolved against
    the largest number in use ("*"), sorted and merged once per largest number."""

    def __init__(self, token: Token) -> None:
        self.ranges = sequence_set(token)
        self._largest: int | None = None
        self._starts: list[int] = []
        self._ends: list[int] = []

    def resolved(self, largest: int) -> tuple[list[int], list[int]]:
        """(starts, ends) of the disjoint ascending ranges, each end inclusive."""
        if largest != self._largest:
            spans = sorted(
                (min(lo or largest, hi or largest), max(lo or largest, hi or largest)) for lo, hi in self.ranges
            )
            starts: list[int] = []
            ends: list[int] = []
            for lo, hi in spans:
                if starts and lo <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], hi)
                else:
                    starts.append(lo)
                    ends.append(hi)
            self._largest, self._starts, self._ends = largest, starts, ends
        return self._starts, self._ends

    def contains(self, number: int, largest: int) -> bool:
        starts, ends = self.resolved(largest)
        i = bisect.bisect_right(starts, number) - 1
        return i >= 0 and number <= ends[i]

    def highest(self, largest: int) -> int:
        """The largest number the set names (0 for an empty resolution)."""
        ends = self.resolved(largest)[1]
        return ends[-1] if ends else 0

    def names_only_star(self) -> bool:
        return all(STAR in (lo, hi) for lo, hi in self.ranges)


# ---- fetch attributes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchAtt:
    name: str  # FLAGS, UID, ..., BODY, BODY.PEEK (the RFC 3501 names)
    section: str | None = None  # text inside [] (upper-cased, without HEADER.FIELDS' list)
    fields: tuple[str, ...] = ()  # HEADER.FIELDS (...) names, upper-cased
    partial: tuple[int, int] | None = None

    @property
    def peek(self) -> bool:
        return self.name == "BODY.PEEK"


_SIMPLE_ATTS = {
    "FLAGS",
    "UID",
    "RFC822.SIZE",
    "INTERNALDATE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "BODY",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.TEXT",
}
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_BODY_ATT = re.compile(r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<([0-9]{1,10})\.([0-9]{1,10})>)?", re.I)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def fetch_att(token: Token) -> list[FetchAtt]:
    """One fetch argument (a macro, an attribute, or a parenthesized list of attributes)."""
    if isinstance(token, list):
        if not token:
            raise ParseError("empty fetch attribute list")
        return [att for t in token for att in _one_att(t)]
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return [FetchAtt(name) for name in _MACROS[token.upper()]]
    return _one_att(token)


def _one_att(token: Token) -> list[FetchAtt]:
    if not isinstance(token, Atom):
        raise ParseError("invalid fetch attribute")
    upper = token.upper()
    if upper in _SIMPLE_ATTS:
        return [FetchAtt(upper)]
    m = _BODY_ATT.fullmatch(token)
    if not m:
        raise ParseError("unknown fetch attribute " + token[:40])
    name, inner = m.group(1).upper(), m.group(2)
    partial = None
    if m.group(3) is not None:
        partial = (int(m.group(3)), int(m.group(4)))
    section, fields = _section(inner)
    return [FetchAtt(name, section, fields, partial)]


def _section(inner: str) -> tuple[str, tuple[str, ...]]:
    spec, _, rest = inner.partition(" ")
    upper = spec.upper()
    parts = upper.split(".") if upper else []
    numbers = []
    while parts and parts[0].isdigit():
        if parts[0].startswith("0") or len(parts[0]) > 5:
            raise ParseError("invalid section part number")
        numbers.append(parts.pop(0))
    text = ".".join(parts)
    if text not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
        raise ParseError("invalid section " + inner[:40])
    if text == "MIME" and not numbers:
        raise ParseError("MIME needs a part number")
    if text.startswith("HEADER.FIELDS"):
        rest = rest.strip()
        if not (rest.startswith("(") and rest.endswith(")")):
            raise ParseError("HEADER.FIELDS needs a list of field names")
        names = rest[1:-1].replace('"', " ").split()
        if not names or not all(_FIELD_NAME.fullmatch(n) for n in names):
            raise ParseError("invalid header field names")
        return ".".join(numbers + [text]), tuple(n.upper() for n in names)
    if rest:
        raise ParseError("unexpected text in section")
    return ".".join(numbers + ([text] if text else [])), ()


# ---- dates --------------------------------------------------------------------------------------

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")


def imap_date(token: Token) -> datetime.date:
    """date = 1*2DIGIT "-" month "-" 4DIGIT, as an atom or a quoted string."""
    text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
    m = _DATE.fullmatch(text) if isinstance(text, str) else None
    if not m or m.group(2).upper() not in _MONTHS:
        raise ParseError("invalid date (expected e.g. 1-Feb-2026)")
    try:
        return datetime.date(int(m.group(3)), _MONTHS.index(m.group(2).upper()) + 1, int(m.group(1)))
    except ValueError:
        raise ParseError("invalid date") from None

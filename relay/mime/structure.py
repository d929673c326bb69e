# The MIME structure of a stored message, recorded once while it streams in (a listener of
# relay.mime.stream) and rendered later for IMAP without reading the message again: BODY and
# BODYSTRUCTURE, ENVELOPE (RFC 3501 sec. 7.4.2) and the byte range of a body section in the blob.
# The record is a small JSON-serialisable dict, one per message:
#   a part:    {"type", "subtype", "params", "hs", "bs", "be" (header start, body start, body end:
#               offsets in the blob), optional "lines", "id", "description", "encoding",
#               "disposition": [value, params], "language", "location", "md5",
#               "parts": [child parts] (multipart) or "message": {part} (message/rfc822)}
#   a message (the top level and each message/rfc822 body) is a part with "envelope": the raw
#   values of its Date, Subject, From, Sender, Reply-To, To, Cc, Bcc, In-Reply-To, Message-ID.
# The record is capped (relay/mime/limits.py): parts, nesting, characters per value and
# in all, parameters per part. Past the caps, the rest of a multipart is one application/octet-stream
# part covering its remaining children, a part nested too deep is one application/octet-stream
# part, and a message/rfc822 part whose message does not fit is rendered as application/octet-stream.
# The recorder applies the caps while it records; capped() applies the same rules to a record made
# before them, so that every rendering stays within them.
# Must never hold body bytes: only header values and offsets.
from typing import Any

from relay.mime.limits import (
    STRUCTURE_MAX_DEPTH,
    STRUCTURE_MAX_PARAMS,
    STRUCTURE_MAX_PARTS,
    STRUCTURE_MAX_TEXT,
    STRUCTURE_MAX_VALUE,
)
from relay.mime.stream import Part, split_params

__all__ = ["StructureRecorder", "capped", "bodystructure", "envelope", "section_range"]

ENVELOPE_FIELDS = ("date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc", "in-reply-to", "message-id")
_PART_FIELDS = {
    "content-id": "id",
    "content-description": "description",
    "content-md5": "md5",
    "content-transfer-encoding": "encoding",
    "content-language": "language",
    "content-location": "location",
}
_CHILDREN = ("parts", "message")
# A record (a part, see above): JSON, its values of the several types listed there.
Record = dict[str, Any]
# An address header's token: ("atom"|"quoted"|"comment"|"literal"|"special", text)
Token = tuple[str, str]


class _Budget:
    """Parts and characters still allowed in one record; once a part does not fit, none does."""

    def __init__(self) -> None:
        self.parts = 0
        self.text = 0
        self.full = False

    def admit(self, record: Record, always: bool = False) -> bool:
        cost = _cost(record)
        if not always and (self.full or self.parts >= STRUCTURE_MAX_PARTS or self.text + cost > STRUCTURE_MAX_TEXT):
            self.full = True
            return False
        self.parts += 1
        self.text += cost
        return True


class StructureRecorder:
    """relay.mime.stream listener that builds the (capped) structure record; `structure` is set at the end."""

    def __init__(self) -> None:
        self.structure: Record | None = None
        self._records: dict[int, Record] = {}  # id(part) -> record of each recorded part still open
        self._opaque: set[int] = set()  # id(part) of recorded parts whose children are not
        self._tails: dict[int, Record] = {}  # id(multipart) -> the opaque part covering its rest
        self._budget = _Budget()

    def part_start(self, part: Part) -> None:
        parent = None
        if part.parent is not None:
            parent = self._records.get(id(part.parent))
            if parent is None or id(part.parent) in self._opaque:
                return  # inside a part that is described as a whole
        if part.depth > STRUCTURE_MAX_DEPTH:
            assert part.body_start is not None  # the header block is done at part_start
            record = _opaque_part(part.header_start, part.body_start)
            self._opaque.add(id(part))
        else:
            record = _trim(_describe(part))
        if not self._budget.admit(record, always=parent is None):
            assert parent is not None  # the top level is always admitted
            if "parts" in parent and id(part.parent) not in self._tails:
                tail = _opaque_part(part.header_start, part.header_start, part.header_start)
                parent["parts"].append(tail)
                self._tails[id(part.parent)] = tail
            return
        if parent is None:
            self.structure = record
        elif "parts" in parent:
            parent["parts"].append(record)
        else:
            parent["message"] = record
        self._records[id(part)] = record

    def part_body(self, part: Part, data: memoryview) -> None:
        pass

    def part_end(self, part: Part) -> None:
        record = self._records.pop(id(part), None)
        self._tails.pop(id(part), None)
        if record is None:
            tail = self._tails.get(id(part.parent)) if part.parent is not None else None
            if tail is not None:
                tail["be"] = part.body_end
            return
        record["be"] = part.body_end
        opaque = id(part) in self._opaque
        self._opaque.discard(id(part))
        if part.lines is not None and (part.content_type == "text" or part.kind == "message") and not opaque:
            record["lines"] = part.lines


def _describe(part: Part) -> Record:
    record: Record = {
        "type": part.content_type,
        "subtype": part.subtype,
        "hs": part.header_start,
        "bs": part.body_start,
    }
    if part.params:  # as written (IMAP servers keep the case of parameter names)
        content_type = part.header("content-type")
        assert content_type is not None  # the params come from it
        record["params"] = split_params(content_type, lower=False)[1]
    seen: set[str] = set()
    for lower, value in part.content_fields():  # all the fields looked for are Content-* fields
        key = _PART_FIELDS.get(lower)
        if key is not None and key not in seen:
            seen.add(key)
            record[key] = value.strip()
        elif lower == "content-disposition" and "disposition" not in seen:
            seen.add("disposition")
            record["disposition"] = list(split_params(value, lower=False))
    if part.is_message:
        fields: dict[str, str] = {}
        for name, value in part.headers:
            lower = name.lower()
            if lower in ENVELOPE_FIELDS and lower not in fields:
                fields[lower] = value.strip()
        record["envelope"] = fields
    if part.kind == "multipart":
        record["parts"] = []
    return record


def _opaque_part(header_start: int, body_start: int, body_end: int | None = None) -> Record:
    record: Record = {"type": "application", "subtype": "octet-stream", "hs": header_start, "bs": body_start}
    if body_end is not None:
        record["be"] = body_end
    return record


def _trim(record: Record) -> Record:
    """The record's own fields (not its children) within the per-value and per-part caps."""
    out: Record = {}
    for key, value in record.items():
        if key in _CHILDREN:
            continue
        if isinstance(value, str):
            value = value[:STRUCTURE_MAX_VALUE]
        elif key in ("params", "envelope"):
            value = _trim_params(value)
        elif key == "disposition":
            value = [value[0][:STRUCTURE_MAX_VALUE], _trim_params(value[1])]
        out[key] = value
    if "parts" in record:
        out["parts"] = []
    return out


def _trim_params(params: dict[str, str]) -> dict[str, str]:
    kept = list(params.items())[:STRUCTURE_MAX_PARAMS]
    return {k[:STRUCTURE_MAX_VALUE]: v[:STRUCTURE_MAX_VALUE] for k, v in kept}


def _cost(record: Record) -> int:
    """Characters of the record's own text (names and values)."""
    return sum(_text_size(value) for key, value in record.items() if key not in _CHILDREN)


def _text_size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0


def capped(structure: Record) -> Record:
    """The record within the caps, as the recorder would have made it (records made before the caps
    may exceed them); a record within them comes back equal."""
    out = _cap(structure, 0, _Budget())
    assert out is not None  # the top level is always admitted
    return out


def _cap(record: Record, depth: int, budget: _Budget) -> Record | None:
    if depth > STRUCTURE_MAX_DEPTH:
        out = _opaque_part(record["hs"], record["bs"], record["be"])
    else:
        out = _trim(record)
    if not budget.admit(out, always=depth == 0):
        return None
    if depth > STRUCTURE_MAX_DEPTH:
        return out
    if "parts" in record:
        for child in record["parts"]:
            kept = _cap(child, depth + 1, budget)
            if kept is None:
                out["parts"].append(_opaque_part(child["hs"], child["hs"], record["parts"][-1]["be"]))
                break
            out["parts"].append(kept)
    if "message" in record:
        inner = _cap(record["message"], depth + 1, budget)
        if inner is not None:
            out["message"] = inner
    return out


# -- IMAP rendering ------------------------------------------------------------------------------


def bodystructure(structure: Record, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (extensible) or BODY of the message."""
    return _body(structure, extensible)


def _body(part: Record, ext: bool) -> bytes:
    if "parts" in part:
        children = part["parts"] or [_EMPTY_TEXT]
        out = b"(" + b"".join(_body(child, ext) for child in children) + b" " + _string(part["subtype"])
        if ext:
            out += b" " + _params(part.get("params")) + b" " + _extension_tail(part)
        return out + b")"
    params = part.get("params") or {}
    media = (part["type"], part["subtype"])
    if part["type"] == "text" and not any(name.lower() == "charset" for name in params):
        params = {"charset": "us-ascii", **params}  # the RFC 2045 default
    if media == ("message", "rfc822") and "message" not in part:
        media = ("application", "octet-stream")  # nested too deep to be parsed
    fields = b" ".join(
        (
            _string(media[0]),
            _string(media[1]),
            _params(params),
            _nstring(part.get("id")),
            _nstring(part.get("description")),
            _string(part.get("encoding") or "7bit"),
            str(part["be"] - part["bs"]).encode(),
        )
    )
    if "message" in part:
        inner = part["message"]
        fields += b" " + envelope(inner) + b" " + _body(inner, ext) + b" " + str(part.get("lines", 0)).encode()
    elif part["type"] == "text":
        fields += b" " + str(part.get("lines", 0)).encode()
    if ext:
        fields += b" " + _nstring(part.get("md5")) + b" " + _extension_tail(part)
    return b"(" + fields + b")"


_EMPTY_TEXT: Record = {"type": "text", "subtype": "plain", "hs": 0, "bs": 0, "be": 0, "lines": 0}


def _extension_tail(part: Record) -> bytes:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc"""
    disposition = part.get("disposition")
    dsp = b"NIL" if disposition is None else (b"(" + _string(disposition[0]) + b" " + _params(disposition[1]) + b")")
    languages = [tag.strip() for tag in (part.get("language") or "").split(",") if tag.strip()]
    lang = b"(" + b" ".join(_string(tag) for tag in languages) + b")" if languages else b"NIL"
    return dsp + b" " + lang + b" " + _nstring(part.get("location"))


def _params(params: dict[str, str] | None) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(_string(k) + b" " + _string(v) for k, v in params.items()) + b")"


def envelope(message: Record) -> bytes:
    """ENVELOPE of a message record (the top level or a message/rfc822 body)."""
    fields = message.get("envelope", {})
    sender_default = fields.get("from")
    items = [
        _nstring(fields.get("date") or None),
        _nstring(fields.get("subject") or None),
        _addresses(fields.get("from")),
        _addresses(fields.get("sender") or sender_default),
        _addresses(fields.get("reply-to") or sender_default),
        _addresses(fields.get("to")),
        _addresses(fields.get("cc")),
        _addresses(fields.get("bcc")),
        _nstring(fields.get("in-reply-to") or None),
        _nstring(fields.get("message-id") or None),
    ]
    return b"(" + b" ".join(items) + b")"


def _addresses(value: str | None) -> bytes:
    if not value:
        return b"NIL"
    entries = parse_address_list(value)
    if not entries:
        return b"NIL"
    return b"(" + b"".join(b"(" + b" ".join(_nstring(x) for x in entry) + b")" for entry in entries) + b")"


def _nstring(value: str | None) -> bytes:
    return b"NIL" if value is None else _string(value)


def _string(value: str) -> bytes:
    """A quoted string, or a literal when the value has 8-bit bytes, CR, LF or NUL."""
    raw = value.encode("utf-8", "surrogateescape")
    if any(b > 0x7E or b in (0, 10, 13) for b in raw):
        return b"{%d}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# -- sections -------------------------------------------------------------------------------------


def section_range(structure: Record, section: str) -> tuple[int, int] | None:
    """(start, end) in the blob of an IMAP body section ("", "HEADER", "TEXT", "1.2", "1.2.MIME",
    "2.HEADER", "2.TEXT" of a message/rfc822 part), or None when the message has no such part.
    HEADER.FIELDS sections are cut from the HEADER range by the caller."""
    numbers, suffix = [], ""
    for item in section.upper().split(".") if section else []:
        if item.isdigit() and not suffix and int(item) > 0:
            numbers.append(int(item))
        elif not suffix and item in ("HEADER", "TEXT", "MIME"):
            suffix = item
        else:
            return None
    if not numbers:
        if suffix == "MIME":
            return None
        return _message_range(structure, suffix)
    part: Record = structure
    message: Record | None = structure  # message: the message whose part numbers come next
    for depth, n in enumerate(numbers):
        if depth:
            if "message" not in part:
                if "parts" not in part:
                    return None
                message = None
            else:
                message = part["message"]
        container = message if message is not None else part
        if "parts" in container:
            if n > len(container["parts"]):
                return None
            part = container["parts"][n - 1]
        elif n == 1 and message is not None:
            part = dict(message, _body_of_message=True)
        else:
            return None
    if suffix == "MIME":
        return part["hs"], part["bs"]
    if suffix:
        if "message" not in part:
            return None
        return _message_range(part["message"], suffix)
    return part["bs"], part["be"]


def _message_range(message: Record, suffix: str) -> tuple[int, int]:
    if suffix == "HEADER":
        return message["hs"], message["bs"]
    if suffix == "TEXT":
        return message["bs"], message["be"]
    return message["hs"], message["be"]


# -- addresses (RFC 5322 sec. 3.4, obsolete route syntax included) --------------------------------


def parse_address_list(value: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """IMAP address structures (name, adl, mailbox, host); groups as (None, None, name, None) ...
    (None, None, None, None). Encoded words stay as they are."""
    out: list[tuple[str | None, str | None, str | None, str | None]] = []
    tokens = _tokens(value)
    i = 0
    in_group = False
    while i < len(tokens):
        words, comment, i, stop = _collect(tokens, i, ":<,;")
        kind = tokens[i][1] if i < len(tokens) else None
        if kind == ":" and not in_group:
            out.append((None, None, _phrase(words) or "", None))
            in_group = True
            i += 1
            continue
        if kind == "<":
            route, addr, i = _angle(tokens, i + 1)
            name = _phrase(words) or None
            out.append((name, route, *addr))
            i = _collect(tokens, i, ",;")[2]
            kind = tokens[i][1] if i < len(tokens) else None
        elif words:
            out.append((comment, None, *_addr_spec(words)))
        if kind == ";" and in_group:
            out.append((None, None, None, None))
            in_group = False
        i += 1
    if in_group:
        out.append((None, None, None, None))
    return out


def _collect(tokens: list[Token], i: int, stops: str) -> tuple[list[Token], str | None, int, str | None]:
    """Word tokens up to one of the stop specials; returns (words, last comment, index, stop)."""
    words: list[Token] = []
    comment = None
    while i < len(tokens):
        kind, text = tokens[i][0], tokens[i][1]
        if kind == "special" and text in stops:
            return words, comment, i, text
        if kind == "comment":
            comment = text.strip() or comment
        else:
            words.append(tokens[i])
        i += 1
    return words, comment, i, None


def _angle(tokens: list[Token], i: int) -> tuple[str | None, tuple[str, str], int]:
    """After "<": (route or None, (mailbox, host), index after ">")."""
    words: list[Token] = []
    while i < len(tokens) and tokens[i] != ("special", ">"):
        if tokens[i][0] != "comment":
            words.append(tokens[i])
        i += 1
    route = None
    colon = next((n for n, t in enumerate(words) if t == ("special", ":")), None)
    if colon is not None and words and words[0] == ("special", "@"):
        route = "".join(text for _, text in words[:colon])
        words = words[colon + 1 :]
    return route, _addr_spec(words), i + 1


def _addr_spec(words: list[Token]) -> tuple[str, str]:
    """(mailbox, host); missing ones named as Dovecot names them."""
    at = max((n for n, t in enumerate(words) if t == ("special", "@")), default=None)
    if at is None:
        return _raw(words) or "MISSING_MAILBOX", "MISSING_DOMAIN"
    return _raw(words[:at]) or "MISSING_MAILBOX", _raw(words[at + 1 :]) or "MISSING_DOMAIN"


def _raw(words: list[Token]) -> str:
    """Tokens as one string, quoted parts unquoted (as Dovecot gives a quoted local part)."""
    return "".join(text for _, text in words)


def _phrase(words: list[Token]) -> str:
    """A display name: words joined by single spaces, "." kept with the word before it."""
    out: list[str] = []
    for kind, text in words:
        if kind == "special" and text == "." and out:
            out[-1] += "."
        elif kind != "special":
            out.append(text)
    return " ".join(out)


def _tokens(value: str) -> list[Token]:
    """The tokens of an address header."""
    tokens: list[Token] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == '"':
            text, i = _delimited(value, i + 1, '"')
            tokens.append(("quoted", text))
        elif ch == "(":
            depth, j, chars = 1, i + 1, []
            while j < n and depth:
                c = value[j]
                if c == "\\" and j + 1 < n:
                    chars.append(value[j + 1])
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(c, 0)
                if depth:
                    chars.append(c)
                j += 1
            tokens.append(("comment", "".join(chars)))
            i = j
        elif ch == "[":
            end = value.find("]", i)
            end = n if end < 0 else end + 1
            tokens.append(("atom", value[i:end]))
            i = end
        elif ch in "<>@,;:.":
            tokens.append(("special", ch))
            i += 1
        else:
            j = i
            while j < n and value[j] not in ' \t\r\n"(<>@,;:.[':
                j += 1
            tokens.append(("atom", value[i:j]))
            i = j
    return tokens


def _delimited(value: str, i: int, close: str) -> tuple[str, int]:
    out = []
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if ch == close:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    return "".join(out), i

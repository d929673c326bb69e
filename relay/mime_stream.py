# Incremental MIME parser (RFC 5322 header blocks, RFC 2045/2046 multiparts, message/rfc822),
# sans-I/O: feed() it a message's bytes in chunks of any size and it reports each part to a
# listener while the bytes stream by:
#   listener.part_start(part)       the part's header block is complete (type, params, offsets)
#   listener.part_body(part, data)  body bytes of a leaf part (a memoryview valid during the call)
#   listener.part_end(part)         the part is over (body_end, size, lines)
# It never holds the message: only the header block being parsed and a short undecided tail (a
# possible boundary line cut by a chunk edge). Boundaries are found with bytes.find over whole
# chunks (memchr for "-"), so a base64 body costs no Python work per line. It never raises on malformed input: a
# missing boundary, a missing header/body separator or an unterminated part becomes body bytes.
import re

MAX_HEADER_BYTES = 256 * 1024  # of one header block; what follows is taken as body
MAX_HEADERS = 1000             # fields kept per header block; the block ends there too
MAX_DEPTH = 32                 # nesting of multiparts and message/rfc822; deeper ones are leaves
MAX_PARTS = 10_000             # per message; further parts are body of the last one
MAX_BOUNDARY_LINE = 1024       # a longer line is never a boundary line
_LOOKAHEAD = 4 * MAX_BOUNDARY_LINE
_DASH_PROBES = 8               # dashes looked at before searching for the markers instead
_NUMPY_MIN = 32 * 1024         # shorter spans: bytes.count (numpy's call overhead, and it lets go of the GIL)

_HEADERS, _BODY, _SKIP = 0, 1, 2  # states of the innermost open part (_SKIP: preamble/epilogue)
_LF = 10
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


class Part:
    """One MIME entity. Offsets are absolute positions in the fed stream; body_end, size and lines
    are set at part_end. kind: "multipart" (child parts follow), "message" (message/rfc822: one
    encapsulated message follows) or "leaf" (part_body calls follow). is_message: the top-level
    message or a message encapsulated in a message/rfc822 part (it has that part's path, or "1"
    for a message/rfc822 top level). lines: line feeds in the body (as IMAP servers such as
    Dovecot count body lines), for text/* parts and everything inside a message/rfc822 part
    (incl. the message/rfc822 part itself), else None."""

    __slots__ = ("path", "parent", "depth", "is_message", "headers", "headers_truncated",
                 "content_type", "subtype", "params", "kind", "header_start", "body_start",
                 "body_end", "size", "lines", "_children", "_marker", "_needle", "_lf_start", "_header_bytes")
    # headers: (name, value) in order, unfolded (line ends removed), value without the blanks
    # after the colon; bytes that are not UTF-8 are kept as surrogate escapes.

    def __init__(self, path: str, parent: "Part | None", header_start: int, is_message: bool) -> None:
        self.path = path
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.is_message = is_message
        self.headers: list[tuple[str, str]] = []
        self.headers_truncated = False
        self.content_type = "text"
        self.subtype = "plain"
        self.params: dict[str, str] = {}
        self.kind = "leaf"
        self.header_start = header_start
        self.body_start: int | None = None
        self.body_end: int | None = None
        self.size: int | None = None
        self.lines: int | None = None
        self._children = 0
        self._marker = b""    # b"--" + boundary
        self._needle = b""    # b"\n--" + boundary: what bytes.find looks for
        self._lf_start: int | None = None
        self._header_bytes = 0

    def header(self, name: str) -> str | None:
        """The first field of that name (case-insensitive), unfolded."""
        name = name.lower()
        for field, value in self.headers:
            if field.lower() == name:
                return value
        return None

    def __repr__(self) -> str:
        return (f"Part({self.path!r}, {self.content_type}/{self.subtype}, {self.kind},"
                f" body={self.body_start}..{self.body_end})")


class MimeStreamParser:
    def __init__(self, listener) -> None:
        self.listener = listener
        self._offset = 0         # absolute offset just after the last byte fed
        self._tail = b""         # undecided bytes at the end of what was fed (they end at _offset)
        self._stack: list[Part] = []
        self._open_boundaries: list[Part] = []  # multiparts whose close delimiter is still to come
        self._parts = 0
        self._in_rfc822 = 0      # open message/rfc822 parts: everything inside has its lines counted
        self._lf = 0             # line feeds counted so far (only while counting)
        self._counting = False
        self._line_start = True  # the next byte starts a line whose line end was consumed already
        self._eol = 2            # length of the line end of the last header or delimiter line
        self._state = _HEADERS
        self._closed = False
        self._push(Part("", None, 0, True))

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data) -> None:
        if self._closed or not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        base = self._offset
        self._offset += len(data)
        start = 0
        if self._tail:
            tail, self._tail = self._tail, b""
            head = tail + data[:_LOOKAHEAD]
            used = self._run(head, 0, base - len(tail), False)
            if len(data) <= _LOOKAHEAD:
                self._tail = head[used:]
                return
            if used >= len(tail):
                start = used - len(tail)
            else:  # a long header line: join what is left of the tail with the whole chunk
                data = head[used:len(tail)] + data
                base -= len(tail) - used
        used = self._run(data, start, base, False)
        self._tail = data[used:]

    def close(self) -> None:
        """End of the message: whatever is open ends here."""
        if self._closed:
            return
        if self._tail:
            tail, self._tail = self._tail, b""
            self._run(tail, 0, self._offset - len(tail), True)
        while self._stack:
            self._end(self._stack[-1], self._offset)
        self._closed = True

    # -- scanning ------------------------------------------------------------------------------

    def _run(self, buf: bytes, pos: int, base: int, final: bool) -> int:
        """Consume buf[pos:] as far as it can be decided; returns where the undecided rest starts."""
        end = len(buf)
        while pos < end:
            if self._state == _HEADERS:
                pos, stop = self._header_lines(buf, pos, base, final)
            else:
                pos, stop = self._content(buf, pos, base, final)
            if stop:
                break
        return pos

    def _header_lines(self, buf: bytes, pos: int, base: int, final: bool) -> tuple[int, bool]:
        part = self._stack[-1]
        end = len(buf)
        while True:
            nl = buf.find(b"\n", pos)
            if nl >= 0:
                line_end = nl + 1
            elif part._header_bytes + end - pos > MAX_HEADER_BYTES:
                part.headers_truncated = True
                self._header_done(part, base + pos)
                return pos, False
            elif final:
                line_end = end
            else:
                return pos, True
            text = buf[pos:line_end].rstrip(b"\r\n")
            if not text:  # the empty line ending the header block
                self._consumed(buf, pos, line_end)
                self._header_done(part, base + line_end)
                return line_end, False
            if text[:2] == b"--" and self._open_boundaries:
                match = self._match_boundary(text)
                if match is not None:  # the part ends before its header block did
                    self._header_done(part, base + pos, ending=True)
                    delimiter, unwound = base + pos, 0
                    if base + pos > part.header_start:  # the line end before it is the delimiter's
                        delimiter -= self._eol
                        if self._counting:
                            self._lf -= 1
                            unwound = 1
                    self._delimiter(match, delimiter, buf, pos, line_end, base, unwound)
                    return line_end, False
            if len(part.headers) >= MAX_HEADERS or part._header_bytes + len(text) > MAX_HEADER_BYTES:
                part.headers_truncated = True
                self._header_done(part, base + pos)
                return pos, False
            if text[:1] in (b" ", b"\t"):
                if part.headers:
                    name, value = part.headers[-1]
                    part.headers[-1] = (name, value + text.decode("utf-8", "surrogateescape"))
            else:
                field = _FIELD.match(text)
                if field is None:  # no empty line before the body: this line starts it
                    self._header_done(part, base + pos)
                    return pos, False
                value = text[field.end():].lstrip(b" \t").decode("utf-8", "surrogateescape")
                part.headers.append((field.group(1).decode("ascii"), value))
            part._header_bytes += line_end - pos
            self._consumed(buf, pos, line_end)
            pos = line_end
            if pos >= end:
                return pos, False

    def _content(self, buf: bytes, pos: int, base: int, final: bool) -> tuple[int, bool]:
        """Body, preamble or epilogue bytes up to the next boundary line of an open multipart."""
        end = len(buf)
        if not self._open_boundaries:
            self._take(buf, pos, end)
            return end, False
        scan = pos
        line = pos if self._line_start else -1
        while True:
            if line < 0:
                line = self._find_marker(buf, scan)
                if line < 0:
                    break
            if buf[line:line + 2] == b"--" or end - line < 2:
                line_end = buf.find(b"\n", line, line + MAX_BOUNDARY_LINE)
                if line_end < 0 and end - line < MAX_BOUNDARY_LINE and not final:
                    return self._hold(buf, pos, line), True
                line_end = end if line_end < 0 else line_end + 1
                if line_end - line <= MAX_BOUNDARY_LINE:
                    match = self._match_boundary(buf[line:line_end].rstrip(b"\r\n"))
                    if match is not None:
                        delimiter = self._line_end_before(buf, pos, line)
                        self._take(buf, pos, delimiter)
                        self._delimiter(match, base + delimiter, buf, delimiter, line_end, base, 0)
                        return line_end, False
            scan = line + 1
            line = -1
        keep = end if final else self._possible_marker_start(buf, pos)
        self._take(buf, pos, keep)
        return keep, keep < end

    def _find_marker(self, buf: bytes, scan: int) -> int:
        """Start of the first line after buf[scan] that may begin a boundary line. First by memchr
        for "-" (base64 and armored bodies have next to none): a "--" at a line start is a
        candidate; a body with many dashes falls back to searching the markers themselves, the
        innermost first and the outer ones only before its hit."""
        start = scan
        for _ in range(_DASH_PROBES):
            dash = buf.find(b"-", scan)
            if dash < 0:
                return -1
            if dash > start and buf[dash - 1] == _LF and buf[dash + 1:dash + 2] in (b"-", b""):
                return dash
            scan = dash + 1
        scan = max(start, scan - 2)
        first = -1
        for multipart in reversed(self._open_boundaries):
            needle = multipart._needle
            hit = buf.find(needle, scan, len(buf) if first < 0 else first - 1 + len(needle))
            if hit >= 0 and (first < 0 or hit + 1 < first):
                first = hit + 1
        return first

    def _possible_marker_start(self, buf: bytes, pos: int) -> int:
        """Where a line end at the end of buf may begin a boundary line that the next data completes."""
        end = len(buf)
        keep = end
        longest = max(len(multipart._needle) for multipart in self._open_boundaries)
        nl = buf.rfind(b"\n", max(pos, end - longest))
        if nl >= 0 and any(multipart._needle.startswith(buf[nl:end]) for multipart in self._open_boundaries):
            keep = nl
        elif buf.endswith(b"\r"):
            keep = end - 1
        if pos < keep < end and buf[keep - 1] == 13 and buf[keep] == _LF:
            keep -= 1
        return max(keep, pos)

    def _hold(self, buf: bytes, pos: int, line: int) -> int:
        """Take the content before the line end preceding buf[line]; the rest waits for more data."""
        keep = self._line_end_before(buf, pos, line)
        self._take(buf, pos, keep)
        return keep

    def _line_end_before(self, buf: bytes, pos: int, line: int) -> int:
        if line == pos:
            return pos  # its line end was consumed before (header block or delimiter line)
        if line - 2 >= pos and buf[line - 2] == 13:
            return line - 2
        return line - 1

    def _match_boundary(self, text: bytes) -> tuple[Part, bool] | None:
        """(multipart, closes) when text is a delimiter line of an open multipart, innermost first.
        Past MAX_PARTS only close delimiters count: further parts are body of the last one."""
        for multipart in reversed(self._open_boundaries):
            marker = multipart._marker
            if text.startswith(marker):
                rest = text[len(marker):]
                closes = rest[:2] == b"--"
                if not rest[2 if closes else 0:].strip(b" \t") and (closes or self._parts < MAX_PARTS):
                    return multipart, closes
        return None

    # -- events --------------------------------------------------------------------------------

    def _take(self, buf: bytes, start: int, end: int) -> None:
        """Content bytes [start, end) of the innermost part."""
        if end <= start:
            return
        if self._counting:
            self._lf += _line_feeds(buf, start, end)
        self._line_start = False
        if self._state == _BODY:
            self.listener.part_body(self._stack[-1], memoryview(buf)[start:end])

    def _consumed(self, buf: bytes, start: int, end: int) -> None:
        """Header or delimiter line bytes [start, end)."""
        if self._counting:
            self._lf += buf.count(b"\n", start, end)
        self._eol = 2 if end - start >= 2 and buf[end - 2] == 13 else 1
        self._line_start = True

    def _delimiter(self, match: tuple[Part, bool], delimiter: int, buf: bytes, start: int,
                   line_end: int, base: int, unwound: int) -> None:
        """A boundary line from absolute `delimiter` (its preceding line end) to buf[line_end]: the
        parts inside its multipart end; a new child part starts unless it is the close delimiter.
        unwound: line feeds of buf[start:] taken back from the count."""
        multipart, closes = match
        while self._stack[-1] is not multipart:
            self._end(self._stack[-1], delimiter)
        self._consumed(buf, start, line_end)
        self._lf += unwound
        if closes:
            self._open_boundaries.remove(multipart)
            self._state = _SKIP
        else:
            multipart._children += 1
            n = multipart._children
            self._push(Part(f"{multipart.path}.{n}" if multipart.path else str(n), multipart,
                            base + line_end, False))
        self._update_counting()

    def _push(self, part: Part) -> None:
        self._parts += 1
        self._stack.append(part)
        self._state = _HEADERS
        self._line_start = True

    def _header_done(self, part: Part, body_start: int, ending: bool = False) -> None:
        part.body_start = body_start
        self._set_type(part)
        nested_ok = part.depth < MAX_DEPTH and self._parts < MAX_PARTS and not ending
        if part.content_type == "multipart" and "boundary" in part.params and \
                0 < len(part.params["boundary"]) <= 200 and (nested_ok or ending):
            part.kind = "multipart"
            if not ending:
                part._marker = b"--" + part.params["boundary"].encode("utf-8", "surrogateescape")
                part._needle = b"\n" + part._marker
                self._open_boundaries.append(part)
                self._state = _SKIP
        elif (part.content_type, part.subtype) == ("message", "rfc822") and nested_ok:
            part.kind = "message"
        else:
            part.kind = "leaf"
            self._state = _BODY
        self._line_start = True
        if part.kind == "message":
            self._in_rfc822 += 1
        self._update_counting()
        if self._counting:
            part._lf_start = self._lf
        self.listener.part_start(part)
        if part.kind == "message":
            self._push(Part(part.path or "1", part, body_start, True))
            self._update_counting()

    def _set_type(self, part: Part) -> None:
        value = part.header("content-type")
        digest = part.parent is not None and part.parent.kind == "multipart" and \
            part.parent.subtype == "digest"
        main, sub, params = ("message", "rfc822", {}) if digest else ("text", "plain", {})
        if value is not None:
            full, parsed = split_params(value)
            ctype, slash, csub = full.partition("/")
            ctype, csub = ctype.strip().lower(), csub.strip().lower()
            if slash and _TOKEN.fullmatch(ctype) and _TOKEN.fullmatch(csub):
                main, sub, params = ctype, csub, parsed
        part.content_type, part.subtype, part.params = main, sub, params

    def _end(self, part: Part, at: int) -> None:
        if part.body_start is None:
            self._header_done(part, at, ending=True)
        part.body_end = max(at, part.body_start)
        part.size = part.body_end - part.body_start
        if part._lf_start is not None:
            part.lines = self._lf - part._lf_start
        self._stack.pop()
        if part in self._open_boundaries:
            self._open_boundaries.remove(part)
        if part.kind == "message":
            self._in_rfc822 -= 1
        if self._stack:
            self._state = _SKIP if self._stack[-1].kind == "multipart" else _BODY
        self._update_counting()
        self.listener.part_end(part)

    def _update_counting(self) -> None:
        part = self._stack[-1] if self._stack else None
        self._counting = self._in_rfc822 > 0 or (
            part is not None and self._state == _BODY and part.content_type == "text")


def _line_feeds(buf: bytes, start: int, end: int) -> int:
    """LF bytes in buf[start:end]. numpy compares with SIMD: about 10x bytes.count on big spans,
    which matters for large text bodies (their lines are counted). Imported on first use: it adds
    ~12 MB to the hub's memory, and DICOM mails (no text parts) never need it."""
    if end - start < _NUMPY_MIN:
        return buf.count(b"\n", start, end)
    import numpy
    return int(numpy.count_nonzero(numpy.frombuffer(buf, numpy.uint8, end - start, start) == _LF))


def split_params(value: str, lower: bool = True) -> tuple[str, dict[str, str]]:
    """'type/sub; a=1; b="x;y"' -> ('type/sub', {'a': '1', 'b': 'x;y'}); names lower-cased unless
    lower=False, the first of a repeated name wins, RFC 822 comments dropped, RFC 2231 names kept
    as written."""
    items = _split_outside_quotes(value)
    params: dict[str, str] = {}
    for item in items[1:]:
        name, eq, raw = item.partition("=")
        name = name.strip().lower() if lower else name.strip()
        if eq and name:
            params.setdefault(name, _unquote(raw.strip()))
    return items[0].strip(), params


def _split_outside_quotes(value: str) -> list[str]:
    items, current, quoted, escaped, comment = [], [], False, False, 0
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or comment):
            escaped = True
        elif comment:
            comment += {"(": 1, ")": -1}.get(ch, 0)
            continue
        elif ch == '"':
            quoted = not quoted
        elif ch == "(" and not quoted:
            comment = 1
            continue
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
            continue
        if not comment:
            current.append(ch)
    items.append("".join(current))
    return items


def _unquote(raw: str) -> str:
    if not raw.startswith('"'):
        return raw
    out, escaped = [], False
    for ch in raw[1:]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            break
        else:
            out.append(ch)
    return "".join(out)


class Listeners:
    """Several listeners on one parser (e.g. the structure recorder and a policy check), called
    in order."""

    def __init__(self, *listeners) -> None:
        self.listeners = listeners

    def part_start(self, part: Part) -> None:
        for listener in self.listeners:
            listener.part_start(part)

    def part_body(self, part: Part, data) -> None:
        for listener in self.listeners:
            listener.part_body(part, data)

    def part_end(self, part: Part) -> None:
        for listener in self.listeners:
            listener.part_end(part)

# Incremental MIME parser (RFC 5322 header blocks, RFC 2045/2046 multiparts, message/rfc822),
# sans-I/O: feed() it a message's bytes in chunks of any size and it reports each part to a
# listener while the bytes stream by:
#   listener.part_start(part)       the part's header block is complete (type, params, offsets)
#   listener.part_body(part, data)  body bytes of a leaf part (a memoryview valid during the call)
#   listener.part_end(part)         the part is over (body_end, size, lines, defects)
#   listener.skipped(part, data)    optional: preamble and epilogue bytes of a multipart
# It never holds the message: only the header line being parsed and a short undecided tail (a
# possible boundary line cut by a chunk edge). It never raises on malformed input: a missing
# boundary, a missing header/body separator or an unterminated part becomes body bytes, and what
# a mail reader could read otherwise is noted in part.defects (the encryption policy refuses it).
# Its cost is linear in the input whatever the input (issue 20): header blocks are cut into fields
# by regular expressions over whole blocks, boundary lines are searched with bytes.find over whole
# chunks (memchr for "-" first: base64 and armored bodies have next to none), each search resumes
# where the last stopped, and lines that start like a boundary but are none are counted and, past
# MAX_FALSE_DELIMITERS, end the structure (the rest is body of the innermost part).
import re
from typing import Protocol

MAX_HEADER_BYTES = 256 * 1024  # of one header block; what follows is taken as body
MAX_HEADERS = 1000  # fields kept per header block; the block ends there too
MAX_DEPTH = 32  # nesting of multiparts and message/rfc822; deeper ones are leaves
MAX_PARTS = 10_000  # per message; further parts are body of the last one
MAX_BOUNDARY = 200  # characters of a boundary (RFC 2046: 70); longer: not a multipart
MAX_BOUNDARY_LINE = 1024  # a longer line is never a boundary line
MAX_FALSE_DELIMITERS = 1000  # lines that start like a boundary but are none; past it: no structure
MAX_FIELD_NAME = 998  # a longer run of name characters is no header field
_LOOKAHEAD = 4 * MAX_BOUNDARY_LINE
_DASH_PROBES = 8  # dashes looked at per chunk before searching for the markers instead
_NUMPY_MIN = 32 * 1024  # shorter spans: bytes.count (numpy's call overhead, and it lets go of the GIL)

_HEADERS, _BODY, _SKIP = 0, 1, 2  # states of the innermost open part (_SKIP: preamble/epilogue)
_LF, _CR = 10, 13
_NAME = rb"[\x21-\x39\x3b-\x7e]"
# The first line of a header block that is not a field or a continuation line: the empty line
# that ends the block, a possible boundary line, or a line that starts the body.
_STOP = re.compile(rb"\n(?:(?=--)|(?![ \t]|" + _NAME + rb"{1,998}[ \t]*:))")
# a field: its name, the rest of its first line, its continuation lines
_FIELDS = re.compile(rb"(" + _NAME + rb"+)[ \t]*:[ \t]*([^\r\n]*(?:\r(?!\n)[^\r\n]*)*)\r?\n((?:[ \t][^\n]*\n)*)")
_CONTINUATIONS = re.compile(rb"(?:[ \t][^\n]*\n)*")
# in an unfolded run of field lines: the first line that is not a field
_NOT_FIELD = re.compile(rb"\n(?!" + _NAME + rb"{1,998}[ \t]*:)")
_FIELD_START = re.compile(_NAME + rb"{1,998}[ \t]*:")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


class Part:
    """One MIME entity. Offsets are absolute positions in the fed stream; body_end, size and lines
    are set at part_end. kind: "multipart" (child parts follow), "message" (message/rfc822: one
    encapsulated message follows) or "leaf" (part_body calls follow). is_message: the top-level
    message or a message encapsulated in a message/rfc822 part (it has that part's path, or "1"
    for a message/rfc822 top level). lines: line feeds in the body (as IMAP servers such as
    Dovecot count body lines), for text/* parts and everything inside a message/rfc822 part
    (incl. the message/rfc822 part itself), else None. params: the Content-Type parameters with
    RFC 2231 continuations and encodings decoded. defects: codes of what makes the part ambiguous
    or cut short (see DEFECTS), each once."""

    __slots__ = (
        "path",
        "parent",
        "depth",
        "is_message",
        "headers",
        "headers_truncated",
        "content_type",
        "subtype",
        "params",
        "kind",
        "header_start",
        "body_start",
        "body_end",
        "size",
        "lines",
        "defects",
        "_children",
        "_marker",
        "_needles",
        "_lf_start",
        "_line",
        "_content",
    )
    # headers: (name, value) in order, unfolded (line ends removed), value without the blanks
    # after the colon; bytes that are not UTF-8 are kept as surrogate escapes.

    def __init__(self, path: str, parent: "Part | None", header_start: int, is_message: bool) -> None:
        self.path = path
        self.parent = parent
        self.depth: int = 0 if parent is None else parent.depth + 1
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
        self.defects: list[str] = []
        self._children = 0
        self._marker = b""  # b"--" + boundary
        self._needles: tuple[bytes, ...] = ()  # b"\n--" + boundary, b"\r--" + boundary: what bytes.find looks for
        self._lf_start: int | None = None
        self._line: bytearray | None = None  # a header line being collected across chunks
        self._content: list[tuple[str, str]] | None = None

    def header(self, name: str) -> str | None:
        """The first field of that name (case-insensitive), unfolded."""
        name = name.lower()
        fields = self.content_fields() if name.startswith("content-") else self.headers
        size = len(name)
        for field, value in fields:
            if len(field) == size and field.lower() == name:
                return value
        return None

    def content_fields(self) -> list[tuple[str, str]]:
        """The Content-* fields, names lower-cased, in order (made once the header is complete)."""
        if self._content is None or self.body_start is None:
            self._content = [(field.lower(), value) for field, value in self.headers if field[:8].lower() == "content-"]
        return self._content

    def defect(self, code: str) -> None:
        if code not in self.defects:
            self.defects.append(code)

    def __repr__(self) -> str:
        return (
            f"Part({self.path!r}, {self.content_type}/{self.subtype}, {self.kind},"
            f" body={self.body_start}..{self.body_end})"
        )


# What part.defects may hold. Limits: the part is cut short or taken as a leaf.
LIMIT_DEFECTS = {
    "header_bytes": f"a header block over {MAX_HEADER_BYTES // 1024} KB",
    "header_fields": f"more than {MAX_HEADERS} header fields in one block",
    "depth": f"MIME nesting deeper than {MAX_DEPTH} levels",
    "parts": f"more than {MAX_PARTS} MIME parts",
    "false_delimiters": f"more than {MAX_FALSE_DELIMITERS} lines that look like boundaries but are none",
    "boundary_length": f"a boundary longer than {MAX_BOUNDARY} characters",
}
# Ambiguities: mail readers may see other parts than this parser.
AMBIGUITY_DEFECTS = {
    "no_boundary": "a multipart without a boundary parameter",
    "boundary_prefix": "a line that starts with a boundary but is no boundary line",
    "nested_boundary": "a boundary that is a prefix of an enclosing one (or the reverse)",
    "bare_cr": "a lone carriage return in a header block or before a boundary",
    "no_separator": "a header block that does not end with an empty line",
    "unterminated": "a multipart without its closing boundary line",
    "no_parts": "a multipart without any part",
    "bad_content_type": "a Content-Type field that cannot be parsed",
    "duplicate_param": "a Content-Type parameter given twice",
}


class Listener(Protocol):
    """What the parser reports to; a listener may also have skipped(part, data) (see the top)."""

    def part_start(self, part: Part) -> None: ...

    def part_body(self, part: Part, data: memoryview) -> None: ...

    def part_end(self, part: Part) -> None: ...


class MimeStreamParser:
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self._on_skip = getattr(listener, "skipped", None)
        self._offset = 0  # absolute offset just after the last byte fed
        self._tail = b""  # undecided bytes at the end of what was fed (they end at _offset)
        self._stack: list[Part] = []
        self._open_boundaries: list[Part] = []  # multiparts whose close delimiter is still to come
        self._parts = 0
        self._false = 0  # lines that started like a delimiter but were none
        self._in_rfc822 = 0  # open message/rfc822 parts: everything inside has its lines counted
        self._lf = 0  # line feeds counted so far (only while counting)
        self._counting = False
        self._line_start = True  # the next byte starts a line whose line end was consumed already
        self._eol = 2  # length of the line end of the last header or delimiter line
        self._state = _HEADERS
        self._closed = False
        self._hits: dict[bytes, int] = {}  # needle -> next hit in the chunk being scanned
        self._hits_buf: bytes | None = None
        self._probes = 0
        self._push(Part("", None, 0, True))

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
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
            else:  # an undecided line longer than the lookahead: it is at most a few KB
                data = head[used : len(tail)] + data
                base -= len(tail) - used
        used = self._run(data, start, base, False)
        self._tail = data[used:]
        self._hits_buf = None

    def close(self) -> None:
        """End of the message: whatever is open ends here."""
        if self._closed:
            return
        if self._tail:
            tail, self._tail = self._tail, b""
            self._run(tail, 0, self._offset - len(tail), True)
        part = self._stack[-1]
        if self._state == _HEADERS and part._line is not None:
            self._finish_line(part)
        while self._stack:
            self._end(self._stack[-1], self._offset)
        self._closed = True

    # -- scanning ------------------------------------------------------------------------------

    def _run(self, buf: bytes, pos: int, base: int, final: bool) -> int:
        """Consume buf[pos:] as far as it can be decided; returns where the undecided rest starts."""
        end = len(buf)
        while pos < end:
            if self._state == _HEADERS:
                pos, stop = self._header_block(buf, pos, base, final)
            else:
                pos, stop = self._content(buf, pos, base, final)
            if stop:
                break
        return pos

    def _header_block(self, buf: bytes, pos: int, base: int, final: bool) -> tuple[int, bool]:
        """Header lines of the innermost part from buf[pos]: whole runs of field lines at once,
        then the line that stops the block. A block is cut at MAX_HEADER_BYTES from its start
        (the line across the cut is dropped, the body starts there), wherever the chunks end."""
        part = self._stack[-1]
        end = len(buf)
        limit = part.header_start + MAX_HEADER_BYTES - base  # where the block is cut, in buf
        if part._line is not None:  # a field line started in an earlier chunk
            nl = buf.find(b"\n", pos, min(end, limit))
            if nl < 0:
                return self._grow_line(part, buf, pos, min(end, limit), limit, base)
            part._line += buf[pos : nl + 1]
            self._consumed(buf, nl, nl + 1)
            self._finish_line(part)
            pos = nl + 1
            if pos >= end:
                return pos, False
        first = buf[pos : pos + 1]
        if first == b"\n" or buf[pos : pos + 2] == b"\r\n":  # the empty line that ends the block
            line_end = pos + (1 if first == b"\n" else 2)
            self._consumed(buf, pos, line_end)
            self._header_done(part, base + line_end)
            return line_end, False
        if first == b"\r":
            if end - pos < 2 and not final:
                return pos, True
            part.defect("bare_cr")
        if first == b"-" and self._open_boundaries:
            decided = self._boundary_in_header(part, buf, pos, base, final)
            if decided is not None:
                return decided
        if pos >= limit:
            return self._cut(part, buf, pos, pos, base)
        if first not in (b" ", b"\t") and not _FIELD_START.match(buf, pos):
            if end - pos <= MAX_FIELD_NAME and buf.find(b"\n", pos) < 0 and not final:
                return pos, True  # too little of the line to tell
            part.defect("no_separator")
            self._header_done(part, base + pos)
            return pos, False
        window = min(end, limit)
        run_end = self._field_run(buf, pos, window)
        if run_end > pos:
            return self._fields(part, buf, pos, run_end), False
        return self._grow_line(part, buf, pos, window, limit, base)

    def _field_run(self, buf: bytes, pos: int, window: int) -> int:
        """The end of the run of whole field and continuation lines from buf[pos] (a field line)
        within buf[:window]: at the line that stops the block, or at the last line end."""
        stop = window
        for marker in (b"\n\r\n", b"\n\n", b"\n--", b"\n\r"):
            hit = buf.find(marker, pos, stop + len(marker) - 1)
            if 0 <= hit < stop:
                stop = hit
        if stop == window:
            stop = buf.rfind(b"\n", pos, window)
            if stop < 0:
                return pos
        # every line of buf[pos:stop + 1] must be a field or a continuation: checked unfolded
        # (a regular expression per folded line is slow), by line otherwise
        run = buf[pos : stop + 1]
        if _NOT_FIELD.search(_unfold_lines(run), 0, len(run) - 1) is None:
            return stop + 1
        found = _STOP.search(buf, pos, stop + 1)
        return found.start() + 1 if found is not None else stop + 1

    def _fields(self, part: Part, buf: bytes, pos: int, end: int) -> int:
        """Whole field and continuation lines buf[pos:end] of the header block; fields past
        MAX_HEADERS are not kept."""
        if buf.count(b"\r", pos, end) != buf.count(b"\r\n", pos, end):
            part.defect("bare_cr")
        headers = part.headers
        continuations = _CONTINUATIONS.match(buf, pos, end)
        assert continuations is not None  # the pattern matches the empty string
        cont = continuations.end()
        if cont > pos and headers:  # continuation lines of the last field of an earlier run
            name, value = headers[-1]
            headers[-1] = (name, _continued(value, buf[pos:cont]))
        fields = _FIELDS.findall(_unfold_lines(buf[cont:end]) if cont < end else b"")
        room = MAX_HEADERS - len(headers)
        if len(fields) > room:
            part.defect("header_fields")
            fields = fields[: max(room, 0)]
        headers += [
            (name.decode("ascii"), _unfold(value, more) if more else value.decode("utf-8", "surrogateescape"))
            for name, value, more in fields
        ]
        self._consumed(buf, pos, end)
        return end

    def _grow_line(self, part: Part, buf: bytes, pos: int, end: int, limit: int, base: int) -> tuple[int, bool]:
        """A field or continuation line that goes on past buf[end]: kept until its line end, or
        dropped where the block is cut."""
        if end >= limit:
            return self._cut(part, buf, pos, limit, base)
        if part._line is None:
            part._line = bytearray()
        part._line += buf[pos:end]
        return end, False

    def _cut(self, part: Part, buf: bytes, pos: int, limit: int, base: int) -> tuple[int, bool]:
        """The header block reached MAX_HEADER_BYTES at buf[limit]: the body starts there."""
        part._line = None
        part.defect("header_bytes")
        if limit > pos:
            self._consumed(buf, pos, limit)
        part.headers_truncated = True
        self._header_done(part, base + limit)
        self._line_start = limit == pos
        return limit, False

    def _finish_line(self, part: Part) -> None:
        assert part._line is not None  # called only while a line is being collected
        line, part._line = bytes(part._line), None
        if line.count(b"\r") != line.count(b"\r\n"):
            part.defect("bare_cr")
        if not line.endswith(b"\n"):
            line += b"\n"
        if line[:1] in (b" ", b"\t"):
            if part.headers:
                name, value = part.headers[-1]
                part.headers[-1] = (name, _continued(value, line))
            return
        match = _FIELDS.match(line)
        if match is None:
            return
        if len(part.headers) < MAX_HEADERS:
            part.headers.append((match.group(1).decode("ascii"), _unfold(match.group(2), match.group(3))))
        else:
            part.defect("header_fields")

    def _boundary_in_header(self, part: Part, buf: bytes, pos: int, base: int, final: bool) -> tuple[int, bool] | None:
        """A line in a header block that starts with "-": the part may end before its header
        block did. None when it is no boundary line (then it is a field or the body's start)."""
        judged = self._judge_line(buf, pos, final)
        if judged is None:
            return pos, True
        match, line_end = judged
        if match is None:
            return None
        self._header_done(part, base + pos, ending=True)
        delimiter, unwound = base + pos, 0
        if base + pos > part.header_start:  # the line end before it is the delimiter's
            delimiter -= self._eol
            if self._counting:
                self._lf -= 1
                unwound = 1
        self._delimiter(match, delimiter, buf, pos, line_end, base, unwound)
        return line_end, False

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
            if buf[line : line + 2] == b"--" or end - line < 2:
                judged = self._judge_line(buf, line, final)
                if judged is None:
                    return self._hold(buf, pos, line), True
                match, line_end = judged
                if match is not None:
                    delimiter = self._line_end_before(buf, pos, line)
                    self._take(buf, pos, delimiter)
                    self._delimiter(match, base + delimiter, buf, delimiter, line_end, base, 0)
                    return line_end, False
                if not self._open_boundaries:  # too many false delimiters: no structure any more
                    self._take(buf, pos, end)
                    return end, False
            scan = line + 1
            line = -1
        keep = end if final else self._possible_marker_start(buf, pos)
        self._take(buf, pos, keep)
        return keep, keep < end

    def _judge_line(self, buf: bytes, line: int, final: bool) -> tuple[tuple[Part, bool] | None, int] | None:
        """(match or None, line end) for a line starting at buf[line]; None when more data is
        needed to tell. A line that starts with an open multipart's marker but is no delimiter
        line is counted (and noted: mail readers that compare only the start, as RFC 2046 allows,
        take it for one)."""
        end = len(buf)
        line_end = buf.find(b"\n", line, line + MAX_BOUNDARY_LINE)
        if line_end < 0:
            if end - line < MAX_BOUNDARY_LINE and not final:
                return None
            line_end = min(end, line + MAX_BOUNDARY_LINE)
            long_line = line_end - line >= MAX_BOUNDARY_LINE
        else:
            line_end += 1
            long_line = False
        text = buf[line:line_end]
        match = None if long_line else self._match_boundary(text.rstrip(b"\r\n"))
        if match is None:
            for multipart in reversed(self._open_boundaries):
                if text.startswith(multipart._marker):
                    self._false_delimiter(multipart, "parts" if self._parts >= MAX_PARTS else "boundary_prefix")
                    break
        return match, line_end

    def _false_delimiter(self, multipart: Part, code: str) -> None:
        multipart.defect(code)
        self._false += 1
        if self._false > MAX_FALSE_DELIMITERS:
            self._stop_structure("false_delimiters")

    def _stop_structure(self, code: str) -> None:
        """Past a limit: no more boundary lines; the rest of the message is content of the
        innermost part (noted there)."""
        self._stack[-1].defect(code)
        self._open_boundaries.clear()

    def _find_marker(self, buf: bytes, scan: int) -> int:
        """Start of the first line after buf[scan] that may begin a boundary line. First by memchr
        for "-" (base64 and armored bodies have next to none): a "--" at a line start is a
        candidate; after _DASH_PROBES dashes in a chunk, by searching the markers themselves
        (each search goes on from its last hit). A marker after a lone CR (a line end to some
        readers) is noted as an ambiguity and passed over."""
        if self._hits_buf is not buf:
            self._hits_buf, self._hits, self._probes = buf, {}, 0
        while self._probes < _DASH_PROBES:
            dash = buf.find(b"-", scan)
            if dash < 0:
                return -1
            self._probes += 1
            if dash > 0 and buf[dash + 1 : dash + 2] in (b"-", b""):
                before = buf[dash - 1]
                if before == _LF:
                    return dash
                if before == _CR and buf[dash + 1 : dash + 2] == b"-" and self._bare_cr_marker(buf, dash):
                    scan = dash + 1
                    continue
            scan = dash + 1
        while True:
            first, first_needle = -1, b""
            for multipart in self._open_boundaries:
                for needle in multipart._needles:
                    hit = self._hits.get(needle, -2)
                    if hit != -1 and hit < scan:
                        hit = buf.find(needle, max(scan - 1, 0))
                        self._hits[needle] = hit
                    if hit >= 0 and (first < 0 or hit < first):
                        first, first_needle = hit, needle
            if first < 0:
                return -1
            if first_needle[0] == _LF:
                return first + 1
            self._bare_cr_marker(buf, first + 1)
            scan = first + 2

    def _bare_cr_marker(self, buf: bytes, dash: int) -> bool:
        """A lone CR before "--" + an open marker: noted on that multipart."""
        if buf[dash - 1] != _CR or buf[dash : dash + 1] != b"-":
            return False
        for multipart in self._open_boundaries:
            if buf.startswith(multipart._marker, dash):
                self._false_delimiter(multipart, "bare_cr")
                return True
        return False

    def _possible_marker_start(self, buf: bytes, pos: int) -> int:
        """Where a line end at the end of buf may begin a boundary line that the next data completes."""
        end = len(buf)
        keep = end
        longest = max(len(multipart._marker) + 1 for multipart in self._open_boundaries)
        window = max(pos, end - longest)
        line = max(buf.rfind(b"\n", window), buf.rfind(b"\r", window))
        if line >= 0 and any(
            needle.startswith(buf[line:end]) for multipart in self._open_boundaries for needle in multipart._needles
        ):
            keep = line
        elif buf.endswith(b"\r"):
            keep = end - 1
        if pos < keep < end and buf[keep - 1] == _CR and buf[keep] == _LF:
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
        if line - 2 >= pos and buf[line - 2] == _CR:
            return line - 2
        return line - 1

    def _match_boundary(self, text: bytes) -> tuple[Part, bool] | None:
        """(multipart, closes) when text is a delimiter line of an open multipart, innermost first.
        Past MAX_PARTS only close delimiters count: further parts are body of the last one."""
        for multipart in reversed(self._open_boundaries):
            marker = multipart._marker
            if text.startswith(marker):
                rest = text[len(marker) :]
                closes = rest[:2] == b"--"
                if not rest[2 if closes else 0 :].strip(b" \t") and (closes or self._parts < MAX_PARTS):
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
        elif self._on_skip is not None:
            self._on_skip(self._stack[-1], memoryview(buf)[start:end])

    def _consumed(self, buf: bytes, start: int, end: int) -> None:
        """Header or delimiter line bytes [start, end)."""
        if self._counting:
            self._lf += buf.count(b"\n", start, end)
        self._eol = 2 if end - start >= 2 and buf[end - 2] == _CR else 1
        self._line_start = True

    def _delimiter(
        self, match: tuple[Part, bool], delimiter: int, buf: bytes, start: int, line_end: int, base: int, unwound: int
    ) -> None:
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
            self._push(Part(f"{multipart.path}.{n}" if multipart.path else str(n), multipart, base + line_end, False))
        self._update_counting()

    def _push(self, part: Part) -> None:
        self._parts += 1
        self._stack.append(part)
        self._state = _HEADERS
        self._line_start = True

    def _header_done(self, part: Part, body_start: int, ending: bool = False) -> None:
        if part._line is not None:
            self._finish_line(part)
        part.body_start = body_start
        self._set_type(part)
        boundary = part.params.get("boundary", "") if part.content_type == "multipart" else ""
        if part.content_type == "multipart":
            if not boundary:
                part.defect("no_boundary")
            elif len(boundary) > MAX_BOUNDARY:
                part.defect("boundary_length")
        nests = bool(boundary) or (part.content_type, part.subtype) == ("message", "rfc822")
        if nests and not ending:
            if part.depth >= MAX_DEPTH:
                part.defect("depth")
            elif self._parts >= MAX_PARTS:
                part.defect("parts")
        nested_ok = part.depth < MAX_DEPTH and self._parts < MAX_PARTS and not ending
        if boundary and len(boundary) <= MAX_BOUNDARY and (nested_ok or ending):
            part.kind = "multipart"
            if not ending:
                part._marker = b"--" + boundary.encode("utf-8", "surrogateescape")
                part._needles = (b"\n" + part._marker, b"\r" + part._marker)
                for outer in self._open_boundaries:
                    if outer._marker.startswith(part._marker) or part._marker.startswith(outer._marker):
                        part.defect("nested_boundary")
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
        digest = part.parent is not None and part.parent.kind == "multipart" and part.parent.subtype == "digest"
        params: dict[str, str]
        main, sub, params = ("message", "rfc822", {}) if digest else ("text", "plain", {})
        if value is not None:
            full, items = param_items(value)
            ctype, slash, csub = full.partition("/")
            ctype, csub = ctype.strip().lower(), csub.strip().lower()
            if slash and _TOKEN.fullmatch(ctype) and _TOKEN.fullmatch(csub):
                main, sub = ctype, csub
                params, problem = decode_params(items)
                if problem:
                    part.defect("duplicate_param")
            else:
                part.defect("bad_content_type")
        part.content_type, part.subtype, part.params = main, sub, params

    def _end(self, part: Part, at: int) -> None:
        if part.body_start is None:
            self._header_done(part, at, ending=True)
        body_start = part.body_start
        assert body_start is not None  # set by _header_done
        part.body_end = max(at, body_start)
        part.size = part.body_end - body_start
        if part._lf_start is not None:
            part.lines = self._lf - part._lf_start
        self._stack.pop()
        if part.kind == "multipart":
            if part in self._open_boundaries:
                self._open_boundaries.remove(part)
                part.defect("unterminated")
            if not part._children:
                part.defect("no_parts")
        if part.kind == "message":
            self._in_rfc822 -= 1
        if self._stack:
            self._state = _SKIP if self._stack[-1].kind == "multipart" else _BODY
        self._update_counting()
        self.listener.part_end(part)

    def _update_counting(self) -> None:
        part = self._stack[-1] if self._stack else None
        self._counting = self._in_rfc822 > 0 or (
            part is not None and self._state == _BODY and part.content_type == "text"
        )


def _unfold_lines(lines: bytes) -> bytes:
    """Field lines with their continuation lines joined (the line ends before them removed)."""
    if lines.find(b"\n ") >= 0 or lines.find(b"\n\t") >= 0:
        lines = lines.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t").replace(b"\n ", b" ").replace(b"\n\t", b"\t")
    return lines


def _unfold(first: bytes, continuation: bytes) -> str:
    """A field's value from the rest of its first line and its continuation lines (RFC 5322
    unfolding: the line ends go, the blanks stay; but as after the colon, no blanks lead the value,
    also when its first line is empty)."""
    value = first + _joined(continuation)
    return (value if first else value.lstrip(b" \t")).decode("utf-8", "surrogateescape")


def _continued(value: str, continuation: bytes) -> str:
    """A field's value so far with continuation lines that came in a later chunk: the same value
    as if they had come with its first line (chunking must not change a field)."""
    if not value:
        return _unfold(b"", continuation)
    return value + _joined(continuation).decode("utf-8", "surrogateescape")


def _joined(continuation: bytes) -> bytes:
    return continuation.replace(b"\r\n", b"").replace(b"\n", b"")


def _line_feeds(buf: bytes, start: int, end: int) -> int:
    """LF bytes in buf[start:end]. numpy compares with SIMD: about 10x bytes.count on big spans,
    which matters for large text bodies (their lines are counted). Imported on first use: it adds
    ~12 MB to the hub's memory, and DICOM mails (no text parts) never need it."""
    if end - start < _NUMPY_MIN:
        return buf.count(b"\n", start, end)
    import numpy

    return int(numpy.count_nonzero(numpy.frombuffer(buf, numpy.uint8, end - start, start) == _LF))


# -- Content-Type parameters -----------------------------------------------------------------------


def split_params(value: str, lower: bool = True) -> tuple[str, dict[str, str]]:
    """'type/sub; a=1; b="x;y"' -> ('type/sub', {'a': '1', 'b': 'x;y'}); names lower-cased unless
    lower=False, the first of a repeated name wins, RFC 822 comments dropped, RFC 2231 names kept
    as written (decode_params decodes them)."""
    full, items = param_items(value, lower)
    params: dict[str, str] = {}
    for name, raw in items:
        params.setdefault(name, raw)
    return full, params


def param_items(value: str, lower: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """The value before the first ';' and every name=value parameter after it, in order,
    repeated names included."""
    items = _split_outside_quotes(value)
    out = []
    for item in items[1:]:
        name, eq, raw = item.partition("=")
        name = name.strip().lower() if lower else name.strip()
        if eq and name:
            out.append((name, _unquote(raw.strip())))
    return items[0].strip(), out


def decode_params(items: list[tuple[str, str]]) -> tuple[dict[str, str], bool]:
    """RFC 2231: name*=charset'lang'%xx values, name*0=, name*1*= continuations, joined and
    decoded into plain names. Also returns whether the parameters are ambiguous: a name given
    twice, or both plainly and in RFC 2231 form, or with a section missing."""
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    ambiguous = False
    for name, value in items:
        base, star, rest = name.partition("*")
        if not star:
            ambiguous |= name in plain
            plain.setdefault(name, value)
            continue
        number, _, encoded = rest.partition("*")
        if rest == "":
            index, is_encoded = 0, True
        elif number.isdigit() and encoded == "" and len(number) <= 3:
            index, is_encoded = int(number), rest.endswith("*")
        else:
            ambiguous = True
            continue
        found = sections.setdefault(base, {})
        ambiguous |= index in found
        found.setdefault(index, (value, is_encoded))
    for base, found in sections.items():
        if base in plain or sorted(found) != list(range(len(found))):
            ambiguous = True
        if base in plain:
            continue
        plain[base] = _join_sections([found[i] for i in sorted(found)])
    return plain, ambiguous


def _join_sections(sections: list[tuple[str, bool]]) -> str:
    charset = "us-ascii"
    raw = bytearray()
    for n, (value, encoded) in enumerate(sections):
        if encoded:
            if n == 0 and value.count("'") >= 2:
                charset, _, value = value.split("'", 2)
            raw += _percent_decode(value)
        else:
            raw += value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode(charset or "us-ascii", "replace")
    except LookupError:
        return raw.decode("latin-1")


def _percent_decode(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x25 and _is_hex(data[i + 1 : i + 3]):
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _split_outside_quotes(value: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted, escaped, comment = False, False, 0
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

    def __init__(self, *listeners: Listener) -> None:
        self.listeners = listeners
        self._skip = [listener for listener in listeners if hasattr(listener, "skipped")]

    def part_start(self, part: Part) -> None:
        for listener in self.listeners:
            listener.part_start(part)

    def part_body(self, part: Part, data: memoryview) -> None:
        for listener in self.listeners:
            listener.part_body(part, data)

    def part_end(self, part: Part) -> None:
        for listener in self.listeners:
            listener.part_end(part)

    def skipped(self, part: Part, data: memoryview) -> None:
        for listener in self._skip:
            listener.skipped(part, data)

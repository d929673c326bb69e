# Facts taken from a message while it streams: the header block (Message-ID, the
# X-TELEMEDICINE-SETID/-SETPART/-SETTOTAL study headers), whether any line starts with "."
# (for BDAT input, where no decoder sees the lines) and whether a line is too long for SMTP.
# Bounded: the header block is read line by line as it streams (its first MAX_HEADER_BYTES), and
# only the wanted fields (whitespace-collapsed, at most _MAX_VALUE characters each) and the start of
# an unfinished line (at most _MAX_PARTIAL) are kept; after the header block a chunk costs one test.
import numpy

MAX_HEADER_BYTES = 256 * 1024
_WANTED = {
    b"message-id": "Message-ID",
    b"x-telemedicine-setid": "X-TELEMEDICINE-SETID",
    b"x-telemedicine-setpart": "X-TELEMEDICINE-SETPART",
    b"x-telemedicine-settotal": "X-TELEMEDICINE-SETTOTAL",
}
_MAX_VALUE = 1000  # characters kept of a field's collapsed value (the longest use takes 998)
_MAX_PARTIAL = 64 * 1024  # octets kept of a line until its CRLF arrives


class HeaderScanner:
    __slots__ = ("_partial", "_size", "_fields", "_current", "done", "message_id", "set_id", "set_part", "set_total")

    def __init__(self) -> None:
        self._partial = b""  # the unfinished last line
        self._size = 0  # header octets fed so far
        self._fields: dict[str, str] = {}
        self._current: str | None = None  # the wanted field that continuation lines extend
        self.done = False
        self.message_id: str | None = None
        self.set_id: str | None = None
        self.set_part: int | None = None
        self.set_total: int | None = None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        capped = self._size + len(data) >= MAX_HEADER_BYTES
        if capped:
            data = data[: MAX_HEADER_BYTES - self._size]
        self._size += len(data)
        buf = self._partial + data if self._partial else data
        find = buf.find
        start = 0
        while (end := find(b"\r\n", start)) >= 0:
            if start == end:  # the empty line that ends the header block
                self._finish()
                return
            self._line(buf[start:end])
            start = end + 2
        rest = buf[start:]
        if len(rest) > _MAX_PARTIAL:  # keep the start of the line, and a CR that may begin its CRLF
            rest = rest[:_MAX_PARTIAL] + rest[-1:]
        self._partial = rest
        if capped:
            self.close()

    def close(self) -> None:
        """End of message (or of the scanned part): take whatever header there was."""
        if not self.done:
            if self._partial:
                self._line(self._partial)
            self._finish()

    def _line(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            if self._current is not None:
                value = self._fields[self._current]
                if len(value) < _MAX_VALUE:
                    self._fields[self._current] = _collapse(value + " " + line.decode("utf-8", "replace"))
            return
        key, colon, raw = line.partition(b":")
        name = _WANTED.get(key.strip().lower()) if colon else None
        self._current = None
        if name is not None and name not in self._fields:
            self._current = name
            self._fields[name] = _collapse(raw.decode("utf-8", "replace"))

    def _finish(self) -> None:
        self.done = True
        self._partial = b""
        fields, self._fields = self._fields, {}
        self.message_id = _clean(fields.get("Message-ID"), 998)
        self.set_id = _clean(fields.get("X-TELEMEDICINE-SETID"), 256)
        self.set_part = _small_int(fields.get("X-TELEMEDICINE-SETPART"))
        self.set_total = _small_int(fields.get("X-TELEMEDICINE-SETTOTAL"))


def _collapse(text: str) -> str:
    return " ".join(text.split())[:_MAX_VALUE]


class DotLineScanner:
    """Tells whether any line of a stream starts with "." (after a CRLF or a bare LF: line-reading
    POP3 clients take either for a line end)."""

    __slots__ = ("found", "_tail")

    def __init__(self) -> None:
        self.found = False
        self._tail = b"\r\n"  # the stream starts at a line start

    def feed(self, data: bytes) -> None:
        if self.found or not data:
            return
        if b"\n." in self._tail + data[:1] or b"\n." in data:
            self.found = True
        self._tail = data[-2:] if len(data) >= 2 else self._tail[-1:] + data


MAX_LINE = 1000  # octets of a line with its line end (RFC 5321 4.5.3.1.6: 998 characters + CRLF)
_BLOCK = MAX_LINE // 2  # an LF in every aligned block of this many octets: no line can be too long
_NUMPY_MIN = 64 * 1024  # shorter spans are checked by the hop loop alone (numpy's call overhead)


class LineLengthCheck:
    """Tells whether a stream has a line longer than MAX_LINE octets with its line end (LF ends a
    line; a CR before it is part of the line's MAX_LINE). A big chunk's complete lines are first
    checked with numpy (every aligned 500-octet block holds an LF: ~0.1 ms per MB); the exact check
    hops from line start to the last LF within MAX_LINE octets (one short rfind per KB)."""

    __slots__ = ("too_long", "_line")

    def __init__(self) -> None:
        self.too_long = False
        self._line = 0  # octets of the stream's last, unfinished line so far

    def feed(self, data: bytes) -> None:
        if self.too_long or not data:
            return
        room = MAX_LINE - self._line  # the unfinished line's LF must come within this many octets
        first = data.find(b"\n", 0, room)
        if first < 0:
            self._line += len(data)
            self.too_long = len(data) >= room
            return
        last = data.rfind(b"\n")
        if last > first and not _short_lines(data, first + 1, last + 1):
            self.too_long = True
            return
        self._line = len(data) - last - 1
        self.too_long = self._line >= MAX_LINE  # the unfinished last line is already too long


def _short_lines(data: bytes, start: int, end: int) -> bool:
    """Every line of data[start:end] (whole lines: data[end - 1] is an LF) fits in MAX_LINE octets."""
    if end - start >= _NUMPY_MIN:
        blocks = (end - start) // _BLOCK
        octets = numpy.frombuffer(data, numpy.uint8, count=blocks * _BLOCK, offset=start)
        if (octets.reshape(blocks, _BLOCK) == 10).any(axis=1).all():
            return True  # runs without LF are under 500 octets inside, under 1000 across the last block
    rfind = data.rfind
    pos = start
    while end - pos > MAX_LINE:
        last = rfind(b"\n", pos, pos + MAX_LINE)
        if last < 0:
            return False
        pos = last + 1
    return True


def _clean(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    text = " ".join(value.split())[:limit]
    return text or None


def _small_int(value: str | None) -> int | None:
    text = _clean(value, 20)
    if text is None or not text.isdigit():
        return None
    return int(text)

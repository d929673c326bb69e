# Facts taken from a message while it streams: the header block (Message-ID, the
# X-TELEMEDICINE-SETID/-SETPART/-SETTOTAL study headers), whether any line starts with "."
# (for BDAT input, where no decoder sees the lines) and whether a line is too long for SMTP. Bounded: only the header block, capped,
# is ever kept; after it the per-chunk cost is one comparison.
MAX_HEADER_BYTES = 256 * 1024
_WANTED = (b"message-id", b"x-telemedicine-setid", b"x-telemedicine-setpart", b"x-telemedicine-settotal")


class HeaderScanner:
    __slots__ = ("_buf", "done", "message_id", "set_id", "set_part", "set_total")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False
        self.message_id: str | None = None
        self.set_id: str | None = None
        self.set_part: int | None = None
        self.set_total: int | None = None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        start = max(0, len(self._buf) - 3)
        self._buf += data
        end = self._buf.find(b"\r\n\r\n", start)
        if end < 0 and self._buf.startswith(b"\r\n"):
            end = 0  # no header at all
        if end >= 0:
            del self._buf[end + 2:]
            self._finish()
        elif len(self._buf) >= MAX_HEADER_BYTES:
            del self._buf[MAX_HEADER_BYTES:]
            self._finish()

    def close(self) -> None:
        """End of message: parse whatever header there was."""
        if not self.done:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        headers = _parse_fields(bytes(self._buf))
        self._buf = bytearray()
        self.message_id = _clean(headers.get("Message-ID"), 998)
        self.set_id = _clean(headers.get("X-TELEMEDICINE-SETID"), 256)
        self.set_part = _small_int(headers.get("X-TELEMEDICINE-SETPART"))
        self.set_total = _small_int(headers.get("X-TELEMEDICINE-SETTOTAL"))


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


MAX_LINE = 1000   # octets of a line with its line end (RFC 5321 4.5.3.1.6: 998 characters + CRLF)


class LineLengthCheck:
    """Tells whether a stream has a line longer than MAX_LINE octets with its line end (LF ends a
    line; a CR before it is part of the line's MAX_LINE). Hops from line start to the last LF within
    MAX_LINE octets, so its cost is about one short rfind per KB, whatever the lines."""

    __slots__ = ("too_long", "_line")

    def __init__(self) -> None:
        self.too_long = False
        self._line = 0   # octets of the stream's last, unfinished line so far

    def feed(self, data: bytes) -> None:
        if self.too_long:
            return
        rfind = data.rfind
        end = len(data)
        pos = 0                # a line starts at pos - carry: its LF must come before that + MAX_LINE
        carry = self._line
        while True:
            limit = pos - carry + MAX_LINE
            if limit > end:
                last = rfind(b"\n", pos)
                self._line = carry + end - pos if last < 0 else end - last - 1
                return
            last = rfind(b"\n", pos, limit)
            if last < 0:
                self.too_long = True
                return
            pos, carry = last + 1, 0


def _parse_fields(block: bytes) -> dict[str, str]:
    """The first occurrence of each wanted field (RFC 5322 unfolding), by lower-case name."""
    fields: dict[str, str] = {}
    name = None
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                fields[name] += " " + line.decode("utf-8", "replace")
            continue
        key, colon, value = line.partition(b":")
        key = key.strip().lower()
        name = None
        if colon and key in _WANTED and key.decode() not in fields:
            name = key.decode()
            fields[name] = value.decode("utf-8", "replace")
    return {
        "Message-ID": fields.get("message-id"), "X-TELEMEDICINE-SETID": fields.get("x-telemedicine-setid"),
        "X-TELEMEDICINE-SETPART": fields.get("x-telemedicine-setpart"),
        "X-TELEMEDICINE-SETTOTAL": fields.get("x-telemedicine-settotal")}


def _clean(value, limit: int) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())[:limit]
    return text or None


def _small_int(value) -> int | None:
    text = _clean(value, 20)
    if text is None or not text.isdigit():
        return None
    return int(text)

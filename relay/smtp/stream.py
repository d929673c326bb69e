# SMTP DATA stream decoder (sans-I/O): finds the end-of-data marker and undoes dot-stuffing
# across arbitrary chunk boundaries, without ever holding more than one chunk.
# It must never do I/O and never look at message content beyond line starts.
"""Decode the SMTP DATA transparency encoding (RFC 5321 section 4.5.2).

``DataDecoder.feed(chunk)`` returns the decoded payload bytes that are certain so far.
When the terminating ``CRLF . CRLF`` has been seen, ``done`` is true and ``leftover``
holds the bytes that followed it (pipelined commands), which the caller hands back to
the command reader. Only ``CRLF . CRLF`` ends the data: a bare LF never does, which
keeps the hub immune to SMTP smuggling.
"""


class DataDecoder:
    __slots__ = ("_pending", "_at_start", "_after_lf", "done", "leftover", "dot_lines")

    def __init__(self) -> None:
        self._pending = b""  # undecided tail of the previous chunk (at most 4 bytes)
        self._at_start = True  # the next byte starts the first line of the message
        self._after_lf = False  # the previous chunk ended with a bare LF
        self.done = False
        self.leftover = b""
        # The decoded message has a line starting with "." (after a CRLF, or after a bare LF,
        # which line-reading POP3 clients take for a line end too): its readers must dot-stuff it.
        self.dot_lines = False

    def feed(self, chunk: bytes) -> bytes:
        """Consume one chunk of wire bytes; return the decoded bytes it completes."""
        if self.done:
            raise RuntimeError("feed() after end of data")
        buf = self._pending + chunk if self._pending else chunk
        self._pending = b""
        if self._at_start:
            # Treat the very first line as if it followed a CRLF.
            if len(buf) < 3:
                self._pending = buf
                return b""
            self._at_start = False
            if buf.startswith(b".\r\n"):
                self.done = True
                self.leftover = buf[3:]
                return b""
            if buf[0:1] == b".":
                buf = buf[1:]
                self.dot_lines = buf[0:1] == b"."
        out = []
        start = 0
        pos = 0
        find = buf.find
        while True:
            # Look for the dot alone (memchr-fast; base64 bodies have none), then check the CRLF.
            j = find(b".", pos)
            if j < 0:
                break
            pos = j + 1
            if j < 2 or buf[j - 2] != 13 or buf[j - 1] != 10:
                if buf[j - 1] == 10 if j else self._after_lf:
                    self.dot_lines = True  # a "." after a bare LF: not stuffed by the client
                continue
            i = j - 2
            if len(buf) - i < 5:  # need "\r\n.XY" to decide
                out.append(buf[start:i])
                self._pending = buf[i:]
                return b"".join(out)
            if buf[i + 3 : i + 5] == b"\r\n":
                out.append(buf[start : i + 2])
                self.done = True
                self.leftover = buf[i + 5 :]
                return b"".join(out)
            # Dot-stuffed line: keep the CRLF, drop the transparency dot.
            out.append(buf[start : i + 2])
            start = i + 3
            pos = start + 1
            if buf[start : start + 1] == b".":
                self.dot_lines = True
        # Keep a trailing partial "\r\n" or "\r" undecided.
        self._after_lf = buf.endswith(b"\n") and not buf.endswith(b"\r\n")
        tail = len(buf)
        if buf.endswith(b"\r\n"):
            tail -= 2
        elif buf.endswith(b"\r"):
            tail -= 1
        if start == 0 and tail == len(buf):
            return buf  # the common case: nothing to undo in this chunk
        self._pending = buf[tail:]
        out.append(buf[start:tail])
        return b"".join(out)


def dot_stuff_bytes(message: bytes) -> bytes:
    """Encode a whole (small) message for DATA; used by tests and tools, not the hot path."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"

# POP3 client protocol logic, sans I/O: status lines, multi-line responses (dot-unstuffing), UIDL
# and STAT parsing, command bytes. Must never touch a socket or the clock.
from __future__ import annotations


class Pop3Error(Exception):
    """An -ERR reply or a malformed one; the text is the server's."""


def status(line: bytes) -> str:
    """The text of a +OK line; Pop3Error for -ERR or garbage."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if text.startswith("+OK"):
        return text[3:].strip()
    raise Pop3Error(text[:200] or "connection closed")


def command(verb: str, *args: str) -> bytes:
    return (" ".join((verb, *args)) + "\r\n").encode()


class MultiLine:
    """Collect a multi-line response body fed in chunks; `done` once CRLF.CRLF is seen.
    `take()` returns the unstuffed body and any bytes read beyond the terminator."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._tail = b"\r\n"  # the status line ended with CRLF: a body may end at once
        self.done = False
        self.extra = b""
        self.size = 0

    def feed(self, data: bytes) -> None:
        window = self._tail + data
        end = window.find(b"\r\n.\r\n")
        if end >= 0:
            cut = end + 2 - len(self._tail)  # index into data where ".\r\n" starts
            self._parts.append(data[: max(0, cut)])
            self.extra = data[cut + 3 :]
            self.done = True
            if cut < 0:  # the terminator began in the tail
                self._parts[-1] = b""
                joined = b"".join(self._parts[:-1])
                self._parts = [joined[: len(joined) + cut]]
        else:
            self._parts.append(data)
        self.size += len(data)
        self._tail = window[-4:]

    def take(self) -> bytes:
        body = b"".join(self._parts)
        if body.startswith(b".."):
            body = body[1:]
        if b"\n.." in body:
            body = body.replace(b"\r\n..", b"\r\n.")
        return body


def parse_listing(body: bytes) -> list[tuple[int, str]]:
    """UIDL (or LIST) multi-line body -> [(message number, uid or size)]."""
    out = []
    for line in body.split(b"\r\n"):
        if line.strip():
            number, _, value = line.decode("ascii", "replace").partition(" ")
            out.append((int(number), value.strip()))
    return out


def parse_stat(text: str) -> tuple[int, int]:
    count, size = text.split()[:2]
    return int(count), int(size)

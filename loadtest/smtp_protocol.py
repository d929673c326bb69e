# SMTP client protocol logic, sans I/O: reply parsing, EHLO capabilities, command bytes, DATA
# dot-stuffing, reply classification and a gateway's retry backoff. Must never touch a socket, the
# clock or randomness (jitter is passed in), so it is tested with byte tables alone.
from __future__ import annotations

import base64
from dataclasses import dataclass


class SmtpReplyError(Exception):
    """A reply line that is not `DDD[ -]text`."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " / ".join(self.lines)

    @property
    def kind(self) -> str:
        """ok (2xx), more (3xx), transient (4xx) or permanent (5xx)."""
        return {2: "ok", 3: "more", 4: "transient", 5: "permanent"}.get(self.code // 100, "permanent")

    def short(self) -> str:
        return f"{self.code} {self.lines[-1][:80] if self.lines else ''}".strip()


class ReplyParser:
    """Feed bytes, take whole (possibly multi-line) replies."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies = []
        while (i := self._buf.find(b"\n")) >= 0:
            line, self._buf = self._buf[:i].rstrip(b"\r"), self._buf[i + 1 :]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise SmtpReplyError(f"bad reply line {line[:100]!r}")
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                replies.append(Reply(int(line[:3]), tuple(self._lines)))
                self._lines = []
        return replies


def capabilities(ehlo: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters, e.g. {"SIZE": "2147483648", "CHUNKING": ""}."""
    caps = {}
    for line in ehlo.lines[1:]:
        keyword, _, params = line.partition(" ")
        caps[keyword.upper()] = params
    return caps


def ehlo(name: str) -> bytes:
    return f"EHLO {name}\r\n".encode()


def auth_plain(login: str, password: str) -> bytes:
    token = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
    return b"AUTH PLAIN " + token + b"\r\n"


def mail_from(address: str, size: int | None = None) -> bytes:
    return f"MAIL FROM:<{address}>{f' SIZE={size}' if size is not None else ''}\r\n".encode()


def rcpt_to(address: str) -> bytes:
    return f"RCPT TO:<{address}>\r\n".encode()


def bdat(size: int, last: bool = True) -> bytes:
    return f"BDAT {size}{' LAST' if last else ''}\r\n".encode()


DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
STARTTLS = b"STARTTLS\r\n"
RSET = b"RSET\r\n"


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF-terminated, leading dots doubled, then CRLF.CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    if b"\n." in message:
        message = message.replace(b"\n.", b"\n..")
    return message + b".\r\n"


def backoff_delay(attempt: int, base_s: float, max_s: float, jitter: float = 1.0) -> float:
    """Seconds to wait before attempt number `attempt` (2, 3, ...): base doubled each time,
    capped, times a jitter factor the caller draws (e.g. 0.8..1.2)."""
    return min(max_s, base_s * 2 ** max(0, attempt - 2)) * jitter

# IMAP4rev1 client protocol logic for the receivers, sans I/O: tagged command bytes, a response
# parser that handles literals ({n} + n octets) fed in arbitrary chunks, and the few response
# shapes a gateway needs (tagged status, SEARCH, FETCH BODY[] literal, EXISTS). Must never touch
# a socket or the clock.
from __future__ import annotations

import re
from dataclasses import dataclass


class ImapError(Exception):
    """A NO/BAD tagged reply or a malformed response; the text is the server's."""


@dataclass
class Response:
    """One server response: its text with literals replaced by {n}, and the literals in order."""

    text: str
    literals: list

    @property
    def tag(self) -> str:
        return self.text.split(" ", 1)[0]


_LITERAL_RE = re.compile(rb"\{(\d+)\}\r\n$")


class ResponseParser:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._text: list[bytes] = []
        self._literals: list[bytes] = []
        self._need = 0  # octets of a literal still to read

    def feed(self, data: bytes) -> list[Response]:
        self._buf += data
        out: list[Response] = []
        while True:
            if self._need:
                if len(self._buf) < self._need:
                    return out
                self._literals.append(bytes(self._buf[: self._need]))
                del self._buf[: self._need]
                self._need = 0
                continue
            i = self._buf.find(b"\r\n")
            if i < 0:
                return out
            line = bytes(self._buf[: i + 2])
            del self._buf[: i + 2]
            match = _LITERAL_RE.search(line)
            self._text.append(line[:-2])
            if match:
                self._need = int(match.group(1))
                if self._need == 0:
                    self._literals.append(b"")
                continue
            out.append(Response(b"".join(self._text).decode("utf-8", "replace"), self._literals))
            self._text, self._literals = [], []


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Tagger:
    def __init__(self, prefix: str = "L") -> None:
        self.prefix, self.n = prefix, 0

    def command(self, text: str) -> tuple[str, bytes]:
        self.n += 1
        tag = f"{self.prefix}{self.n}"
        return tag, f"{tag} {text}\r\n".encode()


def check_tagged(response: Response) -> str:
    _, status, *rest = response.text.split(" ", 2) + [""]
    if status.upper() != "OK":
        raise ImapError(response.text[:200])
    return rest[0] if rest else ""


def search_uids(responses: list[Response]) -> list[int]:
    uids = []
    for r in responses:
        parts = r.text.split()
        if len(parts) >= 2 and parts[0] == "*" and parts[1].upper() == "SEARCH":
            uids += [int(p) for p in parts[2:] if p.isdigit()]
    return sorted(uids)


def fetched_body(responses: list[Response]) -> bytes | None:
    for r in responses:
        if r.text.startswith("* ") and " FETCH " in r.text.upper() and r.literals:
            return r.literals[-1]
    return None


def is_exists(response: Response) -> bool:
    parts = response.text.split()
    return len(parts) == 3 and parts[0] == "*" and parts[2].upper() == "EXISTS"

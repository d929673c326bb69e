# Decoding as a mail reader would, for content the hub must judge in the clear: streaming
# Content-Transfer-Encoding decoders (RFC 2045 base64 and quoted-printable, 7bit/8bit/binary,
# uuencode/x-uuencode), lenient the way readers are (a reader must never see bytes the hub did
# not), and the names a part may be saved under (Content-Type name, Content-Disposition filename,
# RFC 2231 and RFC 2047 encoded). Pure functions and small classes, no I/O; each decoder holds a
# few bytes between chunks (a uuencoded line at most).
import binascii
import re
from typing import Protocol

from relay.mime.stream import Part, decode_params, param_items

IDENTITY = ("", "7bit", "8bit", "binary")
UUENCODE = ("x-uuencode", "uuencode", "x-uue")
KNOWN_ENCODINGS = IDENTITY + ("base64", "quoted-printable") + UUENCODE
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(c for c in range(256) if c not in _B64 and c != 0x3D)
_MAX_LINE = 64 * 1024


class Decoder(Protocol):
    """Decodes a part's body chunk by chunk: feed(data) and close() return the bytes decoded so far.
    `error` says, once set, why the body cannot be decoded (a reader may then show its raw bytes)."""

    error: str | None

    def feed(self, data: bytes | bytearray | memoryview) -> bytes: ...

    def close(self) -> bytes: ...


def transfer_encoding(part: Part) -> str:
    """The part's Content-Transfer-Encoding, lower case, comments and blanks dropped ("" if none)."""
    value = part.header("content-transfer-encoding")
    if value is None:
        return ""
    return re.sub(r"\([^)]*\)", "", value).strip().lower()


def decoder_for(encoding: str) -> Decoder:
    """The decoder for one of KNOWN_ENCODINGS (callers refuse the others first)."""
    if encoding in IDENTITY:
        return Identity()
    if encoding == "base64":
        return Base64()
    if encoding == "quoted-printable":
        return QuotedPrintable()
    if encoding in UUENCODE:
        return UUDecode()
    raise ValueError(f"no decoder for Content-Transfer-Encoding {encoding!r}")


class Identity:
    error: str | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        return data if isinstance(data, bytes) else bytes(data)

    def close(self) -> bytes:
        return b""


class Base64:
    """Every byte outside the alphabet is skipped (RFC 2045 6.8); padding ends a group and
    decoding goes on after it (a reader that stops at the first '=' sees less, never more)."""

    error: str | None = None

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        text = self._rest + bytes(data).translate(None, _NOT_B64)
        pieces = text.split(b"=")
        out = [_decode_group_run(piece) for piece in pieces[:-1] if piece]
        last = pieces[-1]
        usable = len(last) - len(last) % 4
        out.append(binascii.a2b_base64(last[:usable]) if usable else b"")
        self._rest = last[usable:]
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._rest = self._rest, b""
        return _decode_group_run(rest) if rest else b""


def _decode_group_run(text: bytes) -> bytes:
    """Base64 characters ended by padding (or by the end): the whole groups and the padded rest."""
    usable = len(text) - len(text) % 4
    out = binascii.a2b_base64(text[:usable]) if usable else b""
    rest = text[usable:]
    if len(rest) >= 2:
        out += binascii.a2b_base64(rest + b"=" * (4 - len(rest)))
    return out


class QuotedPrintable:
    error: str | None = None

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        text = self._rest + bytes(data)
        cut = text.rfind(b"\n") + 1
        if cut == 0 and len(text) > _MAX_LINE:
            cut = len(text) - 2  # an '=XY' may be cut: keep two bytes
        self._rest = text[cut:]
        return binascii.a2b_qp(text[:cut]) if cut else b""

    def close(self) -> bytes:
        rest, self._rest = self._rest, b""
        return binascii.a2b_qp(rest)


class UUDecode:
    """uuencode (x-uuencode): lines before "begin" are skipped, each line after it carries its
    length in its first character, up to "end"."""

    def __init__(self) -> None:
        self._rest = b""
        self._state = "before"  # before -> lines -> after
        self.error: str | None = None
        self.name: str | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        text = self._rest + bytes(data)
        cut = text.rfind(b"\n") + 1
        if cut == 0 and len(text) > _MAX_LINE:
            self.error = f"a uuencoded line longer than {_MAX_LINE} bytes"
            self._rest = b""
            return b""
        self._rest = text[cut:]
        return self._lines(text[:cut].split(b"\n"))

    def close(self) -> bytes:
        rest, self._rest = self._rest, b""
        out = self._lines([rest]) if rest else b""
        if self._state == "before" and self.error is None:
            self.error = "x-uuencode without a 'begin' line"
        return out

    def _lines(self, lines: list[bytes]) -> bytes:
        out = []
        for raw in lines:
            line = raw.rstrip(b"\r")
            if len(line) > _MAX_LINE and self.error is None:
                self.error = f"a uuencoded line longer than {_MAX_LINE} bytes"
            if self._state == "before":
                if line.startswith(b"begin "):
                    self._state = "lines"
                    self.name = line.split(b" ", 2)[-1].decode("utf-8", "replace").strip()
            elif self._state == "lines":
                if line in (b"end", b"`", b""):
                    if line == b"end":
                        self._state = "after"
                    continue
                out.append(uu_line(line))
        return b"".join(out)


def uu_line(line: bytes) -> bytes:
    """One uuencoded line, decoded as far as its characters go."""
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:
        length = (line[0] - 32) & 63
        body = line[1 : 1 + (length + 2) // 3 * 4]
        try:
            return binascii.a2b_uu(bytes([32 + len(body) * 3 // 4 if body else 32]) + body)[:length]
        except binascii.Error:
            return b""


# -- names -----------------------------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded (blanks between two of them dropped); malformed ones kept."""
    text = re.sub(r"(\?=)\s+(=\?)", r"\1\2", text)
    return _ENCODED_WORD.sub(_decode_word, text)


def _decode_word(match: re.Match[str]) -> str:
    charset, kind, payload = match.group(1).split("*")[0], match.group(2).lower(), match.group(3)
    try:
        if kind == "b":
            raw = binascii.a2b_base64(payload.encode("ascii") + b"==")
        else:
            raw = binascii.a2b_qp(payload.replace("_", " ").encode("ascii"), header=True)
        return raw.decode(charset, "replace")
    except (LookupError, UnicodeError, binascii.Error, ValueError):
        return match.group(0)


def file_names(part: Part) -> list[str]:
    """The names the part may be saved under: Content-Disposition filename and Content-Type name,
    RFC 2231 and RFC 2047 decoded."""
    names = []
    name = part.params.get("name")
    if name:
        names.append(decode_words(name))
    disposition = part.header("content-disposition")
    if disposition is not None:
        params, _ = decode_params(param_items(disposition)[1])
        if params.get("filename"):
            names.append(decode_words(params["filename"]))
    return names

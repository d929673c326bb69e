# Reads the session-key packets at the start of an OpenPGP message as it streams: the key IDs of
# its public-key encrypted session key packets (PKESK, tag 1; key ID 0 = hidden recipient) and the
# tag of the first data packet after them. Accepts ASCII armor or binary, optionally inside a
# base64 Content-Transfer-Encoding, and old or new packet headers. Sans-I/O and bounded: it only
# ever looks at the first SCAN_LIMIT bytes and never decrypts anything.
import binascii
from dataclasses import dataclass, field

SCAN_LIMIT = 256 * 1024          # input bytes looked at before giving up on finding the data packet
_MAX_LINE = 4096
_MAX_SESSION_PACKET = 16 * 1024  # a PKESK is a few hundred bytes
PKESK, SKESK = 1, 3
DATA_TAGS = {9: "symmetrically encrypted data", 18: "symmetrically encrypted integrity protected data",
             20: "AEAD encrypted data"}
WILDCARD_KEY_ID = "0000000000000000"
_ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"


@dataclass
class SessionPackets:
    key_ids: list[str] = field(default_factory=list)  # 16 hex digits, upper case, in message order
    passphrase_packets: int = 0                       # SKESK: encrypted to a passphrase
    data_tag: int | None = None                       # tag of the first packet after the session keys
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.data_tag is not None or self.error is not None


class SessionPacketReader:
    """feed() the part's body as transmitted (after the part's header); close() at its end."""

    def __init__(self, transfer_encoding: str = ""):
        self.result = SessionPackets()
        self._base64_transfer = transfer_encoding.strip().lower() == "base64"
        self._transfer_rest = b""      # undecoded tail of the transfer encoding
        self._mode: str | None = None  # "armor" or "binary", decided by the first byte
        self._armor_state = "begin"    # begin -> headers -> body
        self._line = bytearray()
        self._armor_rest = b""
        self._packets = bytearray()
        self._seen = 0

    def feed(self, data: bytes) -> None:
        if self.result.complete or not data:
            return
        data = data[:SCAN_LIMIT - self._seen]
        self._seen += len(data)
        if self._base64_transfer:
            data = self._decode_base64(data, "transfer")
        self._content(data)
        if not self.result.complete and self._seen >= SCAN_LIMIT:
            self._fail(f"no encrypted data packet within the first {SCAN_LIMIT // 1024} KB")

    def close(self) -> SessionPackets:
        if not self.result.complete:
            if self._mode is None:
                self._fail("the encrypted part is empty")
            else:
                self._fail("the OpenPGP message ends before its encrypted data packet")
        return self.result

    # ---- layers: transfer encoding -> armor -> packets ----------------------------------------

    def _decode_base64(self, data: bytes, layer: str) -> bytes:
        text = (self._transfer_rest if layer == "transfer" else self._armor_rest) + data.translate(
            None, b" \t\r\n")
        usable = len(text) - len(text) % 4
        rest = text[usable:]
        if layer == "transfer":
            self._transfer_rest = rest
        else:
            self._armor_rest = rest
        try:
            return binascii.a2b_base64(text[:usable], strict_mode=True)
        except binascii.Error:
            self._fail(f"invalid base64 in the {'Content-Transfer-Encoding' if layer == 'transfer' else 'ASCII armor'}")
            return b""

    def _content(self, data: bytes) -> None:
        if self._mode is None:
            stripped = data.lstrip(b" \t\r\n")
            if not stripped:
                return
            self._mode = "binary" if stripped[0] & 0x80 else "armor"
            data = stripped
        if self._mode == "binary":
            self._packet_bytes(data)
        else:
            self._armor(data)

    def _armor(self, data: bytes) -> None:
        start = 0
        while start < len(data) and not self.result.complete:
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                if len(self._line) > _MAX_LINE:
                    self._fail("an ASCII armor line is too long")
                return
            self._line += data[start:end]
            start = end + 1
            line = bytes(self._line).rstrip(b"\r \t")
            self._line.clear()
            self._armor_line(line)

    def _armor_line(self, line: bytes) -> None:
        if self._armor_state == "begin":
            if line == _ARMOR_BEGIN:
                self._armor_state = "headers"
            elif line:
                self._fail("the encrypted part is neither an ASCII-armored PGP MESSAGE nor binary OpenPGP")
        elif self._armor_state == "headers":
            if not line:
                self._armor_state = "body"
            elif b": " not in line:
                self._fail("malformed ASCII armor header line")
        elif line.startswith(b"=") or line.startswith(b"-----"):
            self._fail("the OpenPGP message ends before its encrypted data packet")
        else:
            self._packet_bytes(self._decode_base64(line, "armor"))

    def _packet_bytes(self, data: bytes) -> None:
        if self.result.complete:
            return
        self._packets += data
        while not self.result.complete:
            parsed = _packet_header(self._packets)
            if parsed is None:
                return  # need more bytes
            if isinstance(parsed, str):
                self._fail(parsed)
                return
            tag, header_length, body_length = parsed
            if tag not in (PKESK, SKESK):
                if tag in DATA_TAGS:
                    self.result.data_tag = tag
                else:
                    self._fail(f"unexpected OpenPGP packet (tag {tag}) where encrypted data should be")
                return
            if body_length is None or body_length > _MAX_SESSION_PACKET:
                self._fail("malformed session key packet length")
                return
            if len(self._packets) < header_length + body_length:
                return
            body = bytes(self._packets[header_length:header_length + body_length])
            del self._packets[:header_length + body_length]
            if tag == SKESK:
                self.result.passphrase_packets += 1
                continue
            key_id = _pkesk_key_id(body)
            if key_id is None:
                self._fail("malformed public-key encrypted session key packet")
                return
            self.result.key_ids.append(key_id)

    def _fail(self, reason: str) -> None:
        if self.result.error is None and self.result.data_tag is None:
            self.result.error = reason
        self._packets.clear()


def _packet_header(buf: bytearray):
    """(tag, header length, body length or None for partial/indeterminate), None for "need more",
    or an error text."""
    if not buf:
        return None
    first = buf[0]
    if not first & 0x80:
        return "not an OpenPGP packet (bad packet header)"
    if first & 0x40:  # new format
        tag = first & 0x3F
        if len(buf) < 2:
            return None
        octet = buf[1]
        if octet < 192:
            return tag, 2, octet
        if octet < 224:
            return (tag, 3, ((octet - 192) << 8) + buf[2] + 192) if len(buf) >= 3 else None
        if octet == 255:
            return (tag, 6, int.from_bytes(buf[2:6], "big")) if len(buf) >= 6 else None
        return tag, 2, None  # partial body length
    tag = (first >> 2) & 0x0F
    length_type = first & 0x03
    if length_type == 3:
        return tag, 1, None  # indeterminate length
    size = (1, 2, 4)[length_type]
    if len(buf) < 1 + size:
        return None
    return tag, 1 + size, int.from_bytes(buf[1:1 + size], "big")


def _pkesk_key_id(body: bytes) -> str | None:
    """The recipient key ID of a v3 PKESK (RFC 4880 5.1) or of a v6 PKESK (RFC 9580 5.1)."""
    if len(body) >= 10 and body[0] == 3:
        return body[1:9].hex().upper()
    if len(body) >= 2 and body[0] == 6:
        size = body[1]
        if size == 0:
            return WILDCARD_KEY_ID
        if len(body) < 2 + size or size < 2:
            return None
        key_version, fingerprint = body[2], body[3:2 + size]
        return (fingerprint[-8:] if key_version == 4 else fingerprint[:8]).hex().upper()
    return None

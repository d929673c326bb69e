# OpenPGP packet sequences (RFC 4880 / RFC 9580 section 4-5), sans-I/O and without decrypting
# anything. PacketStream walks an encrypted message as it streams: an optional marker packet, the
# session-key packets (PKESK tag 1: their recipient key IDs, key ID 0 = hidden recipient; SKESK
# tag 3: a passphrase), then exactly one encrypted data packet (tag 9, 18 or 20) that must run to
# the end: a byte after it (a clear literal packet appended, a second message) is an error. The
# data packet's payload is skipped, not read: a caller holding base64 text need only decode the
# one byte of each partial-length chunk header (walk()). packet_tags() lists the packets of a
# small binary block (signatures, keys). Never holds more than one session-key packet (<= 16 KB).
from dataclasses import dataclass, field

SCAN_LIMIT = 256 * 1024  # bytes of session-key packets looked at before the data packet
_MAX_SESSION_PACKET = 16 * 1024  # a PKESK is a few hundred bytes
PKESK, SKESK, MARKER = 1, 3, 10
DATA_TAGS = {
    9: "symmetrically encrypted data",
    18: "symmetrically encrypted integrity protected data",
    20: "AEAD encrypted data",
}
WILDCARD_KEY_ID = "0000000000000000"
_HEADER, _ESK, _DATA, _CHUNK_HEADER, _END, _REST, _FAILED = range(7)


@dataclass
class SessionPackets:
    key_ids: list[str] = field(default_factory=list)  # 16 hex digits, upper case, in message order
    passphrase_packets: int = 0  # SKESK: encrypted to a passphrase
    data_tag: int | None = None  # tag of the encrypted data packet
    error: str | None = None

    @property
    def complete(self) -> bool:
        """The session keys are known (or the message is known to be bad)."""
        return self.data_tag is not None or self.error is not None


class PacketStream:
    """feed() the binary message in order, or walk() over the payload seeing only its chunk
    headers; close() at its end (truncated=True: the message may stop anywhere after its data
    packet began, as the first fragment of a message/partial does)."""

    def __init__(self) -> None:
        self.result = SessionPackets()
        self.offset = 0  # bytes consumed so far
        self._state = _HEADER
        self._buf = bytearray()  # a packet header or a session-key packet being collected
        self._need = 0  # _ESK: body bytes still to collect; _DATA: payload left in the chunk
        self._last = True  # the current data chunk ends the packet
        self.chunk = 0  # size of the last partial-length chunk (0: none)
        self._tag = 0
        self._first = True  # no packet seen yet (a marker packet may come first only)

    def skip(self, n: int) -> None:
        self.offset += n
        if self._state == _DATA:
            self._need -= n
            if self._need == 0:
                self._chunk_done()

    def walk(self, available: int, byte_at) -> int:
        """Pass over up to `available` bytes of the encrypted data packet's payload, looking only
        at the one-byte headers of its partial-length chunks (byte_at(i): the byte i places ahead).
        Returns the bytes consumed; stops before any other byte the packet structure depends on
        (a final chunk's length, whatever follows the packet), which feed() must then be given."""
        if self._state == _REST:
            self.skip(available)
            return available
        pos = 0
        while self._state == _DATA:
            need = self._need
            if pos + need >= available:
                self.skip(available - pos)
                return available
            pos += need
            self.skip(need)
            if self._state != _CHUNK_HEADER:
                break
            octet = byte_at(pos)
            if not 224 <= octet < 255:  # not a partial length: feed() reads the longer header
                break
            pos += 1
            self.offset += 1
            self._start_chunk(None, 1 << (octet & 0x1F))
        return pos

    def feed(self, data) -> None:
        pos, end = 0, len(data)
        while pos < end and self._state != _FAILED:
            state = self._state
            if state in (_DATA, _REST):
                base = pos
                pos += self.walk(end - pos, lambda ahead: data[base + ahead])
            elif state == _END:
                self._fail("data after the encrypted data packet (a second message or a clear packet appended)")
            elif state == _ESK:
                take = min(self._need, end - pos)
                self._buf += data[pos : pos + take]
                self._need -= take
                pos += take
                self.offset += take
                if self._need == 0:
                    self._session_packet()
            else:  # _HEADER or _CHUNK_HEADER: one byte at a time (at most six)
                self._buf.append(data[pos])
                pos += 1
                self.offset += 1
                if state == _HEADER:
                    self._packet_header()
                else:
                    self._chunk_header()

    def close(self, truncated: bool = False) -> SessionPackets:
        result = self.result
        if result.error is None:
            if result.data_tag is None:
                if self.offset == 0:
                    self._fail("the encrypted part is empty")
                else:
                    self._fail("the OpenPGP message ends before its encrypted data packet")
            elif not truncated and self._state not in (_END, _REST):
                self._fail("the OpenPGP message ends inside its encrypted data packet")
        return result

    # ---- states ----------------------------------------------------------------------------------

    def _packet_header(self) -> None:
        parsed = packet_header(self._buf)
        if parsed is None:
            return
        self._buf.clear()
        if isinstance(parsed, str):
            self._fail(parsed)
            return
        tag, _, length, partial = parsed
        first, self._first = self._first, False
        if tag in DATA_TAGS:
            self.result.data_tag = tag
            self._start_chunk(length, partial)
            return
        if tag == MARKER and first and length == 3:
            self._state, self._need, self._tag = _ESK, 3, tag
            return
        if tag not in (PKESK, SKESK):
            self._fail(f"unexpected OpenPGP packet (tag {tag}) where encrypted data should be")
        elif length is None or length > _MAX_SESSION_PACKET:
            self._fail("malformed session key packet length")
        elif self.offset + length > SCAN_LIMIT:
            self._fail(f"no encrypted data packet within the first {SCAN_LIMIT // 1024} KB")
        else:
            self._state, self._need, self._tag = _ESK, length, tag
            if length == 0:
                self._session_packet()

    def _session_packet(self) -> None:
        body = bytes(self._buf)
        self._buf.clear()
        self._state = _HEADER
        if self._tag == MARKER:
            if body != b"PGP":
                self._fail("malformed marker packet")
        elif self._tag == SKESK:
            self.result.passphrase_packets += 1
        else:
            key_id = _pkesk_key_id(body)
            if key_id is None:
                self._fail("malformed public-key encrypted session key packet")
            else:
                self.result.key_ids.append(key_id)

    def _start_chunk(self, length: int | None, partial: int | None) -> None:
        if partial is not None:
            self._need = self.chunk = partial
        elif length is not None:
            self._need = length
        else:  # old format, indeterminate: runs to the end
            self._state = _REST
            return
        self._state = _DATA
        self._last = partial is None
        if self._need == 0:
            self._chunk_done()

    def _chunk_done(self) -> None:
        self._state = _END if self._last else _CHUNK_HEADER

    def _chunk_header(self) -> None:
        parsed = _body_length(self._buf, 0)
        if parsed is None:
            return
        self._buf.clear()
        _, length, partial = parsed
        self._start_chunk(length, partial)

    def _fail(self, reason: str) -> None:
        if self.result.error is None:
            self.result.error = reason
        self._state = _FAILED
        self._buf.clear()


def packet_header(buf, pos: int = 0):
    """(tag, header length, body length or None, partial chunk length or None) of the packet
    starting at buf[pos]; None for "need more"; or an error text. Old-format indeterminate length:
    (tag, 1, None, None)."""
    if len(buf) <= pos:
        return None
    first = buf[pos]
    if not first & 0x80:
        return "not an OpenPGP packet (bad packet header)"
    if first & 0x40:  # new format
        parsed = _body_length(buf, pos + 1)
        if parsed is None:
            return None
        size, length, partial = parsed
        return first & 0x3F, 1 + size, length, partial
    tag = (first >> 2) & 0x0F
    length_type = first & 0x03
    if length_type == 3:
        return tag, 1, None, None
    size = (1, 2, 4)[length_type]
    if len(buf) < pos + 1 + size:
        return None
    return tag, 1 + size, int.from_bytes(buf[pos + 1 : pos + 1 + size], "big"), None


def _body_length(buf, pos: int):
    """A new-format body length at buf[pos]: (octets used, length or None, partial length or None)."""
    if len(buf) <= pos:
        return None
    octet = buf[pos]
    if octet < 192:
        return 1, octet, None
    if octet < 224:
        return (2, ((octet - 192) << 8) + buf[pos + 1] + 192, None) if len(buf) >= pos + 2 else None
    if octet == 255:
        return (5, int.from_bytes(buf[pos + 1 : pos + 5], "big"), None) if len(buf) >= pos + 5 else None
    return 1, None, 1 << (octet & 0x1F)


def packet_tags(data: bytes) -> list[int] | str:
    """The tags of the packets of a whole binary block, or an error text."""
    tags, pos = [], 0
    while pos < len(data):
        parsed = packet_header(data, pos)
        if parsed is None or isinstance(parsed, str):
            return parsed or "an OpenPGP packet header is cut short"
        tag, header_length, length, partial = parsed
        pos += header_length
        while partial is not None:
            pos += partial
            chunk = _body_length(data, pos)
            if chunk is None:
                return "an OpenPGP packet is cut short"
            pos += chunk[0]
            length, partial = chunk[1], chunk[2]
        if length is None:
            return "an OpenPGP packet of indeterminate length"
        pos += length
        if pos > len(data):
            return "an OpenPGP packet is cut short"
        tags.append(tag)
    return tags


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
        key_version, fingerprint = body[2], body[3 : 2 + size]
        return (fingerprint[-8:] if key_version == 4 else fingerprint[:8]).hex().upper()
    return None

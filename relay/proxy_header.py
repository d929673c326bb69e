# The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2) that a TCP balancer
# sends before the client's first byte, parsed sans-I/O: feed bytes, learn how many more to read
# (never past the header's end, so the bytes after it -- a TLS ClientHello, an SMTP command --
# stay in the socket for the protocol that follows), get the client's address or a one-line error.
# relay/proxy_gate.py does the reading; this module only parses.
# Must never: read or ask for a byte past the header's end, accept more than MAX_V2_LENGTH bytes
# of address and TLV data or a v1 line longer than the spec's 107 bytes, or turn a malformed
# header into anything but ProxyHeaderError.
import ipaddress
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the longest v1 line, CRLF included (the spec's figure)
MAX_V2_LENGTH = 1024  # address and TLV bytes after the 16-byte v2 head (HAProxy sends < 300)
_V2_HEAD = 16
_MIN_HEADER = 15  # "PROXY UNKNOWN\r\n"; a v2 header is 16 at least: safe to ask for at once

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_BYTES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyHeaderError(Exception):
    """Not a valid PROXY header; the text is one line, fit for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` is the client's (address, port); None for a v2 LOCAL command (the
    balancer's own health check) or v1 UNKNOWN / v2 UNSPEC: then the connection's own addresses
    count, as the spec says."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None

    @property
    def local(self) -> bool:
        return self.source is None


class ProxyHeaderReader:
    """Reads one header. `wanted()` is how many bytes to read next (0 once done); `feed(data)`
    takes at most that many and returns the header once complete (else None) or raises
    ProxyHeaderError."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._total = 0  # the header's full length once known (v2 after 16 bytes)
        self.header: ProxyHeader | None = None

    def wanted(self) -> int:
        if self.header is not None:
            return 0
        have = len(self._buffer)
        if self._total:
            return self._total - have
        if have < _MIN_HEADER:
            return _MIN_HEADER - have
        if self._buffer[:1] == b"\r":  # v2, its length not yet read
            return _V2_HEAD - have
        return 1  # v1: one byte at a time up to the CRLF (at most 107)

    def feed(self, data: bytes) -> ProxyHeader | None:
        if len(data) > self.wanted():
            raise ValueError("fed more bytes than wanted()")  # a bug of the caller, not the peer's
        self._buffer += data
        buffer = bytes(self._buffer)
        if not (V2_SIGNATURE.startswith(buffer[:12]) or V1_PREFIX.startswith(buffer[:6])):
            raise ProxyHeaderError("no PROXY protocol header (the balancer must send one: send-proxy-v2)")
        if buffer[:1] == b"\r":
            return self._feed_v2(buffer)
        return self._feed_v1(buffer)

    def _feed_v2(self, buffer: bytes) -> ProxyHeader | None:
        if len(buffer) < _V2_HEAD:
            return None
        if not self._total:
            version, command = buffer[12] >> 4, buffer[12] & 0xF
            if version != 2:
                raise ProxyHeaderError(f"PROXY v2 header with version {version}")
            if command not in (_V2_LOCAL, _V2_PROXY):
                raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
            length = int.from_bytes(buffer[14:16], "big")
            if length > MAX_V2_LENGTH:
                raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (at most {MAX_V2_LENGTH})")
            self._total = _V2_HEAD + length
            if length:
                return None
        if len(buffer) < self._total:
            return None
        self.header = _v2_addresses(buffer)
        return self.header

    def _feed_v1(self, buffer: bytes) -> ProxyHeader | None:
        if not buffer.endswith(b"\r\n"):
            if len(buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
            return None
        self.header = _v1_line(buffer[:-2])
        return self.header


def _v2_addresses(header: bytes) -> ProxyHeader:
    if header[12] & 0xF == _V2_LOCAL:
        return ProxyHeader(2, None)  # health check: addresses (if any) are ignored
    family, transport = header[13] >> 4, header[13] & 0xF
    if family == _AF_UNSPEC:
        return ProxyHeader(2, None)
    if family not in _ADDRESS_BYTES:
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family {family}")
    if transport != _STREAM:
        raise ProxyHeaderError(f"PROXY v2 header for transport {transport}, not a TCP stream")
    body = header[_V2_HEAD:]
    if len(body) < _ADDRESS_BYTES[family]:
        raise ProxyHeaderError(f"PROXY v2 header too short for its addresses ({len(body)} bytes)")
    if family == _AF_UNIX:
        raise ProxyHeaderError("PROXY v2 header for a unix socket client, not an IP address")
    size = 4 if family == _AF_INET else 16
    source = ipaddress.ip_address(body[:size])
    destination = ipaddress.ip_address(body[size : 2 * size])
    ports = body[2 * size : 2 * size + 4]
    return ProxyHeader(
        2,
        (str(source), int.from_bytes(ports[:2], "big")),
        (str(destination), int.from_bytes(ports[2:], "big")),
    )


def _v1_line(line: bytes) -> ProxyHeader:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line not in ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, None)  # the rest of the line is to be ignored
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line (PROXY TCP4|TCP6 SRC DST SPORT DPORT)")
    kind = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    try:
        source, destination = kind(fields[2]), kind(fields[3])
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 line with a bad {fields[1]} address") from None
    return ProxyHeader(1, (str(source), _v1_port(fields[4])), (str(destination), _v1_port(fields[5])))


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535 or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError("PROXY v1 line with a bad port")
    return int(text)

# The HTTP/1.x listener of the metrics port (/metrics, /healthz, the hub key's paths), hardened
# against hostile clients: the request head (request line and header fields) is bounded in size, in
# fields and in time (a slowloris client is cut at the deadline however it trickles), connections
# are limited in all and per client address, the response must be taken within a deadline, only
# GET and HEAD are served, and every refusal is a short 4xx/5xx reply before the close. One request
# per connection (Connection: close). parse_head() is the pure part; routing is the caller's.
# Must never: read a request body, keep a connection past its deadlines, log per request, or let a
# route's failure reach the client as anything but 500.
import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("mailhub.http")

MAX_REQUEST_LINE = 2048  # octets; longer: 414
MAX_HEAD = 8 * 1024  # request line and header fields; larger: 431
MAX_HEADER_FIELDS = 50  # more: 431
HEAD_SECONDS = 5.0  # to send the whole head; later: 408
RESPONSE_SECONDS = 30.0  # to take the whole response
MAX_CONNECTIONS = 64  # open at once, in all; more: 503
MAX_PER_ADDRESS = 8  # open at once from one client address; more: 503
ALLOWED = ("GET", "HEAD")

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD_START = re.compile(rb"[\r\n]*[!#$%&'*+.^_`|~0-9A-Za-z-]{0,16}(?: |\Z)")  # what a request may begin with
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*[\x20-\x7e\x80-\xff\t]*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string


@dataclass(frozen=True)
class Refusal:
    status: int
    text: str


def parse_head(head: bytes) -> Request | Refusal:
    """A complete request head (up to and including its empty line) -> Request or Refusal."""
    if len(head) > MAX_HEAD:
        return Refusal(431, f"request head over {MAX_HEAD} octets")
    lines = head.split(b"\n")
    request_line = lines[0].removesuffix(b"\r")
    if len(request_line) > MAX_REQUEST_LINE:
        return Refusal(414, "request line too long")
    fields = [line.removesuffix(b"\r") for line in lines[1:]]
    fields = fields[: fields.index(b"")] if b"" in fields else fields
    if len(fields) > MAX_HEADER_FIELDS:
        return Refusal(431, f"more than {MAX_HEADER_FIELDS} header fields")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if not re.fullmatch(rb"HTTP/\d\.\d", version):
        return Refusal(400, "malformed request line")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return Refusal(505, "only HTTP/1.0 and HTTP/1.1")
    if method.decode() not in ALLOWED:
        return Refusal(405, "only GET and HEAD")
    if not _TARGET.fullmatch(target):
        return Refusal(400, "malformed request target")
    if any(not _FIELD.fullmatch(field) for field in fields):
        return Refusal(400, "malformed header field")
    return Request(method.decode(), target.split(b"?", 1)[0].decode("ascii"))


def end_of_head(data: bytes | bytearray) -> int:
    """Length of the head in data (through its empty line), or -1 while it is incomplete."""
    for blank in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        at = data.find(blank)
        if at >= 0:
            return at + len(blank)
    return -1


class HttpServer:
    """handle() is the asyncio.start_server callback; route(path) -> (status, content type, body);
    counted(status) is told of every reply."""

    def __init__(
        self,
        route: Callable[[str], Awaitable[tuple[str, str, bytes]]],
        counted: Callable[[int], None] = lambda status: None,
    ) -> None:
        self.route = route
        self.counted = counted
        self.open: dict[str, int] = {}  # client address -> open connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else "local"
        try:
            if sum(self.open.values()) >= MAX_CONNECTIONS or self.open.get(address, 0) >= MAX_PER_ADDRESS:
                await self._reply(writer, 503, "text/plain", b"too many connections\n", head_only=False)
                return
            self.open[address] = self.open.get(address, 0) + 1
            try:
                await self._serve(reader, writer)
            finally:
                self.open[address] -= 1
                if not self.open[address]:
                    del self.open[address]
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await self._read_head(reader)
        request = head if isinstance(head, Refusal) else parse_head(head)
        if isinstance(request, Refusal):
            await self._reply(writer, request.status, "text/plain", request.text.encode() + b"\n", False)
            return
        try:
            status, ctype, body = await self.route(request.path)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:100])
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        await self._reply(writer, int(status.split()[0]), ctype, body, request.method == "HEAD")

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | Refusal:
        data = bytearray()
        try:
            async with asyncio.timeout(HEAD_SECONDS):
                while (end := end_of_head(data)) < 0:
                    if not _METHOD_START.match(data):  # e.g. a TLS handshake: no need to wait for a line
                        return Refusal(400, "not an HTTP request")
                    if b"\n" not in data and len(data) > MAX_REQUEST_LINE:
                        return Refusal(414, "request line too long")
                    if len(data) > MAX_HEAD:
                        return Refusal(431, f"request head over {MAX_HEAD} octets")
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ConnectionResetError("closed before the end of the request head")
                    data += chunk
        except TimeoutError:
            return Refusal(408, f"request head not complete within {HEAD_SECONDS:.0f} s")
        return bytes(data[:end])

    async def _reply(self, writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, head_only: bool) -> None:
        self.counted(status)
        extra = "Allow: GET, HEAD\r\n" if status == 405 else "Retry-After: 5\r\n" if status == 503 else ""
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(RESPONSE_SECONDS):
            await writer.drain()

# The HTTP/1.1 exchange under the S3 client: one request per connection (Connection: close), over
# asyncio streams (TLS for https endpoints), with a timeout on every step (connect, each write,
# each read), an overall deadline on the answer's head (interim 1xx answers included), a lowest rate
# for a body (MIN_RATE bytes per timeout: a store that trickles a byte now and then is cut off),
# and bounds on everything the server sends: the answer's head (64 KB, 100 fields), a chunk-size
# line (hex digits only), trailer fields (100), and the bodies read whole (the caller's limit). A
# body is sent from memory in slices, waiting for each to drain, so the transport never holds a
# second copy of it; an answer's body is either read whole (bounded) or streamed to a sink in
# slices. Must never read an unbounded amount from the server into memory, and never raise anything
# but S3Error.
import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from .errors import S3Error, printable

MAX_HEAD = 64 * 1024
MAX_FIELDS = 100
SLICE = 256 * 1024  # bytes written (then drained) or read at a time
MIN_RATE = 64 * 1024  # bytes of a body that must come within each `timeout` seconds
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

Sink = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class Endpoint:
    """Where the store listens: http or https, host, port, and a path prefix (usually empty)."""

    scheme: str
    host: str
    port: int
    base_path: str = ""

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"expected http://HOST[:PORT] or https://HOST[:PORT], got {url!r}")
        authority, _, path = rest.partition("/")
        if "@" in authority:  # user:password@ would end up in messages: keys go in [s3]'s own keys
            raise ValueError("the endpoint must not hold a user or password (set s3.access_key and s3.secret_key_file)")
        host, port = authority, 443 if scheme == "https" else 80
        if authority.startswith("["):  # [IPv6]:port
            host, _, after = authority[1:].partition("]")
            if after.startswith(":"):
                port = _port(after[1:], url)
        elif ":" in authority:
            host, _, text = authority.rpartition(":")
            port = _port(text, url)
        if not host:
            raise ValueError(f"no host in {url!r}")
        return cls(scheme, host, port, "/" + path.strip("/") if path.strip("/") else "")

    def host_header(self, host: str | None = None) -> str:
        host = host or self.host
        shown = f"[{host}]" if ":" in host else host
        default = 443 if self.scheme == "https" else 80
        return shown if self.port == default else f"{shown}:{self.port}"


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {url!r}")
    return int(text)


@dataclass
class Response:
    """An answer whose head has been read; its body is read with read_body() or stream()."""

    status: int
    reason: str
    headers: dict[str, str]
    what: str  # "PUT s3://bucket/key", for messages
    timeout: float
    _reader: asyncio.StreamReader = field(repr=False)
    _writer: asyncio.StreamWriter = field(repr=False)
    _has_body: bool = True
    _window_start: float = 0.0
    _window_bytes: int = 0

    async def read_body(self, limit: int) -> bytes:
        """The whole body; S3Error when it is longer than `limit` bytes."""
        parts: list[bytes] = []
        total = 0

        async def keep(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > limit:
                raise S3Error(f"{self.what}: the store's answer is larger than {limit} bytes", self.status, "too_large")
            parts.append(data)

        await self.stream(keep)
        return b"".join(parts)

    async def stream(self, sink: Sink) -> int:
        """Hand the body to `sink` in slices of at most SLICE bytes; the number of bytes."""
        try:
            if not self._has_body:
                return 0
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                return await self._chunked(sink)
            length = self.headers.get("content-length")
            if length is not None:
                if not is_number(length.strip()):
                    raise S3Error(f"{self.what}: bad Content-Length {printable(length)!r}", self.status, "protocol")
                return await self._exactly(int(length), sink)
            return await self._until_close(sink)
        finally:
            self.close()

    async def _exactly(self, length: int, sink: Sink) -> int:
        left = length
        while left:
            data = await self._read(min(left, SLICE))
            if not data:
                raise S3Error(
                    f"{self.what}: the store closed the connection after {length - left} of {length} bytes",
                    self.status,
                    "connection",
                )
            left -= len(data)
            await sink(data)
        return length

    async def _until_close(self, sink: Sink) -> int:
        total = 0
        while data := await self._read(SLICE):
            total += len(data)
            await sink(data)
        return total

    async def _chunked(self, sink: Sink) -> int:
        total = 0
        while True:
            line = await self._line()
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):  # not int(): it takes "-1", "0x5", "1_0"
                raise S3Error(f"{self.what}: bad chunk size in the answer", self.status, "protocol")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(MAX_FIELDS + 1):  # trailer fields, up to the empty line
                    if not await self._line():
                        return total
                raise S3Error(f"{self.what}: more than {MAX_FIELDS} trailer fields", self.status, "protocol")
            total += await self._exactly(size, sink)
            if await self._line():
                raise S3Error(f"{self.what}: no line end after a chunk", self.status, "protocol")

    async def _read(self, n: int) -> bytes:
        return self._count(await _step(self._reader.read(n), self.timeout, self.what))

    async def _line(self) -> bytes:
        return self._count(await _step(self._reader.readuntil(b"\r\n"), self.timeout, self.what))[:-2]

    def _count(self, data: bytes) -> bytes:
        """The lowest rate: at least MIN_RATE bytes in each window of `timeout` seconds (each read
        has its own timeout too, but a byte every timeout - 1 s would keep a body coming for ever)."""
        now = time.monotonic()
        if not self._window_start:
            self._window_start = now
        self._window_bytes += len(data)
        if now - self._window_start >= self.timeout:
            if self._window_bytes < MIN_RATE:
                raise S3Error(
                    f"{self.what}: the store sent {self._window_bytes} bytes in {now - self._window_start:.1f} s"
                    f" (less than {MIN_RATE} bytes per {self.timeout:g} s): given up",
                    self.status,
                    "timeout",
                )
            self._window_start, self._window_bytes = now, 0
        return data

    def close(self) -> None:
        self._writer.close()


async def _step(awaitable: Awaitable[bytes], timeout: float, what: str) -> bytes:
    """One read with a deadline, its failures as S3Error. (asyncio.timeout, not wait_for: on Python
    3.11 wait_for loses a cancellation that comes as the read completes, and a download went on
    after Ctrl-C or SIGTERM cancelled it.)"""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise S3Error(f"{what}: no answer from the store within {timeout:g} s", 0, "timeout") from None
    except asyncio.IncompleteReadError:
        raise S3Error(f"{what}: the store closed the connection mid-answer", 0, "connection") from None
    except (asyncio.LimitOverrunError, ValueError):
        raise S3Error(f"{what}: a line of the store's answer is longer than {MAX_HEAD} bytes", 0, "protocol") from None
    except OSError as exc:
        raise S3Error(f"{what}: connection to the store failed: {exc.strerror or exc}", 0, "connection") from None


async def exchange(
    endpoint: Endpoint,
    connect_host: str,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: list[bytes],
    timeout: float,
    what: str,
    tls: ssl.SSLContext | None = None,
) -> Response:
    """Send one request (its body from memory, in chunks) and read the answer's head."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                connect_host,
                endpoint.port,
                ssl=tls if endpoint.scheme == "https" else None,
                server_hostname=connect_host if endpoint.scheme == "https" else None,
                limit=MAX_HEAD,
            )
    except TimeoutError:
        raise S3Error(
            f"{what}: cannot connect to {connect_host}:{endpoint.port} within {timeout:g} s", 0, "timeout"
        ) from None
    except OSError as exc:
        raise S3Error(
            f"{what}: cannot connect to {connect_host}:{endpoint.port}: {exc.strerror or exc}", 0, "connection"
        ) from None
    try:
        head = [f"{method} {target} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head += [f"Content-Length: {sum(map(len, body))}", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1"))
        try:
            for chunk in body:
                view = memoryview(chunk)
                for start in range(0, len(view), SLICE):
                    writer.write(view[start : start + SLICE])
                    await _drain(writer, timeout, what)
            await _drain(writer, timeout, what)
        except S3Error as cut:  # the store may have answered (403, 503) and closed before taking it all
            try:
                status, reason, fields = await _read_head(reader, min(timeout, 5.0), what)
            except S3Error:
                raise cut from None
        else:
            status, reason, fields = await _read_head(reader, timeout, what)
    except BaseException:
        writer.close()
        raise
    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
    return Response(status, reason, fields, what, timeout, reader, writer, not no_body)


async def _drain(writer: asyncio.StreamWriter, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
    except TimeoutError:
        raise S3Error(f"{what}: the store took no data for {timeout:g} s", 0, "timeout") from None
    except OSError as exc:
        raise S3Error(f"{what}: connection to the store failed: {exc.strerror or exc}", 0, "connection") from None


async def _read_head(reader: asyncio.StreamReader, timeout: float, what: str) -> tuple[int, str, dict[str, str]]:
    """The answer's status, reason and fields, all of it within `timeout` (interim answers too)."""
    try:
        async with asyncio.timeout(timeout):
            return await _read_heads(reader, timeout, what)
    except TimeoutError:
        raise S3Error(f"{what}: no answer from the store within {timeout:g} s", 0, "timeout") from None


async def _read_heads(reader: asyncio.StreamReader, timeout: float, what: str) -> tuple[int, str, dict[str, str]]:
    while True:  # skip interim 1xx answers (100 Continue)
        raw = await _step(reader.readuntil(b"\r\n\r\n"), timeout, what)
        lines = raw[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (is_number(parts[1]) and len(parts[1]) == 3):
            raise S3Error(f"{what}: not an HTTP answer: {printable(lines[0], 80)!r}", 0, "protocol")
        status = int(parts[1])
        if len(lines) - 1 > MAX_FIELDS:
            raise S3Error(f"{what}: the answer has more than {MAX_FIELDS} header fields", status, "protocol")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise S3Error(f"{what}: bad header field {printable(line, 80)!r}", status, "protocol")
            fields[name.lower()] = value.strip()
        if not 100 <= status < 200:
            return status, parts[2] if len(parts) > 2 else "", fields


def is_number(text: str) -> bool:
    """Only ASCII digits (str.isdigit() takes "²", which int() refuses), at most 19 of them."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()

# The SMTP client of the outbound relay: one connection to a next hop (EHLO, STARTTLS per the
# route's policy, AUTH PLAIN), then any number of messages over it (a burst), each with one reply
# per recipient. The pure part (reply parsing, EHLO extensions, command texts) is separate from the
# thin asyncio I/O. Message bodies are streamed from the blob: os.sendfile when the bytes go out
# unchanged (plain TCP and BDAT, or DATA with no line starting with "."), else copied in chunks
# with dot-stuffing. Must never hold a whole message in memory or send credentials in the clear
# unless the route says tls = "none".
import asyncio
import base64
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from relay.file_sender import FileSender
from relay.framing import dot_stuff, message_terminator
from relay.outbound.routes import Route

CHUNK = 1024 * 1024
_HIGH_WATER = 4 * CHUNK
_DATA_DONE_FACTOR = 2  # the reply to the end of data may take longer (the next hop fsyncs a big mail)


# ---- pure protocol helpers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the reply's lines joined with " / ", codes removed

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class HopError(Exception):
    """The connection failed or the next hop refused the session (not one recipient): every
    recipient in flight is deferred (or bounced when `reply` is permanent for the message)."""

    def __init__(self, reason: str, reply: Reply | None = None):
        super().__init__(reason)
        self.reply = reply


def parse_reply(lines: list[bytes]) -> Reply:
    """One complete reply from its lines ("250-a", "250 b"); raises HopError on garbage."""
    codes = {line[:3] for line in lines}
    if len(codes) != 1 or not lines[0][:3].isdigit():
        raise HopError(f"malformed reply {b''.join(lines)[:200]!r}")
    text = " / ".join(line[4:].decode("utf-8", "replace").strip() for line in lines)
    return Reply(int(lines[0][:3]), text)


def parse_extensions(ehlo: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters; the first line is the greeting."""
    extensions = {}
    for line in ehlo.text.split(" / ")[1:]:
        keyword, _, params = line.partition(" ")
        extensions[keyword.upper()] = params.strip()
    return extensions


def mail_command(sender: str, size: int, extensions: dict[str, str]) -> bytes:
    params = f" SIZE={size}" if "SIZE" in extensions else ""
    if "8BITMIME" in extensions:
        params += " BODY=8BITMIME"  # the hub does not know whether the body is 7-bit; be safe
    return f"MAIL FROM:<{sender}>{params}\r\n".encode()


def size_limit(extensions: dict[str, str]) -> int | None:
    value = extensions.get("SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


# ---- I/O ---------------------------------------------------------------------------------------


@dataclass
class OutgoingMessage:
    queue_id: str
    sender: str
    recipients: list[str]
    blob: Path
    offset: int  # where the message starts in the blob file
    size: int
    dot_lines: bool
    results: dict[str, Reply] = field(default_factory=dict)


class HopConnection:
    """One SMTP session to a next hop; `await open()`, `await send(message)` as often as wanted,
    `await close()`."""

    def __init__(
        self, route: Route, helo_name: str, sender: FileSender, connect_timeout: float, command_timeout: float
    ):
        self.route = route
        self.helo_name = helo_name
        self.sender = sender
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.extensions: dict[str, str] = {}
        self.encrypted = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stop = threading.Event()

    @property
    def usable(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def _open_reader(self) -> asyncio.StreamReader:
        assert self._reader is not None, "the connection is not open"
        return self._reader

    @property
    def _open_writer(self) -> asyncio.StreamWriter:
        assert self._writer is not None, "the connection is not open (or was aborted)"
        return self._writer

    async def open(self) -> None:
        route = self.route
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(route.host, route.port, limit=64 * 1024)
        except (TimeoutError, OSError) as exc:
            raise HopError(f"cannot connect to {route.hop}: {exc or 'timeout'}") from None
        await self._expect(await self._reply(), "greeting")
        await self._ehlo()
        if route.tls != "none" and "STARTTLS" in self.extensions:
            await self._expect(await self._command(b"STARTTLS\r\n"), "STARTTLS")
            try:
                await self._open_writer.start_tls(
                    self._tls_context(), server_hostname=route.host, ssl_handshake_timeout=self.connect_timeout
                )
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                raise HopError(f"TLS with {route.hop} failed: {exc}") from None
            self.encrypted = True
            await self._ehlo()
        elif route.tls == "required":
            raise HopError(f"{route.hop} offers no STARTTLS but the route requires TLS")
        if route.auth_user:
            await self._authenticate()

    def _tls_context(self) -> ssl.SSLContext:
        if self.route.tls == "required":
            return ssl.create_default_context(cafile=self.route.ca_file)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # opportunistic: encrypt, but take any certificate
        return context

    async def _ehlo(self) -> None:
        reply = await self._command(f"EHLO {self.helo_name}\r\n".encode())
        if reply.permanent and not self.encrypted:  # an old server without ESMTP: plain SMTP
            await self._expect(await self._command(f"HELO {self.helo_name}\r\n".encode()), "HELO")
            self.extensions = {}
            return
        await self._expect(reply, "EHLO")
        self.extensions = parse_extensions(reply)

    async def _authenticate(self) -> None:
        if not self.encrypted and self.route.tls != "none":
            raise HopError(f"{self.route.hop}: not sending credentials without TLS")
        if "PLAIN" not in self.extensions.get("AUTH", "").upper().split():
            raise HopError(f"{self.route.hop} does not offer AUTH PLAIN")
        token = base64.b64encode(
            b"\0" + self.route.auth_user.encode() + b"\0" + self.route.auth_password.encode()
        ).decode()
        await self._expect(await self._command(f"AUTH PLAIN {token}\r\n".encode()), "AUTH")

    async def _expect(self, reply: Reply, step: str) -> None:
        if not 200 <= reply.code < 400:
            raise HopError(f"{self.route.hop} refused {step}: {reply}", reply)

    async def send(self, message: OutgoingMessage) -> None:
        """Offer one message; fills message.results with one reply per recipient."""
        limit = size_limit(self.extensions)
        if limit is not None and message.size > limit:
            too_big = Reply(552, f"5.3.4 message of {message.size} bytes exceeds the next hop's SIZE {limit}")
            message.results = {rcpt: too_big for rcpt in message.recipients}
            return
        commands = [mail_command(message.sender, message.size, self.extensions)]
        commands += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in message.recipients]
        if "PIPELINING" in self.extensions:
            self._open_writer.write(b"".join(commands))
            replies = [await self._reply() for _ in commands]
        else:
            replies = [await self._command(command) for command in commands]
        mail_reply, rcpt_replies = replies[0], replies[1:]
        if not mail_reply.ok:
            message.results = {rcpt: mail_reply for rcpt in message.recipients}
            await self._command(b"RSET\r\n")
            return
        accepted = [rcpt for rcpt, reply in zip(message.recipients, rcpt_replies) if reply.ok]
        message.results = {rcpt: reply for rcpt, reply in zip(message.recipients, rcpt_replies) if not reply.ok}
        if not accepted:
            await self._command(b"RSET\r\n")
            return
        final = await (self._bdat(message) if "CHUNKING" in self.extensions else self._data(message))
        message.results.update({rcpt: final for rcpt in accepted})

    async def alive(self) -> bool:
        """Check an idle connection before reusing it (RSET); closes it when it is gone."""
        try:
            await self._expect(await self._command(b"RSET\r\n"), "RSET")
        except HopError:
            self.abort()
            return False
        return True

    async def _bdat(self, message: OutgoingMessage) -> Reply:
        self._open_writer.write(f"BDAT {message.size} LAST\r\n".encode())
        await self._body(message, stuffing=False)
        return await self._reply(self.command_timeout * _DATA_DONE_FACTOR)

    async def _data(self, message: OutgoingMessage) -> Reply:
        reply = await self._command(b"DATA\r\n")
        if reply.code != 354:
            return reply
        ends_with_lf = await self._body(message, stuffing=message.dot_lines)
        self._open_writer.write(message_terminator(ends_with_lf))
        return await self._reply(self.command_timeout * _DATA_DONE_FACTOR)

    async def _body(self, message: OutgoingMessage, stuffing: bool) -> bool:
        """Send the blob (dot-stuffed if asked); True when its last byte is LF."""
        transport = self._open_writer.transport
        if not stuffing and FileSender.usable(transport):
            await self._flushed()
            try:
                return await self.sender.send(
                    transport, message.blob, message.offset, message.size, self._stop, self.command_timeout
                )
            except BaseException:
                self._stop.set()
                raise
        at_line_start = True
        offset = 0
        while offset < message.size:
            chunk = await self.sender.read(message.blob, message.offset + offset, min(CHUNK, message.size - offset))
            if not chunk:
                raise HopError(f"blob {message.blob} ended at {offset} of {message.size} bytes")
            offset += len(chunk)
            data, at_line_start = dot_stuff(chunk, at_line_start) if stuffing else (chunk, chunk.endswith(b"\n"))
            self._open_writer.write(data)
            async with asyncio.timeout(self.command_timeout):
                await self._open_writer.drain()
        return at_line_start

    async def _flushed(self) -> None:
        """Wait until everything written so far has left the transport (before a raw sendfile)."""
        transport = self._open_writer.transport
        transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(self.command_timeout):
                await self._open_writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(_HIGH_WATER)

    async def _command(self, line: bytes) -> Reply:
        self._open_writer.write(line)
        return await self._reply()

    async def _reply(self, timeout: float | None = None) -> Reply:
        timeout = timeout or self.command_timeout
        lines = []
        try:
            while True:
                async with asyncio.timeout(timeout):
                    line = await self._open_reader.readline()
                if not line.endswith(b"\n"):
                    raise HopError(f"{self.route.hop} closed the connection")
                lines.append(line.rstrip(b"\r\n"))
                if line[3:4] != b"-" or len(lines) > 100:
                    return parse_reply(lines)
        except TimeoutError:
            raise HopError(f"{self.route.hop} did not answer within {timeout:.0f}s") from None
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            raise HopError(f"{self.route.hop}: {exc}") from None

    async def close(self) -> None:
        """QUIT politely when the session is healthy, then close."""
        if self._writer is None:
            return
        self._stop.set()
        try:
            if not self._writer.is_closing():
                async with asyncio.timeout(5):
                    await self._command(b"QUIT\r\n")
        except (TimeoutError, HopError, OSError):
            pass
        self.abort()

    def abort(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None

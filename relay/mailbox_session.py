# The transport plumbing POP3 and IMAP sessions share: admission by the protocol's connection
# limits, the deadline for logging in, feeding received bytes to the sans-I/O core with read
# pausing, waiting for input with the idle timeout (counted from the last complete line, so bytes
# trickled into a line do not keep a connection alive), writes that fail once the connection is
# gone, flow control (drain, flushed), plus the peer helpers. No protocol logic lives here.
import asyncio
import ipaddress
import threading
import time
from typing import Generic, Protocol, TypeVar, cast

from relay import metrics
from relay.connection_limits import ConnectionCounter, Ticket
from relay.login_deadline import LoginDeadline
from relay.sessions import SessionInfo
from storage.records import Downloads
from storage.sites import Site

PAUSE_READING_AT = 64 * 1024  # client bytes waiting in the core before the socket is paused


class SessionContext(Protocol):
    """What this base uses of the context all sessions of a protocol share (Pop3Context, ImapContext)."""

    shutting_down: bool
    connection_counter: ConnectionCounter
    login_timeout: float


class SessionCore(Protocol):
    """What this base uses of a sans-I/O connection (Pop3Connection, ImapConnection)."""

    @property
    def buffered_bytes(self) -> int: ...

    @property
    def last_command(self) -> str: ...

    def receive_data(self, data: bytes) -> None: ...


ContextT = TypeVar("ContextT", bound=SessionContext)
CoreT = TypeVar("CoreT", bound=SessionCore)


class MailboxSessionIO(asyncio.Protocol, Generic[ContextT, CoreT]):
    """Base of Pop3Session and ImapSession: the session state both share. Subclasses set `core`
    (their sans-I/O connection) in connection_made()."""

    protocol = ""  # "pop3" / "imap": metric labels

    def __init__(self, ctx: ContextT, idle_timeout: float, implicit_tls: bool):
        self.ctx = ctx
        self.idle_timeout = idle_timeout
        self.ticket: Ticket | None = None  # counted by ctx.connections while open
        self._login_deadline: LoginDeadline | None = None
        self._end_reason: str | None = None  # why the server closed the connection on its own
        self._idle_from = 0.0  # loop time the idle timeout counts from
        self._partial_line = False  # the last bytes received did not end a line
        self.tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.core: CoreT | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer = "-"
        self.proxied_peer: tuple[str, int] | None = None  # the client behind a balancer (relay/proxy_gate.py)
        self.site: Site | None = None
        self.downloads: Downloads | None = None  # not yet added to the site's totals
        self._direct = 0  # messages sent from the file by a worker thread (sendfile, or
        # read, CRC-checked and sent), not through the event loop
        self._checked = 0  # messages whose CRC-32 was checked as they were sent
        self._started = time.monotonic()
        self.since = time.time()  # what `mailhub sessions` shows (relay/sessions.py)
        self.bytes_in = 0
        self.bytes_out = 0  # written, plus each mail sent from its file once it is sent
        self._input = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self._reading_paused = False
        self._stop_send = threading.Event()

    def session_info(self) -> SessionInfo:
        return SessionInfo(
            self.protocol,
            self.site.name if self.site is not None else None,
            self.peer,
            self.since,
            self.bytes_in,
            self.bytes_out,
            self.core.last_command if self.core is not None else "",
        )

    def _session_fields(self, messages: int, size: int, deleted: int, outcome: str) -> dict:
        """The JSON log fields of the session's last line (mailhub/logsetup.py FIELDS)."""
        return {
            "event": f"{self.protocol}.session",
            "protocol": self.protocol,
            "site": self.site.name if self.site is not None else None,
            "client": self.peer,
            "messages": messages,
            "size": size,
            "deleted": deleted,
            "outcome": outcome,
            "duration_s": round(time.monotonic() - self._started, 3),
        }

    def _kick_fields(self) -> dict:
        return {
            "event": "session.kicked",
            "protocol": self.protocol,
            "site": self.site.name if self.site is not None else None,
            "client": self.peer,
        }

    @property
    def _core(self) -> CoreT:
        """`core`, which connection_made() sets before the session's task starts."""
        assert self.core is not None
        return self.core

    @property
    def _transport(self) -> asyncio.Transport:
        """`transport`, which connection_made() sets before anything else runs."""
        assert self.transport is not None
        return self.transport

    # ---- admission and the login deadline ---------------------------------------------------

    def _admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Note the transport and peer and count the connection; the reason it is refused, or None
        (then the login deadline runs)."""
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transports are asyncio.Transports
        self.peer = client_ip(self.proxied_peer, transport)
        if self.ctx.shutting_down:
            return "shutting_down"
        admitted = self.ctx.connection_counter.admit(self.peer)
        if isinstance(admitted, str):
            metrics.connection_refused(self.protocol, admitted)
            return admitted
        self.ticket = admitted
        self._idle_from = asyncio.get_running_loop().time()
        self._login_deadline = LoginDeadline(self.protocol, self.ctx.login_timeout, admitted, self._login_expired)
        return None

    def _logged_in(self) -> None:
        """Credentials accepted: the login deadline is met."""
        assert self._login_deadline is not None  # set when the connection was admitted
        self._login_deadline.met()

    def _login_expired(self) -> bool:
        if self.site is not None or self._lost or self._transport.is_closing():
            return False
        self._end_reason = "login timeout"
        self._transport.write(self._login_timeout_reply())
        self._transport.close()
        return True

    def _login_timeout_reply(self) -> bytes:
        raise NotImplementedError

    def _release(self) -> None:
        if self._login_deadline is not None:
            self._login_deadline.cancel()
        if self.ticket is not None:
            self.ticket.release()

    # ---- input ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.core is None:
            return
        self.bytes_in += len(data)
        if b"\n" in data:  # a line completed: the idle timeout counts from here
            self._idle_from = asyncio.get_running_loop().time()
        self._partial_line = not data.endswith(b"\n")
        self.core.receive_data(data)
        if self.core.buffered_bytes >= PAUSE_READING_AT and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        self._input.set()

    def eof_received(self) -> bool:
        if self.core is not None:
            self.core.receive_data(b"")
        self._input.set()
        return not self.tls  # keep a half-closed plain connection open to answer what came before

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._lost = True
        self._stop_send.set()
        if self.core is not None:
            self.core.receive_data(b"")
        self._input.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def _wait_input(self) -> None:
        """Wait for bytes (or, in IMAP IDLE, a mailbox change). The idle timeout counts from the
        last complete line received, or from the first wait after the server answered it; not
        from bytes that do not end a line, nor from what the server sends unasked in IDLE."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False
        loop = asyncio.get_running_loop()
        if not self._partial_line and not getattr(self.core, "idling", False):
            self._idle_from = loop.time()
        self._input.clear()
        async with asyncio.timeout_at(self._idle_from + self.idle_timeout):
            await self._input.wait()

    def _write(self, data: bytes) -> None:
        if self._lost or self._transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.bytes_out += len(data)
        self._transport.write(data)

    async def _drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (flow control)."""
        if not self._writable.is_set():
            async with asyncio.timeout(self.idle_timeout):
                await self._writable.wait()
        if self._lost:
            raise ConnectionResetError("connection lost")

    async def _flushed(self) -> None:
        """Wait until the transport has handed every buffered byte to the kernel."""
        if self._transport.get_write_buffer_size() == 0:
            return
        self._transport.set_write_buffer_limits(high=0)  # resume_writing() once the buffer is empty
        try:
            await self._drain()
        finally:
            if not self._transport.is_closing():
                self._transport.set_write_buffer_limits()

    def _site_name(self) -> str:
        return self.site.name if self.site is not None else "-"


def client_ip(proxied_peer: tuple[str, int] | None, transport: asyncio.BaseTransport) -> str:
    """The client's address as the protocols use it: the PROXY header's, else the socket's peer
    ("local" for a unix socket)."""
    if proxied_peer is not None:
        return proxied_peer[0]
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "local"


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def printable(text: str | bytes) -> str:
    """Client-controlled text made safe for a log line (or a trace header)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if text.isprintable() and "\\" not in text:  # the common case, without a loop per character
        return text[:320]
    return "".join(c if c.isprintable() and c != "\\" else f"\\x{ord(c):02x}" for c in text)[:320]

# The transport plumbing POP3 and IMAP sessions share: feeding received bytes to the sans-I/O core
# with read pausing, waiting for input with the idle timeout, writes that fail once the connection
# is gone, flow control (drain, flushed), plus the peer helpers. No protocol logic lives here.
import asyncio
import ipaddress
import threading
import time

PAUSE_READING_AT = 64 * 1024   # client bytes waiting in the core before the socket is paused


class MailboxSessionIO(asyncio.Protocol):
    """Base of Pop3Session and ImapSession: the session state both share. Subclasses set `core`
    (their sans-I/O connection) in connection_made()."""

    def __init__(self, ctx, idle_timeout: float, implicit_tls: bool):
        self.ctx = ctx
        self.idle_timeout = idle_timeout
        self.tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.core = None
        self.task: asyncio.Task | None = None
        self.peer = "-"
        self.site = None
        self.downloads = None          # storage.Downloads not yet added to the site's totals
        self._zero_copy = 0            # messages sent with sendfile
        self._started = time.monotonic()
        self._input = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self._reading_paused = False
        self._stop_send = threading.Event()

    def data_received(self, data: bytes) -> None:
        if self.core is None:
            return
        self.core.receive_data(data)
        if self.core.buffered_bytes >= PAUSE_READING_AT and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        self._input.set()

    def eof_received(self):
        if self.core is not None:
            self.core.receive_data(b"")
        self._input.set()
        return not self.tls   # keep a half-closed plain connection open to answer what came before

    def connection_lost(self, exc) -> None:
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
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._reading_paused:
            self.transport.resume_reading()
            self._reading_paused = False
        self._input.clear()
        async with asyncio.timeout(self.idle_timeout):
            await self._input.wait()

    def _write(self, data: bytes) -> None:
        if self._lost or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def _drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (flow control)."""
        if not self._writable.is_set():
            async with asyncio.timeout(self.idle_timeout):
                await self._writable.wait()
        if self._lost:
            raise ConnectionResetError("connection lost")

    async def _flushed(self) -> None:
        """Wait until the transport has handed every buffered byte to the kernel."""
        if self.transport.get_write_buffer_size() == 0:
            return
        self.transport.set_write_buffer_limits(high=0)   # resume_writing() once the buffer is empty
        try:
            await self._drain()
        finally:
            if not self.transport.is_closing():
                self.transport.set_write_buffer_limits()

    def _site_name(self) -> str:
        return self.site.name if self.site is not None else "-"


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def printable(text: str | bytes) -> str:
    """Client-controlled text made safe for a log line (or a trace header)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if text.isprintable() and "\\" not in text:   # the common case, without a loop per character
        return text[:320]
    return "".join(c if c.isprintable() and c != "\\" else f"\\x{ord(c):02x}" for c in text)[:320]

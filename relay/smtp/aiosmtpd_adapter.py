# The one place that touches aiosmtpd's private members (and those of the asyncio StreamReader it
# reads with). The SMTP connection (relay/smtp/connection.py, under the session's verbs in
# relay/smtp/server.py) subclasses AiosmtpdSession; both use only what is named here plus aiosmtpd's
# public API (session, envelope, transport, push, smtp_<VERB> methods, the syntax decorator,
# AuthResult, Envelope). tests/test_aiosmtpd_adapter.py pins every behaviour relied on below against
# the installed aiosmtpd; pyproject.toml declares the versions.
# Must never: hold protocol logic or policy; it only renames and wraps.
import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session


class _ReaderBuffer(Protocol):
    """The asyncio StreamReader's private members read here (typeshed does not declare them)."""

    _buffer: bytearray
    _paused: bool
    _eof: bool
    _exception: BaseException | None
    _waiter: asyncio.Future[None] | None

    async def _wait_for_data(self, func_name: str) -> None: ...

    def _wakeup_waiter(self) -> None: ...

    def _maybe_resume_transport(self) -> None: ...


class AiosmtpdSession(SMTP):
    """aiosmtpd's SMTP session with its private hooks turned into named ones:

    - serve(): the whole session after the connection is made (aiosmtpd's _handle_client, the
      task connection_made() starts);
    - new_envelope(): the envelope of the next transaction (aiosmtpd's _create_envelope, called at
      connection, RSET, HELO/EHLO and after each transaction);
    - on_idle_timeout(): the idle deadline passed, just before the connection is closed;
    - an idle deadline that can be moved on cheaply (touch_idle_deadline, one timer per connection);
    - the command reader's buffer (buffered_bytes, has_buffered_line, unread, discard_buffered),
      reads and writes, and STARTTLS over the same streams."""

    transport: asyncio.Transport | None  # a stream transport (aiosmtpd declares asyncio.BaseTransport)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._idle_deadline = 0.0  # loop time at which the connection times out
        self._timer_at = 0.0  # loop time at which the idle timer fires (see _arm_timer)
        self._tls_started = False  # STARTTLS succeeded (aiosmtpd's own flag is its SSLProtocol)
        self._hand_over = 0  # read_some waits on an empty buffer for up to this many bytes
        self._handed: bytes | None = None  # what arrived then, as the transport gave it (not buffered)

    # ---- hooks for the subclass ---------------------------------------------------------------

    async def serve(self) -> None:
        raise NotImplementedError

    def new_envelope(self) -> Envelope:
        return Envelope()

    def on_idle_timeout(self) -> None:
        """Called once the idle deadline passed, before the transport is closed."""

    # ---- aiosmtpd's private hooks, routed to the named ones -------------------------------------

    async def _handle_client(self) -> None:
        await self.serve()

    def _create_envelope(self) -> Envelope:
        return self.new_envelope()

    def eof_received(self) -> bool | None:
        """The client closed its side: aiosmtpd would cancel the session's task at once, dropping
        the commands the client sent before; here the reader just reaches its end, and the session
        runs those commands first."""
        return asyncio.StreamReaderProtocol.eof_received(self)

    # ---- the session's state ------------------------------------------------------------------

    @property
    def ident(self) -> str:
        """The text after the host name in the 220 greeting."""
        return self.__ident__

    @property
    def commands(self) -> dict[str, Callable[[str | None], Awaitable[None]]]:
        """Verb (upper case) -> the bound smtp_<VERB> method."""
        return self._smtp_methods

    # (methods, not properties, where they assert: aiosmtpd's __init__ reads every property through
    # inspect.getmembers, which passes over an AttributeError only)

    def live_session(self) -> Session:
        """aiosmtpd's session, set from connection_made() on."""
        assert self.session is not None
        return self.session

    def live_transport(self) -> asyncio.Transport:
        """The transport while serve() runs (aiosmtpd sets it to None once the connection is lost,
        and cancels serve() then)."""
        assert self.transport is not None
        return self.transport

    @property
    def tls_active(self) -> bool:
        return self._tls_started

    @property
    def auth_require_tls(self) -> bool:
        return self._auth_require_tls

    @auth_require_tls.setter
    def auth_require_tls(self, required: bool) -> None:
        self._auth_require_tls = required

    def new_session(self) -> Session:
        """A fresh aiosmtpd Session (after STARTTLS: everything learnt before is forgotten)."""
        return self._create_session()

    def reset_transaction(self) -> None:
        """RSET, HELO, EHLO: a new envelope (aiosmtpd's _set_rset_state)."""
        self._set_rset_state()

    def end_transaction(self) -> None:
        """After a transaction's reply: a new envelope (aiosmtpd's _set_post_data_state)."""
        self._set_post_data_state()

    # ---- the idle deadline ----------------------------------------------------------------------

    @property
    def idle_timeout(self) -> float:
        return self._timeout_duration

    @property
    def idle_deadline(self) -> float:
        return self._idle_deadline

    def touch_idle_deadline(self, duration: float | None = None) -> None:
        """The connection times out `duration` (default: the idle timeout) from now."""
        self._reset_timeout(duration)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this at connection and re-armed a timer each time; here the deadline is
        # noted, and one timer per connection, when it fires, either times the connection out or
        # waits for the deadline as it is by then.
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        if self._timeout_handle is None or deadline < self._timer_at:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._arm_timer(deadline)

    def _arm_timer(self, deadline: float) -> None:
        # The timer's own deadline is kept here: uvloop's call_at returns a plain Handle, without
        # when(), for a deadline less than a millisecond away.
        self._timer_at = deadline
        self._timeout_handle = self.loop.call_at(deadline, self._check_idle)

    def _check_idle(self) -> None:
        if self.loop.time() >= self._idle_deadline:
            self._timeout_cb()
        else:
            self._arm_timer(self._idle_deadline)

    def _timeout_cb(self) -> None:
        self.on_idle_timeout()
        super()._timeout_cb()  # closes the transport

    # ---- reading and writing --------------------------------------------------------------------

    async def read_some(self, size: int) -> bytes:
        """Up to `size` bytes, b"" at the end of the stream. (StreamReader.read copies each byte
        three times: into its buffer, a slice, bytes; here the bytes the transport delivers while
        the reader waits on an empty buffer come as they are, and buffered ones are copied once.)"""
        reader = self._reader_buffer()
        if reader._exception is not None:
            raise reader._exception
        if not reader._buffer and not reader._eof:
            self._hand_over = size
            try:
                await reader._wait_for_data("read")
            except BaseException:
                if self._handed is not None:  # arrived as the wait was cancelled: left for the next read
                    reader._buffer[0:0] = self._handed
                    self._handed = None
                raise
            finally:
                self._hand_over = 0
            data, self._handed = self._handed, None
            if data is not None:
                return data
            if reader._exception is not None:
                raise reader._exception
        buffer = reader._buffer
        if len(buffer) <= size:
            data = bytes(buffer)
            buffer.clear()
        else:
            with memoryview(buffer) as view:
                data = bytes(view[:size])
            del buffer[:size]
        reader._maybe_resume_transport()
        return data

    def data_received(self, data: bytes) -> None:
        """Bytes from the transport: handed straight to a read_some waiting on an empty buffer (when
        they fit), else into the reader's buffer."""
        if self._hand_over and self._handed is None and 0 < len(data) <= self._hand_over:
            reader = self._reader_buffer()
            if not reader._buffer and reader._waiter is not None:
                self._handed = data
                self._hand_over = 0
                reader._wakeup_waiter()
                return
        super().data_received(data)

    async def read_until_lf(self) -> bytes:
        """The next line with its LF; asyncio.LimitOverrunError (with .consumed) past the reader's
        limit, asyncio.IncompleteReadError at the end of the stream."""
        return await self._reader.readuntil(b"\n")

    def _reader_buffer(self) -> _ReaderBuffer:
        return cast(_ReaderBuffer, self._reader)

    def buffered_bytes(self) -> int:
        """Bytes received and not yet read."""
        return len(self._reader_buffer()._buffer)

    def has_buffered_line(self) -> bool:
        """A complete line (a pipelined command) is already received and not yet read."""
        return b"\n" in self._reader_buffer()._buffer

    def unread(self, data: bytes) -> None:
        """Put bytes read too far (pipelined commands after DATA's end) back in front."""
        self._reader_buffer()._buffer[0:0] = data

    def discard_buffered(self) -> None:
        """Forget the bytes received and not yet read (RFC 3207: before the TLS handshake)."""
        self._reader_buffer()._buffer.clear()

    def reader_holds_socket_paused(self) -> bool:
        """The reader paused the socket itself (its buffer is full)."""
        return self._reader_buffer()._paused

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade the connection in place (STARTTLS): the same reader and writer go on over TLS."""
        await self._writer.start_tls(context)
        self.transport = cast(asyncio.Transport, self._writer.transport)  # asyncio's TLS transport
        self._tls_started = True


__all__ = ["AiosmtpdSession"]

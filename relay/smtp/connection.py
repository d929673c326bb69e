# The I/O of one SMTP connection, below the verbs (relay.smtp.server.HubSMTP subclasses it): its life
# cycle (admission by the listener's limits, the login deadline, the idle deadline moved on by
# mail data at a minimum rate, closing with a last reply), the command loop (lines bounded, every
# malformed one answered, a verb's count and the errors limited, a bug one log line and a 451), the
# reads (every byte waiting in the reader's buffer counted in the memory budget; the socket paused
# while mail data would go over it) and the replies (held back while a pipelined command waits).
# A base class rather than a part the session owns: it is aiosmtpd's protocol object itself
# (through relay.smtp.aiosmtpd_adapter, the only module touching aiosmtpd's private members), which
# asyncio calls for the connection's events.
import asyncio
import logging
import time

from relay import connection_limits, metrics
from relay.internal_errors import report_internal_error
from relay.login_deadline import LoginDeadline
from relay.mailbox_session import client_ip, is_loopback
from relay.sessions import KICK_REASON, SessionInfo
from relay.smtp import replies as R
from relay.smtp.aiosmtpd_adapter import AiosmtpdSession
from relay.smtp.context import SmtpContext, Transaction
from relay.smtp.protocol import CommandBudget, command, wire
from storage import Site

log = logging.getLogger("mailhub.smtp")
_READER_LIMIT = 128 * 1024  # the command reader buffers at most 2x this before pausing the socket
_MIN_DATA_RATE = 500  # octets/s a client must keep up in DATA/BDAT (idle deadline, see _data_progress)
_YIELD_EVERY = 16  # commands run between two turns of the event loop: a client pipelining 256 KB of
# NOOPs (40,000 commands, all buffered) would otherwise hold the loop for a second


class SmtpConnection(AiosmtpdSession):
    line_length_limit = _READER_LIMIT

    def __init__(self, ctx: SmtpContext):
        cfg = ctx.cfg
        super().__init__(
            ctx,
            hostname=cfg.hostname,
            ident="ESMTP DICOM Mail Hub",
            tls_context=ctx.tls_context,
            timeout=cfg.smtp.idle_timeout,
            data_size_limit=cfg.smtp.max_message_size,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self.ctx = ctx
        self._in_data = False  # reading DATA/BDAT bytes or committing them
        self._held: list[bytes] = []  # replies held back for pipelining
        self.peer_ip = ""
        self.proxied_peer: tuple[str, int] | None = None  # the client behind a balancer (relay/proxy_gate.py)
        self._from_peer_network = False
        self._command_budget = CommandBudget(cfg.smtp.max_commands, cfg.smtp.max_bad_commands)
        self._closing_why = ""  # why the hub closed the connection, for the log of an aborted transaction
        self._budget = ctx.storage.memory_budget
        self._buffered = 0  # bytes of the reader's buffer counted in the memory budget
        self._reading_paused = False  # the socket is not read until memory is under the budget
        self.ticket: connection_limits.Ticket | None = None  # counted while open (SmtpContext.admit)
        self._login_deadline: LoginDeadline | None = None
        # what `mailhub sessions` shows (relay/sessions.py)
        self.since = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_command = ""
        self._kick_pending = False  # close once the transaction in flight is over

    # ---- what the listener, the verbs and the message path read ----------------------------------

    @property
    def busy(self) -> bool:
        """A transaction is in flight: data being received or committed, or a BDAT series open."""
        tx = self.envelope
        return self._in_data or (isinstance(tx, Transaction) and tx.bdat is not None)

    @property
    def site(self) -> Site | None:
        """The site logged in on this connection (AUTH), or None."""
        session = self.session  # (None while aiosmtpd's __init__ reads every property)
        return session.auth_data if session is not None and session.authenticated else None

    def session_info(self) -> SessionInfo:
        site = self.site
        return SessionInfo(
            "smtp",
            site.name if site else None,
            self.peer_ip,
            self.since,
            self.bytes_in,
            self.bytes_out,
            self.last_command,
        )

    def kick(self) -> None:
        """The operator ends this session (`mailhub sessions --kick`): 421 now, or right after the
        transaction in flight (its mail is answered first, so nothing is stored twice)."""
        self._kick_pending = True
        if not self.busy:
            self._close_kicked()

    def _close_kicked(self) -> None:
        self._closing_why = self._closing_why or KICK_REASON
        site = self.site.name if self.site else None
        log.info(
            "%s site=%s: %s",
            self.peer_ip,
            site or "-",
            KICK_REASON,
            extra={"event": "session.kicked", "protocol": "smtp", "site": site, "client": self.peer_ip},
        )
        self.close_now(R.KICKED)

    # ---- life cycle and reads --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peer_ip = client_ip(self.proxied_peer, transport)
        if self.proxied_peer is not None:
            # aiosmtpd's copy (typeshed-less: declared str | None, holds the peername tuple): the client's
            self.live_session().peer = self.proxied_peer  # type: ignore[assignment]
        self._from_peer_network = self.ctx.is_peer(self.peer_ip)
        loopback = self.peer_ip == "local" or is_loopback(self.peer_ip)
        self.auth_require_tls = not (loopback or self.ctx.cfg.auth.allow_plaintext)

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.release(self)
        if self._login_deadline is not None:
            self._login_deadline.cancel()
        self._budget.give(self._buffered)
        self._buffered = 0
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)
        self._count_buffer()
        if self._in_data and self._budget.full and not self._reading_paused and self.transport is not None:
            self._reading_paused = True  # mail data waits in the socket until memory is freed
            self.transport.pause_reading()
            self._budget.pause(self)

    def resume_reading(self) -> None:
        """Memory is under the budget again (or the session's data is over): read the socket again,
        unless the reader holds it paused itself (its buffer is full)."""
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing() and not self.reader_holds_socket_paused():
                self.transport.resume_reading()

    def _count_buffer(self) -> None:
        """The bytes waiting in the reader's buffer count in the memory budget (called after every
        read and every arrival)."""
        size = self.buffered_bytes()
        if size > self._buffered:
            self._budget.take(size - self._buffered)
        elif size < self._buffered:
            self._budget.give(self._buffered - size)
        self._buffered = size

    def _data_over(self) -> None:
        self._in_data = False
        self.resume_reading()  # a pause for memory holds back mail data only

    async def _read(self, size: int) -> bytes:
        chunk = await self.read_some(size)
        self._count_buffer()
        return chunk

    def eof_received(self) -> bool | None:
        """The client closed its side: the commands it sent before still run (the adapter keeps
        aiosmtpd from cancelling the session); the session ends when the reader reaches the end."""
        self._closing_why = self._closing_why or "client closed"
        return super().eof_received()

    # ---- the command loop ------------------------------------------------------------------------

    async def serve(self) -> None:
        refusal = self.ctx.admit(self, self.peer_ip)
        metrics.smtp_session(
            "admitted" if refusal is None else "shutting_down" if refusal == R.SHUTTING_DOWN else "too_many_connections"
        )
        if refusal is not None:
            self.close_now(refusal)
            return
        self._login_deadline = LoginDeadline("smtp", self.ctx.cfg.smtp.login_timeout, self.ticket, self._login_expired)
        try:
            await self.push(f"220 {self.hostname} {self.ident}")
            await self._serve_commands()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client is gone (a transaction it left was logged by Receiver.abort)
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _serve_commands(self) -> None:
        """Read command lines and run them until the connection closes. Every malformed line gets its
        500/501 reply; smtp.max_bad_commands of them close the connection (421), as does a verb sent
        more than smtp.max_commands times."""
        budget = self._command_budget
        served = 0
        while not self.live_transport().is_closing():
            served += 1
            if served % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # buffered commands do not suspend the reader: let others run
            line = await self._read_line()
            parsed = command(line, self.ctx.cfg.smtp.max_line_length, self.commands)
            if isinstance(parsed, str):
                await self.push(parsed)
            else:
                verb, arg = parsed
                self.last_command = verb
                method = self.commands[verb]
                too_many = budget.take(verb)
                if too_many:
                    log.warning("%s: %s sent too many times", self.peer_ip, verb)
                    self.close_now(too_many)
                    return
                self.touch_idle_deadline()
                try:
                    await method(arg)
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a bug: one log line, the session carries on
                    self._report(exc)
                    await self.push(R.INTERNAL_ERROR)
            if self._kick_pending and not self.busy:
                self._close_kicked()
                return
            if budget.exhausted:
                log.info("%s: too many errors (%d), closing", self.peer_ip, budget.errors)
                self.close_now(R.TOO_MANY_ERRORS)
                return

    async def _read_line(self) -> bytes | None:
        """The next line without its CRLF (or bare LF); None for a line longer than the reader's
        buffer, which is read and thrown away up to its end (never held whole)."""
        try:
            line = await self.read_until_lf()
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            while True:
                await self._read(consumed)
                try:
                    await self.read_until_lf()
                    self._count_buffer()
                    return None
                except asyncio.LimitOverrunError as more:
                    consumed = more.consumed
        self._count_buffer()
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    def _report(self, error: Exception) -> None:
        tx = self.envelope
        message = tx.receiving or tx.bdat if isinstance(tx, Transaction) else None
        site = self.site
        report_internal_error(
            log,
            "smtp",
            error,
            f"peer={self.peer_ip} site={site.name if site else '-'} qid={message.queue_id if message else '-'}",
        )

    # ---- the login deadline ----------------------------------------------------------------------

    def _logged_in(self) -> None:
        """Authenticated, or (from a peer network) a transaction started: the login deadline is
        met; the idle timeout alone applies."""
        if self._login_deadline is not None:
            self._login_deadline.met()

    def _login_expired(self) -> bool:
        """smtp.login_timeout passed without AUTH (from a peer network: without MAIL FROM)."""
        if self.transport is None or self.transport.is_closing():
            return False
        log.info(
            "%s: closed: %s within %.0f s",
            self.peer_ip,
            "no mail transaction" if self._from_peer_network else "no authentication",
            self.ctx.cfg.smtp.login_timeout,
        )
        self.close_now(R.login_timeout(self._from_peer_network, self.ctx.cfg.smtp.login_timeout))
        return True

    # ---- replies and closing ---------------------------------------------------------------------

    async def reply_pipelined(self, status: str) -> None:
        """Reply, but hold it back while the client's next complete command is already buffered:
        a pipelining client then gets the replies to its whole group in one segment (RFC 2920)."""
        self._held.append(status.encode() + b"\r\n")
        if not self.has_buffered_line():
            await self._flush_held()

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            self._command_budget.replied(status)
            self._held.append(wire(status))
        else:
            self._held.append(status + b"\r\n")
        await self._flush_held()

    async def _flush_held(self) -> None:
        data = b"".join(self._held)
        self._held.clear()
        self.bytes_out += len(data)
        await self.send(data)

    def close_now(self, reply: str) -> None:
        self._closing_why = self._closing_why or ("shutdown" if reply == R.SHUTTING_DOWN else reply[:9])
        if self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._held) + reply.encode() + b"\r\n"
            self.bytes_out += len(data)
            self.transport.write(data)
            self._held.clear()
            self.transport.close()

    # ---- the idle deadline -----------------------------------------------------------------------

    def _data_progress(self, octets: int) -> None:
        """Message data arrived: as Postfix's smtpd_min_data_rate, the idle deadline moves on by
        octets / _MIN_DATA_RATE seconds (at most to a full idle_timeout from now), so that a client
        trickling a few bytes at a time cannot hold a transaction open for ever."""
        now = self.loop.time()
        self.touch_idle_deadline(max(0.001, min(self.idle_timeout, self.idle_deadline - now + octets / _MIN_DATA_RATE)))

    def on_idle_timeout(self) -> None:
        self._closing_why = self._closing_why or "idle timeout"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(R.TIMEOUT.encode() + b"\r\n")


__all__ = ["SmtpConnection"]

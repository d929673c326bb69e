# SMTP ingress: aiosmtpd's session objects (through relay.smtp.aiosmtpd_adapter, the only module
# touching aiosmtpd's private members) with the hub's own command loop (lines bounded, every
# malformed one answered) and its own HELO/EHLO/MAIL/RCPT/DATA/BDAT/AUTH/STARTTLS. What the protocol
# allows in which phase, command lines, reply bytes and the AUTH exchange are the sans-I/O core
# relay.smtp.protocol (argument syntax: relay.smtp.syntax). DATA and BDAT are read in large chunks
# straight into a spool file (never line by line, never the whole message in memory; read buffers
# count in the memory budget); a 250 is sent only after storage has committed the message durably.
# Relay control lives in relay.smtp.policy, reply texts in relay.smtp.replies; this module is the
# I/O glue. It must never let a client's input reach a
# traceback: a bug is one log line (internal_errors) and a 451, and the session goes on.
import asyncio
import logging
import ssl
import time

from aiosmtpd.smtp import syntax

from relay import connection_limits, metrics
from relay.internal_errors import report_internal_error
from relay.login_deadline import LoginDeadline
from relay.mailbox_session import is_loopback, printable
from relay.smtp import replies as R
from relay.smtp.aiosmtpd_adapter import AiosmtpdSession
from relay.smtp.context import SmtpContext, Transaction
from relay.smtp.ingest import IncomingMessage
from relay.smtp.message_scan import DotLineScanner
from relay.smtp.pacing import Pacer
from relay.smtp.policy import Client, recipient_verdict, sender_verdict
from relay.smtp.protocol import (
    NO_ARGUMENT,
    AuthExchange,
    Challenge,
    CommandBudget,
    Credentials,
    Phase,
    command,
    ehlo_reply,
    out_of_sequence,
    phase_of,
    wire,
)
from relay.smtp.receiving import Receiver
from relay.smtp.refusals import log_throttle_refusal, track_refusal
from relay.smtp.stream import DataDecoder
from relay.smtp.syntax import parse_bdat, parse_helo, parse_mail_parameters, parse_path
from storage import Delivery, Site, StorageFull

log = logging.getLogger("mailhub.smtp")
CHUNK = 1024 * 1024
_READER_LIMIT = 128 * 1024  # the command reader buffers at most 2x this before pausing the socket
_MIN_DATA_RATE = 500  # octets/s a client must keep up in DATA/BDAT (idle deadline, see _data_progress)
_MAX_AUTH_FAILURES = 5  # per connection (the login guard slows and blocks across connections)
_YIELD_EVERY = 16  # commands run between two turns of the event loop: a client pipelining 256 KB of
# NOOPs (40,000 commands, all buffered) would otherwise hold the loop for a second


class HubSMTP(AiosmtpdSession):
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
        self._from_peer_network = False
        self._auth_failures = 0
        self._command_budget = CommandBudget(cfg.smtp.max_commands, cfg.smtp.max_bad_commands)
        self._closing_why = ""  # why the hub closed the connection, for the log of an aborted transaction
        self._budget = ctx.storage.memory_budget
        self._buffered = 0  # bytes of the reader's buffer counted in the memory budget
        self._reading_paused = False  # the socket is not read until memory is under the budget
        self.ticket: connection_limits.Ticket | None = None  # counted while open (SmtpContext.admit)
        self._login_deadline: LoginDeadline | None = None
        self._receiver = Receiver(self)

    # ---- connection life cycle -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A transaction is in flight: data being received or committed, or a BDAT series open."""
        tx = self.envelope
        return self._in_data or (isinstance(tx, Transaction) and tx.bdat is not None)

    def transaction(self) -> Transaction:
        """The transaction under way: set from connection_made() on, and always a Transaction
        (new_envelope). (A method: aiosmtpd's __init__ reads every property.)"""
        tx = self.envelope
        assert isinstance(tx, Transaction)
        return tx

    def new_envelope(self) -> Transaction:
        old = getattr(self, "envelope", None)
        if isinstance(old, Transaction):
            self._receiver.abort(old, "reset")  # RSET, EHLO or STARTTLS between two BDAT chunks
            self.ctx.throttle.release(old)  # sizes reserved at RCPT end with their transaction
        return Transaction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "local"
        self._from_peer_network = self.ctx.is_peer(self.peer_ip)
        loopback = self.peer_ip == "local" or is_loopback(self.peer_ip)
        self.auth_require_tls = not (loopback or self.ctx.cfg.auth.allow_plaintext)

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.release(self)
        if self._login_deadline is not None:
            self._login_deadline.cancel()
        self._budget.give(self._buffered)
        self._buffered = 0
        tx = self.envelope
        if isinstance(tx, Transaction):
            self._receiver.abort(tx, self._closing_why or ("connection lost" if error else "client closed"))
            self.ctx.throttle.release(tx)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
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
        await self.send(data)

    def close_now(self, reply: str) -> None:
        self._closing_why = self._closing_why or ("shutdown" if reply == R.SHUTTING_DOWN else reply[:9])
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._held) + reply.encode() + b"\r\n")
            self._held.clear()
            self.transport.close()

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

    # ---- EHLO / STARTTLS / AUTH --------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, arg: str | None):
        hostname = parse_helo(arg)
        if hostname is None:
            await self.push(R.HELO_SYNTAX)
            return
        self.reset_transaction()
        session = self.live_session()
        session.extended_smtp = False
        session.host_name = hostname
        await self.push(f"250 {self.hostname}")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, arg: str | None):
        hostname = parse_helo(arg)
        if hostname is None:
            await self.push(R.EHLO_SYNTAX)
            return
        self.reset_transaction()
        session = self.live_session()
        session.extended_smtp = True
        session.host_name = hostname
        await self.push(
            ehlo_reply(
                self.hostname,
                self.ctx.cfg.smtp.max_message_size,
                starttls=bool(self.tls_context) and not self.tls_active,
                auth=not self.auth_require_tls or self.tls_active,
            )
        )

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None):
        if arg is None:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    @syntax("EXPN <list>")
    async def smtp_EXPN(self, arg: str | None):
        await self.push("502 5.5.1 EXPN not available")

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None):
        if arg is not None:
            await self.push(NO_ARGUMENT["QUIT"])
            return
        self._closing_why = "quit"
        await self.push(R.BYE)
        self.live_transport().close()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str):
        if arg:
            await self.push(NO_ARGUMENT["STARTTLS"])
            return
        if not self.tls_context:
            await self.push(R.TLS_UNAVAILABLE)
            return
        if self.tls_active:
            await self.push(R.ALREADY_TLS)
            return
        self.discard_buffered()  # RFC 3207: nothing sent before the handshake may count
        self._count_buffer()
        await self.push(R.READY_TLS)
        try:
            await self.start_tls(self.tls_context)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer_ip, exc)
            self.live_transport().close()
            return
        # RFC 3207 4.2: forget everything learnt before TLS, authentication included.
        session = self.new_session()
        session.peer = self.live_session().peer
        session.ssl = self.live_transport().get_extra_info("ssl_object")
        self.session = session
        self.reset_transaction()

    @syntax("AUTH <mechanism> [<initial response>]")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self.live_session().extended_smtp:
            await self.push(R.AUTH_NEEDS_EHLO)
            return
        if self.auth_require_tls and not self.tls_active:
            await self.push(R.AUTH_NEEDS_TLS)
            return
        if self.live_session().authenticated:
            await self.push(R.AUTH_ALREADY)
            return
        sequence_error = out_of_sequence("AUTH", self._phase())
        if sequence_error:
            await self.push(sequence_error)
            return
        exchange = AuthExchange(arg)
        event = exchange.start()
        while isinstance(event, Challenge):
            self._held.append(event.line)
            await self._flush_held()
            line = await self._read_line()
            event = exchange.receive(None if line is None or len(line) > self.ctx.cfg.smtp.max_line_length else line)
        if isinstance(event, Credentials):
            reply = await self._check_login(event.login, event.password)
        else:
            reply = event.reply
        await self.push(reply)
        if not self.live_session().authenticated and exchange.counts:
            self._auth_failures += 1
            if self._auth_failures >= _MAX_AUTH_FAILURES:
                self.close_now(R.TOO_MANY_AUTH_FAILURES)

    async def _check_login(self, login: bytes, password: bytes) -> str:
        """Log in as the site (the session is then authenticated); the reply."""
        outcome = await self.ctx.logins.login(
            "smtp", self.peer_ip, login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        )
        if outcome.site is None:
            return R.AUTH_FAILED if outcome.temporary is None else R.auth_temporary_failure(outcome.temporary)
        self._logged_in()
        session = self.live_session()
        session.authenticated = True
        session.auth_data = outcome.site
        return R.AUTH_OK

    @property
    def site(self) -> Site | None:
        session = self.session  # (None while aiosmtpd's __init__ reads every property)
        return session.auth_data if session is not None and session.authenticated else None

    # ---- MAIL / RCPT -------------------------------------------------------------------------

    @syntax("MAIL FROM:<address>", extended=" [SIZE=<size>] [BODY=7BIT|8BITMIME]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        parsed = await self._path_or_reply("MAIL", arg, "FROM:")
        if parsed is None:
            return
        site = self.site
        if site is not None and self.ctx.site_gone(site):  # `mailhub site remove` while logged in
            log.info("%s site=%s: MAIL refused: the site was removed", self.peer_ip, site.name)
            session = self.live_session()
            session.authenticated, session.auth_data = False, None
            await self.push(R.SITE_REMOVED)
            return
        address, params = parsed
        size = parse_mail_parameters(params)
        if isinstance(size, str):
            await self.push(size)
            return
        if size is not None and size > self.ctx.cfg.smtp.max_message_size:
            await self._refuse("mail", R.MESSAGE_TOO_BIG, address)
            return
        refusal = sender_verdict(self._client(), address)
        if refusal is None and await self.ctx.storage.short_of_space(size):
            refusal = StorageFull.reply  # a full disk: nothing taken until space returns
        if refusal:
            await self._refuse("mail", refusal, address)
            return
        tx = self.transaction()
        tx.mail_from = address
        tx.declared_size = size
        if self._from_peer_network:
            self._logged_in()  # a peer network's transaction started: its login deadline is met
        await self.reply_pipelined(R.SENDER_OK)

    @syntax("RCPT TO:<address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        parsed = await self._path_or_reply("RCPT", arg, "TO:")
        if parsed is None:
            return
        address, params = parsed
        if params:
            await self.push(R.UNKNOWN_PARAMETER)
            return
        tx = self.transaction()
        if len(tx.rcpt_tos) >= self.ctx.cfg.smtp.max_recipients:
            await self._refuse("rcpt", R.TOO_MANY_RECIPIENTS, tx.mail_from, address)
            return
        if self.ctx.directory is not None and self.ctx.directory.is_directory_address(address):
            await self._directory_recipient(address)
            return
        refusal, site = recipient_verdict(
            self._client(), address, self.ctx.cfg.domain, self.ctx.sites.by_address, self.ctx.has_route
        )
        if refusal:
            log.info("%s: RCPT <%s> refused: %s", self.peer_ip, printable(address), refusal)
            await self._refuse("rcpt", refusal, tx.mail_from, address)
            return
        if site is None:
            if all(r.lower() != address.lower() for r in tx.remote):
                tx.remote.append(address)
        elif all(d.site_id != site.id for d in tx.deliveries):
            verdict = self.ctx.throttle.at_rcpt(tx, self.site, site, tx.declared_size, time.monotonic(), time.time())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: RCPT <%s> %s", self.peer_ip, printable(address), verdict.log_text())
            if verdict.reply is not None:
                log_throttle_refusal(self.peer_ip, self.site, f"RCPT <{printable(address)}>", verdict.reply, verdict)
                await self._refuse("rcpt", verdict.reply, tx.mail_from, address)
                return
            limits = self.ctx.throttle.limits(site)  # checked once more as the mail is committed
            tx.deliveries.append(Delivery(site.id, address, site.name, limits.mailbox_bytes, limits.mailbox_messages))
            tx.receivers.append(site)
            tx.verdicts[site.id] = verdict
        tx.rcpt_tos.append(address)
        await self.reply_pipelined(R.RECIPIENT_OK)

    async def _directory_recipient(self, address: str) -> None:
        """directory@<local domain>: answered with the signed participant list, to sites only."""
        site, directory, tx = self.site, self.ctx.directory, self.transaction()
        assert directory is not None  # (only its addresses come here)
        if site is None:
            await self._refuse("rcpt", R.DIRECTORY_SITES_ONLY, tx.mail_from, address)
            return
        if not tx.directory_request:  # one request per transaction, however many addresses
            wait = directory.take_request(site.id, time.monotonic())
            if wait > 0:
                await self._refuse("rcpt", R.directory_too_soon(wait), tx.mail_from, address)
                return
        tx.directory_request = True
        tx.rcpt_tos.append(address)
        await self.reply_pipelined(R.RECIPIENT_OK)

    async def _refuse(self, command: str, reply: str, sender: str | None, rcpt: str | None = None) -> None:
        """A policy or limit refusal of MAIL FROM or RCPT TO: counted, tracked, answered."""
        metrics.smtp_refusal(command, reply)
        track_refusal(self.ctx, self.peer_ip, self.site, reply, sender, [rcpt])
        await self.push(reply)

    def _client(self) -> Client:
        return Client(site=self.site, from_peer_network=self._from_peer_network)

    def _phase(self) -> Phase:
        tx = self.transaction()
        return phase_of(
            bool(self.live_session().host_name),
            tx.mail_from is not None,
            tx.has_recipients,
            tx.bdat is not None,
            tx.bdat_failed,
        )

    async def _path_or_reply(self, verb: str, arg: str | None, keyword: str) -> tuple[str, dict[str, str]] | None:
        """The common start of MAIL and RCPT: (address, params), or None once a reply was sent."""
        sequence_error = out_of_sequence(verb, self._phase())
        if sequence_error:
            await self.push(sequence_error)
            return None
        parsed = parse_path(arg, keyword, null_allowed=keyword == "FROM:")
        if isinstance(parsed, str):
            await self.push(parsed)
            return None
        return parsed

    # ---- DATA / BDAT -------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        phase = self._phase()
        reply = NO_ARGUMENT["DATA"] if arg and phase is not Phase.CONNECTED else out_of_sequence("DATA", phase)
        if reply:
            await self.push(reply)
            return
        self._in_data = True
        tx = self.transaction()
        message = tx.receiving = self._receiver.new_message()
        try:
            await self.push(R.START_DATA)
            decoder = DataDecoder()
            pacer = tx.pacer = Pacer(self.ctx.throttle, tx.receivers)
            while not decoder.done:
                chunk = await self._read(CHUNK)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                size = len(chunk)
                self._data_progress(size)
                message.write(decoder.feed(chunk))
                del chunk  # the spool holds (and counts) what it keeps: a stalled sender pins nothing more
                if message.backlogged:
                    await message.room()
                await pacer.after_read(size)
            if decoder.leftover:
                self.unread(decoder.leftover)  # pipelined commands after the data
                self._count_buffer()
            reply = await self._receiver.finish(message, decoder.dot_lines)
            tx.receiving = None
        except BaseException as exc:
            self._receiver.abort(tx, self._closing_why or _why(exc))
            raise
        finally:
            self._data_over()
        await self._reply_after_transaction(reply)

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        size, last = parse_bdat(arg)
        tx = self.transaction()
        if size is None or last is None:  # (a LAST or not comes with a valid size)
            if size is not None:  # the size is known: its chunk is skipped, and a message
                self._in_data = True  # being received lost it, so its transaction fails
                try:
                    await self._read_chunk(size, None)
                finally:
                    self._data_over()
            if tx.bdat is not None:
                tx.bdat.discard()
                tx.bdat, tx.bdat_failed = None, True
            await self.push(R.BDAT_SYNTAX)
            return  # without a valid size the chunk cannot be skipped; the client will resync or die
        sequence_error = out_of_sequence("BDAT", self._phase())
        if sequence_error is None and tx.bdat is None:
            tx.bdat = self._receiver.new_message()
            tx.bdat_dots = DotLineScanner()
            tx.pacer = Pacer(self.ctx.throttle, tx.receivers)
        self._in_data = True
        try:
            if sequence_error is not None:
                await self._read_chunk(size, None)
                reply = sequence_error
            else:
                message, dots, pacer = tx.bdat, tx.bdat_dots, tx.pacer
                assert message is not None and dots is not None and pacer is not None  # (opened together)
                await self._read_chunk(size, (message, dots, pacer))
                if message.failed or last:
                    reply = await self._receiver.finish(message, dots.found)
                    tx.bdat, tx.bdat_failed = None, reply[0] != "2"
                else:
                    reply = R.chunk_received(size)
        except BaseException as exc:
            self._receiver.abort(tx, self._closing_why or _why(exc))
            raise
        finally:
            self._data_over()
        await self._reply_after_transaction(reply, reset=last)

    async def _read_chunk(self, size: int, into: tuple[IncomingMessage, DotLineScanner, Pacer] | None) -> None:
        """Read a BDAT chunk of `size` octets into a BDAT series (its message, the message's dot-line
        scanner, the transaction's pacer), or skip it (`into` None)."""
        remaining = size
        while remaining:
            chunk = await self._read(min(remaining, CHUNK))
            if not chunk:
                raise ConnectionResetError("connection closed during BDAT")
            size = len(chunk)
            self._data_progress(size)
            remaining -= size
            if into is None:
                del chunk  # skipped (and, as below, not pinned while waiting for the next bytes)
                continue
            message, dots, pacer = into
            message.write(chunk)
            dots.feed(chunk)
            del chunk  # as in DATA: nothing pinned while waiting for the next bytes
            if message.backlogged:
                await message.room()
            await pacer.after_read(size)

    async def _reply_after_transaction(self, reply: str, reset: bool = True) -> None:
        if reset:
            self.end_transaction()
        await self.reply_pipelined(reply)
        if reset and self.ctx.shutting_down:
            self.close_now(R.SHUTTING_DOWN)


def _why(error: BaseException) -> str:
    """Why a transaction ended without a reply, when the hub did not close the connection itself."""
    if isinstance(error, asyncio.CancelledError):
        return "client closed"  # aiosmtpd cancels the session's task at EOF and at connection loss
    if isinstance(error, (ConnectionError, asyncio.IncompleteReadError)):
        return "client closed"
    return type(error).__name__


__all__ = ["HubSMTP"]

# SMTP ingress, the verbs of one session: HELO/EHLO/VRFY/EXPN/QUIT/STARTTLS/AUTH, MAIL/RCPT (who
# may send to whom: relay.smtp.policy; the throttle's verdicts), DATA/BDAT, and the transaction they
# build. Below them the connection's I/O (relay.smtp.connection: the command loop, reads counted in
# the memory budget, replies, deadlines; aiosmtpd only through relay.smtp.aiosmtpd_adapter). What
# the protocol allows in which phase, command lines, reply bytes and the AUTH exchange are the
# sans-I/O core relay.smtp.protocol (argument syntax: relay.smtp.syntax). DATA and BDAT are read in
# large chunks straight into a spool file (never line by line, never the whole message in memory);
# what becomes of the message is the message path relay.smtp.receiving (a 250 only after storage
# has committed it durably). Shared state and the transaction: relay.smtp.context; refusals' log
# lines and tracking events: relay.smtp.refusals; reply texts: relay.smtp.replies.
import asyncio
import logging
import ssl
import time

from aiosmtpd.smtp import syntax

from relay import metrics
from relay.mailbox_session import printable
from relay.smtp import replies as R
from relay.smtp.connection import SmtpConnection
from relay.smtp.context import SmtpContext, Transaction
from relay.smtp.ingest import IncomingMessage
from relay.smtp.message_scan import DotLineScanner
from relay.smtp.pacing import Pacer
from relay.smtp.policy import Client, recipient_verdict, sender_verdict
from relay.smtp.postmaster import is_postmaster
from relay.smtp.protocol import (
    NO_ARGUMENT,
    AuthExchange,
    Challenge,
    Credentials,
    Phase,
    ehlo_reply,
    out_of_sequence,
    phase_of,
)
from relay.smtp.receiving import Receiver
from relay.smtp.refusals import log_throttle_refusal, track_refusal
from relay.smtp.stream import DataDecoder
from relay.smtp.syntax import parse_bdat, parse_helo, parse_mail_parameters, parse_path
from storage import Delivery, Site, StorageFull

log = logging.getLogger("mailhub.smtp")
CHUNK = 1024 * 1024
_MAX_AUTH_FAILURES = 5  # per connection (the login guard slows and blocks across connections)


class HubSMTP(SmtpConnection):
    def __init__(self, ctx: SmtpContext):
        super().__init__(ctx)
        self._auth_failures = 0
        self._receiver = Receiver(self)

    # ---- the transaction ---------------------------------------------------------------------

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

    def connection_lost(self, error: Exception | None) -> None:
        tx = self.envelope
        if isinstance(tx, Transaction):
            self._receiver.abort(tx, self._closing_why or ("connection lost" if error else "client closed"))
            self.ctx.throttle.release(tx)
        super().connection_lost(error)

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
        session.auth_data = outcome.site  # type: ignore[assignment]  # aiosmtpd infers None; it holds the login
        return R.AUTH_OK

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
        if is_postmaster(address, self.ctx.cfg.domain):
            await self._postmaster_recipient(address)
            return
        refusal, site = recipient_verdict(
            self._client(), address, self.ctx.cfg.domain, self.ctx.sites.by_address, self.ctx.has_route
        )
        if refusal:
            log.info(
                "%s: RCPT <%s> refused: %s",
                self.peer_ip,
                printable(address),
                refusal,
                extra={
                    "event": "smtp.rcpt_refused",
                    "protocol": "smtp",
                    "site": self.site.name if self.site else None,
                    "client": self.peer_ip,
                    "recipients": [printable(address)],
                    "outcome": refusal[:3],
                },
            )
            await self._refuse("rcpt", refusal, tx.mail_from, address)
            return
        if site is None:
            if all(r.lower() != address.lower() for r in tx.remote):
                tx.remote.append(address)
        else:
            tx.postmaster_sites.discard(site.id)  # a recipient in its own right: under the policy
            if not await self._deliver_to(site, address):
                return
        tx.rcpt_tos.append(address)
        await self.reply_pipelined(R.RECIPIENT_OK)

    async def _deliver_to(self, site: Site, address: str) -> bool:
        """Add a local site's mailbox to the transaction, if the throttle lets it (else refused)."""
        tx = self.transaction()
        if any(d.site_id == site.id for d in tx.deliveries):
            return True
        verdict = self.ctx.throttle.at_rcpt(tx, self.site, site, tx.declared_size, time.monotonic(), time.time())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: RCPT <%s> %s", self.peer_ip, printable(address), verdict.log_text())
        if verdict.reply is not None:
            log_throttle_refusal(
                self.peer_ip, self.site, f"RCPT <{printable(address)}>", verdict.reply, verdict, receiver=site
            )
            await self._refuse("rcpt", verdict.reply, tx.mail_from, address)
            return False
        limits = self.ctx.throttle.limits(site)  # checked once more as the mail is committed
        tx.deliveries.append(
            Delivery(
                site.id,
                address,
                site.name,
                limits.mailbox_bytes,
                limits.mailbox_messages,
                limits.received_per_day,
                limits.received_per_month,
            )
        )
        tx.receivers.append(site)
        tx.verdicts[site.id] = verdict
        return True

    async def _postmaster_recipient(self, address: str) -> None:
        """postmaster@<local domain> (relay/smtp/postmaster.py): to lifecycle.operator_address, from
        anyone; bounded in size and rate for clients that are not logged-in sites."""
        ctx, tx = self.ctx, self.transaction()
        target = ctx.cfg.lifecycle.operator_address
        if not target:
            await self._refuse("rcpt", R.POSTMASTER_UNSET, tx.mail_from, address)
            return
        outsider = self.site is None
        if outsider and (tx.declared_size or 0) > ctx.cfg.smtp.postmaster_max_message_size:
            await self._refuse("rcpt", R.POSTMASTER_TOO_BIG, tx.mail_from, address)
            return
        if outsider and not tx.postmaster:
            wait = ctx.postmaster_rate.take(self.peer_ip, time.monotonic())
            if wait > 0:
                log.info("%s: RCPT <%s> refused: over smtp.postmaster_max_per_hour", self.peer_ip, printable(address))
                await self._refuse("rcpt", R.postmaster_too_often(wait), tx.mail_from, address)
                return
        site = ctx.sites.by_address(target)
        if site is not None:
            direct = any(d.site_id == site.id for d in tx.deliveries) and site.id not in tx.postmaster_sites
            if not await self._deliver_to(site, target):
                return
            if not direct:
                tx.postmaster_sites.add(site.id)
        elif target.rpartition("@")[2].lower() not in ctx.cfg.domain and ctx.has_route(target):
            if all(r.lower() != target.lower() for r in tx.remote):
                tx.remote.append(target)
        else:
            log.warning(
                "mail to postmaster deferred: lifecycle.operator_address %s is neither a site's address nor"
                " relayed (add the site, or a relay route)",
                target,
            )
            await self._refuse("rcpt", R.POSTMASTER_UNREACHABLE, tx.mail_from, address)
            return
        tx.postmaster = True
        tx.rcpt_tos.append(address)
        self._logged_in()  # a mail transaction of its own: the idle timeout alone applies
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

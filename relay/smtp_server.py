# SMTP ingress: aiosmtpd's command loop with the hub's own MAIL/RCPT/DATA/BDAT/AUTH/STARTTLS.
# DATA and BDAT are read in large chunks straight into a spool file (never line by line, never the
# whole message in memory); a 250 is sent only after storage has committed the message durably.
# Relay control lives in smtp_policy, reply texts in smtp_replies; this module is the I/O glue.
import asyncio
import base64
import binascii
import collections
import ipaddress
import logging
import re
import ssl
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, syntax

from directory import DirectoryError, DirectoryMailer, EncryptionPolicy, KeyRing, policy_for
from mailhub import metrics
from quotas import SetPart, Throttle, Verdict
from storage import Delivery, Site, SiteCache, Storage, StorageError
from storage.events import refusal as refusal_event

from . import smtp_replies as R
from .ingest import IncomingMessage
from .mailbox_session import is_loopback, printable
from .message_scan import DotLineScanner
from .outbound_routes import route_for
from .smtp_pacing import Pacer
from .smtp_policy import Client, recipient_verdict, sender_verdict
from .smtp_stream import DataDecoder

log = logging.getLogger("mailhub.smtp")
CHUNK = 1024 * 1024
_READER_LIMIT = 128 * 1024  # the command reader buffers at most 2x this before pausing the socket
_MAX_AUTH_FAILURES = 5
# <local@domain> with a plain dot-atom local part: the common case, parsed without the email package.
_SIMPLE_PATH = re.compile(r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)\Z")


class Transaction(Envelope):
    """aiosmtpd's envelope plus what the hub needs per transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[Delivery] = []
        self.receivers: list[Site] = []           # the local sites of the deliveries
        self.verdicts: dict[int, Verdict] = {}    # the throttle's verdict at RCPT per receiving site
        self.remote: list[str] = []  # recipients to relay to other networks
        self.declared_size: int | None = None
        self.bdat: IncomingMessage | None = None
        self.bdat_dots: DotLineScanner | None = None
        self.bdat_failed = False
        self.pacer: Pacer | None = None           # reads DATA/BDAT bytes no faster than allowed
        self.directory_request = False  # directory@<local domain> was a recipient
        self.policy: EncryptionPolicy | None = None

    @property
    def has_recipients(self) -> bool:
        return bool(self.deliveries or self.remote) or self.directory_request


class SmtpContext:
    """What all SMTP connections share: config, storage, sites, limits, live connections."""

    def __init__(self, cfg, storage: Storage, sites: SiteCache, tls_context: ssl.SSLContext | None,
                 throttle: Throttle, directory: DirectoryMailer | None = None,
                 keyring: KeyRing | None = None):
        self.cfg = cfg
        self.storage = storage
        self.sites = sites
        self.throttle = throttle
        self.tls_context = tls_context
        self.directory = directory
        self.keyring = keyring
        self.connections: set["HubSMTP"] = set()
        self.per_ip: collections.Counter = collections.Counter()
        self.shutting_down = False
        relay = cfg.relay
        self.has_route = lambda address: relay.enabled and route_for(relay.routes, address) is not None
        # aiosmtpd reads its budget of unrecognised commands per connection from this module global.
        aiosmtpd.smtp.BOGUS_LIMIT = cfg.smtp.max_bad_commands
        aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled

    def admit(self, conn: "HubSMTP", ip: str) -> str | None:
        limits = self.cfg.smtp
        if self.shutting_down:
            return R.SHUTTING_DOWN
        if len(self.connections) >= limits.max_connections or self.per_ip[ip] >= limits.max_connections_per_ip:
            return R.TOO_MANY_CONNECTIONS
        self.connections.add(conn)
        self.per_ip[ip] += 1
        return None

    def release(self, conn: "HubSMTP", ip: str) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def is_peer(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.cfg.smtp.peer_networks)

    async def drain(self, timeout: float) -> None:
        """Shutdown: close idle sessions now, give busy ones until `timeout` to finish."""
        self.shutting_down = True
        deadline = time.monotonic() + timeout
        while True:
            for conn in list(self.connections):
                if not conn.busy:
                    conn.close_now(R.SHUTTING_DOWN)
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close_now(R.SHUTTING_DOWN)


class HubSMTP(SMTP):
    line_length_limit = _READER_LIMIT
    AuthLoginUsernameChallenge = "Username:"   # as most servers prompt (aiosmtpd: "User Name\0")
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, ctx: SmtpContext):
        cfg = ctx.cfg
        super().__init__(
            ctx, hostname=cfg.hostname, ident="ESMTP DICOM Mail Hub", tls_context=ctx.tls_context,
            timeout=cfg.smtp.idle_timeout, data_size_limit=cfg.smtp.max_message_size,
            auth_require_tls=True, command_call_limit=cfg.smtp.max_commands, loop=asyncio.get_running_loop())
        self.ctx = ctx
        limit = cfg.smtp.max_line_length
        self.command_size_limits = collections.defaultdict(lambda: limit)
        self._in_data = False  # reading DATA/BDAT bytes or committing them
        self._held: list[bytes] = []  # replies held back for pipelining
        self._peer_ip = ""
        self._from_peer_network = False
        self._auth_failures = 0
        self._idle_deadline = 0.0   # loop time at which the connection times out (_reset_timeout)

    # ---- connection life cycle -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A transaction is in flight: data being received or committed, or a BDAT series open."""
        return self._in_data or (self.envelope is not None and self.envelope.bdat is not None)

    def _create_envelope(self) -> Transaction:
        old = getattr(self, "envelope", None)
        if old is not None:
            self.ctx.throttle.release(old)   # sizes reserved at RCPT end with their transaction
        return Transaction()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer_ip = peer[0] if isinstance(peer, tuple) else "local"
        self._from_peer_network = self.ctx.is_peer(self._peer_ip)
        loopback = self._peer_ip == "local" or is_loopback(self._peer_ip)
        self._auth_require_tls = not (loopback or self.ctx.cfg.auth.allow_plaintext)

    def connection_lost(self, error) -> None:
        self.ctx.release(self, self._peer_ip)
        if self.envelope is not None:
            self.ctx.throttle.release(self.envelope)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        refusal = self.ctx.admit(self, self._peer_ip)
        metrics.smtp_session("admitted" if refusal is None else
                             "shutting_down" if refusal == R.SHUTTING_DOWN else "too_many_connections")
        if refusal is not None:
            self.close_now(refusal)
            return
        await super()._handle_client()

    async def reply_pipelined(self, status: str) -> None:
        """Reply, but hold it back while the client's next complete command is already buffered:
        a pipelining client then gets the replies to its whole group in one segment (RFC 2920)."""
        self._held.append(status.encode() + b"\r\n")
        if b"\n" not in self._reader._buffer:
            await self._flush_held()

    async def push(self, status) -> None:
        if isinstance(status, str):
            status = _with_enhanced_code(status)
            if not status.isprintable():   # a reply echoing the client's control bytes (or a multi-line one)
                status = _CONTROL_CHARS.sub("?", status)
        if self._held:
            self._held.append(status.encode() if isinstance(status, str) else status)
            await self._flush_held(terminate=True)
        else:
            await super().push(status)

    async def _flush_held(self, terminate: bool = False) -> None:
        data = b"".join(self._held) + (b"\r\n" if terminate else b"")
        self._held.clear()
        self._writer.write(data)
        await self._writer.drain()

    def close_now(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._held) + reply.encode() + b"\r\n")
            self._held.clear()
            self.transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd calls this at every command and every chunk of data read, and re-armed a
        timer each time; here it notes the deadline, and one timer per connection, when it fires,
        either times the connection out or waits for the deadline as it is by then."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        if self._timeout_handle is None or deadline < self._timeout_handle.when():
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._check_idle)

    def _check_idle(self) -> None:
        if self.loop.time() >= self._idle_deadline:
            self._timeout_cb()
        else:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._check_idle)

    def _timeout_cb(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(R.TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()

    async def handle_exception(self, error: Exception) -> str:
        log.exception("%s: internal error", self._peer_ip)
        return R.INTERNAL_ERROR

    # ---- EHLO / STARTTLS / AUTH --------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str):
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [f"250-{self.hostname}", f"250-SIZE {self.ctx.cfg.smtp.max_message_size}", "250-8BITMIME",
                 "250-PIPELINING", "250-CHUNKING", "250-ENHANCEDSTATUSCODES"]
        if self.tls_context and not self._tls_protocol:
            lines.append("250-STARTTLS")
        if not self._auth_require_tls or self._tls_protocol:
            lines.append("250-AUTH PLAIN LOGIN")
        lines.append("250 HELP")
        await self.push("\r\n".join(lines))

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str):
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push(R.TLS_UNAVAILABLE)
            return
        if self._tls_protocol:
            await self.push(R.ALREADY_TLS)
            return
        self._reader._buffer.clear()  # RFC 3207: nothing sent before the handshake may count
        await self.push(R.READY_TLS)
        try:
            await self._writer.start_tls(self.tls_context)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self._peer_ip, exc)
            self.transport.close()
            return
        self.transport = self._writer.transport
        self._tls_protocol = True
        # RFC 3207 4.2: forget everything learnt before TLS, authentication included.
        peer = self.session.peer
        self.session = self._create_session()
        self.session.peer = peer
        self.session.ssl = self.transport.get_extra_info("ssl_object")
        self._set_rset_state()

    @syntax("AUTH <mechanism> [<initial response>]")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.session.authenticated:
            await self.push(R.AUTH_ALREADY)
            return
        if self.envelope.mail_from is not None:
            await self.push(R.BAD_SEQUENCE)
            return
        await super().smtp_AUTH(arg)
        if not self.session.authenticated and arg and arg.split()[0].upper() in ("PLAIN", "LOGIN"):
            self._auth_failures += 1
            if self._auth_failures >= _MAX_AUTH_FAILURES:
                self.close_now(R.TOO_MANY_AUTH_FAILURES)

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is None or not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:   # RFC 4616: a site may act only as itself
            await self.push(R.AUTH_FAILED)
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            try:
                login = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        site = await self.ctx.sites.authenticate(login.decode("utf-8", "replace"),
                                                 password.decode("utf-8", "replace"))
        if site is None:
            await asyncio.sleep(0.25 * (self._auth_failures + 1))
            log.info("%s: failed login as %r", self._peer_ip, printable(login))
            return AuthResult(success=False, handled=False, message=R.AUTH_FAILED)
        return AuthResult(success=True, auth_data=site, message=R.AUTH_OK)

    @property
    def _site(self) -> Site | None:
        return self.session.auth_data if self.session.authenticated else None

    def _gone(self, site: Site) -> bool:
        """The site was removed (or removed and made anew) since this session learnt of it."""
        current = self.ctx.sites.by_name(site.name)
        return current is None or current.id != site.id

    # ---- MAIL / RCPT -------------------------------------------------------------------------

    @syntax("MAIL FROM:<address>", extended=" [SIZE=<size>] [BODY=7BIT|8BITMIME]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        nested = R.NESTED_MAIL if self.envelope.mail_from is not None else None
        parsed = await self._path_or_reply(arg, "FROM:", nested)
        if parsed is None:
            return
        if self._site is not None and self._gone(self._site):   # `mailhub site remove` while logged in
            log.info("%s site=%s: MAIL refused: the site was removed", self._peer_ip, self._site.name)
            self.session.authenticated, self.session.auth_data = False, None
            await self.push(R.SITE_REMOVED)
            return
        address, params = parsed
        size = None
        for name, value in params.items():
            if name == "SIZE":
                if not value.isdigit():
                    await self.push(R.BAD_ARGUMENTS)
                    return
                size = int(value)
            elif name == "BODY":
                if value not in ("7BIT", "8BITMIME"):
                    await self.push(R.BAD_ARGUMENTS)
                    return
            elif name != "AUTH":  # RFC 4954 AUTH=<mailbox> is informational
                await self.push(R.UNKNOWN_PARAMETER)
                return
        if size is not None and size > self.ctx.cfg.smtp.max_message_size:
            await self._refuse("mail", R.MESSAGE_TOO_BIG, address)
            return
        refusal = sender_verdict(self._client(), address)
        if refusal:
            await self._refuse("mail", refusal, address)
            return
        self.envelope.mail_from = address
        self.envelope.declared_size = size
        await self.reply_pipelined(R.SENDER_OK)

    @syntax("RCPT TO:<address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        no_mail = R.NEED_MAIL if self.envelope.mail_from is None else None
        parsed = await self._path_or_reply(arg, "TO:", no_mail)
        if parsed is None:
            return
        address, params = parsed
        if params:
            await self.push(R.UNKNOWN_PARAMETER)
            return
        if not address:
            await self.push(R.BAD_ADDRESS)
            return
        if len(self.envelope.rcpt_tos) >= self.ctx.cfg.smtp.max_recipients:
            await self._refuse("rcpt", R.TOO_MANY_RECIPIENTS, self.envelope.mail_from, address)
            return
        if self.ctx.directory is not None and self.ctx.directory.is_directory_address(address):
            await self._directory_recipient(address)
            return
        refusal, site = recipient_verdict(self._client(), address, self.ctx.cfg.domain,
                                          self.ctx.sites.by_address, self.ctx.has_route)
        if refusal:
            log.info("%s: RCPT <%s> refused: %s", self._peer_ip, printable(address), refusal)
            await self._refuse("rcpt", refusal, self.envelope.mail_from, address)
            return
        tx = self.envelope
        if site is None:
            if all(r.lower() != address.lower() for r in tx.remote):
                tx.remote.append(address)
        elif all(d.site_id != site.id for d in tx.deliveries):
            verdict = self.ctx.throttle.at_rcpt(tx, self._site, site, tx.declared_size, time.monotonic(),
                                                time.time())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: RCPT <%s> %s", self._peer_ip, printable(address), verdict.log_text())
            if not verdict.ok:
                self._log_refusal(f"RCPT <{printable(address)}>", verdict)
                await self._refuse("rcpt", verdict.reply, tx.mail_from, address)
                return
            limits = self.ctx.throttle.limits(site)   # checked once more as the mail is committed
            tx.deliveries.append(Delivery(site.id, address, site.name, limits.mailbox_bytes, limits.mailbox_messages))
            tx.receivers.append(site)
            tx.verdicts[site.id] = verdict
        tx.rcpt_tos.append(address)
        await self.reply_pipelined(R.RECIPIENT_OK)

    def _log_refusal(self, what: str, verdict: Verdict) -> None:
        """Throttle refusals with the figures behind them; 4xx ones are counted as deferrals."""
        if verdict.reply[0] == "4":
            metrics.smtp_deferral(verdict.reason)
        log.info("%s site=%s: %s refused %s: %s", self._peer_ip, self._site.name if self._site else "-", what,
                 verdict.reply[:9], verdict.log_text())

    async def _directory_recipient(self, address: str) -> None:
        """directory@<local domain>: answered with the signed participant list, to sites only."""
        if self._site is None:
            await self._refuse("rcpt", R.DIRECTORY_SITES_ONLY, self.envelope.mail_from, address)
            return
        if not self.envelope.directory_request:   # one request per transaction, however many addresses
            wait = self.ctx.directory.take_request(self._site.id, time.monotonic())
            if wait > 0:
                await self._refuse("rcpt", R.directory_too_soon(wait), self.envelope.mail_from, address)
                return
        self.envelope.directory_request = True
        self.envelope.rcpt_tos.append(address)
        await self.reply_pipelined(R.RECIPIENT_OK)

    async def _refuse(self, command: str, reply: str, sender: str, rcpt: str | None = None) -> None:
        """A policy or limit refusal of MAIL FROM or RCPT TO: counted, tracked, answered."""
        metrics.smtp_refusal(command, reply)
        self._track_refusal(reply, sender, [rcpt])
        await self.push(reply)

    def _track_refusal(self, reply: str, sender: str, rcpts: list, message: IncomingMessage | None = None) -> None:
        """Queue a refused/deferred tracking event per recipient (never waits for the disk)."""
        site = self._site
        queue_id = message_id = set_id = size = None
        if message is not None:
            message.headers.close()
            queue_id = message.spool.queue_id if message.spool is not None else None
            message_id, set_id = message.headers.message_id, message.headers.set_id
            size = message.size
        now = time.time()
        for rcpt in rcpts:
            to_site = self.ctx.sites.by_address(rcpt) if rcpt else None
            self.ctx.storage.record_event(refusal_event(
                now, reply, site=site.name if site else None, sender=sender, rcpt=rcpt,
                to_site=to_site.name if to_site else None, peer=self._peer_ip,
                queue_id=queue_id, message_id=message_id, set_id=set_id, size=size))

    def _client(self) -> Client:
        return Client(site=self._site, from_peer_network=self._from_peer_network)

    async def _path_or_reply(self, arg: str | None, keyword: str, sequence_error: str | None):
        """The common start of MAIL and RCPT: (address, params), or None once a reply was sent."""
        if await self.check_helo_needed():
            return None
        if sequence_error is not None:
            await self.push(sequence_error)
            return None
        parsed = self._parse_path(arg, keyword)
        if isinstance(parsed, str):
            await self.push(parsed)
            return None
        return parsed

    def _parse_path(self, arg: str | None, keyword: str):
        """(address, {PARAM: value}) or a reply string for a syntax error."""
        if arg is None or not arg[:len(keyword)].upper() == keyword:
            return f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>"
        rest = arg[len(keyword):].strip()
        simple = _SIMPLE_PATH.match(rest)
        if simple:
            address, tail = simple.group(1), simple.group(2)
        elif rest.startswith("<>"):
            address, tail = "", rest[2:]
        else:
            address, tail = self._getaddr(rest)
            if address is None:
                return R.BAD_ADDRESS
        params = {}
        for word in (tail or "").split():
            name, _, value = word.partition("=")
            if not name.isalnum():
                return R.BAD_ARGUMENTS
            params[name.upper()] = value.upper() if name.upper() in ("SIZE", "BODY") else value
        return address, params

    # ---- DATA / BDAT -------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.envelope.bdat is not None or self.envelope.bdat_failed:
            await self.push(R.DATA_AFTER_BDAT)
            return
        if not self.envelope.has_recipients:
            await self.push(R.NEED_RCPT if self.envelope.mail_from is not None else R.NEED_MAIL)
            return
        self._in_data = True
        message = self._new_message()
        try:
            await self.push(R.START_DATA)
            decoder = DataDecoder()
            reader = self._reader
            pacer = self.envelope.pacer = Pacer(self.ctx.throttle, self.envelope.receivers)
            while not decoder.done:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                self._reset_timeout()
                message.write(decoder.feed(chunk))
                if message.backlogged:
                    await message.room()
                await pacer.after_read(len(chunk))
            if decoder.leftover:
                reader._buffer[0:0] = decoder.leftover  # pipelined commands after the data
            reply = await self._finish(message, decoder.dot_lines)
        except BaseException:
            message.discard()
            raise
        finally:
            self._in_data = False
        await self._reply_after_transaction(reply)

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str) -> None:
        words = (arg or "").split()
        tx = self.envelope
        if not words or not words[0].isdigit() or len(words) > 2 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            if words and words[0].isdigit():   # the size is known: its chunk is skipped, and a message
                self._in_data = True           # being received lost it, so its transaction fails
                try:
                    await self._read_chunk(int(words[0]), None, None, None)
                finally:
                    self._in_data = False
                if tx.bdat is not None:
                    tx.bdat.discard()
                    tx.bdat, tx.bdat_failed = None, True
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return  # without a valid size the chunk cannot be skipped; the client will resync or die
        size, last = int(words[0]), len(words) == 2
        usable = bool(self.session.host_name and tx.has_recipients and not tx.bdat_failed)
        if usable and tx.bdat is None:
            tx.bdat = self._new_message()
            tx.bdat_dots = DotLineScanner()
            tx.pacer = Pacer(self.ctx.throttle, tx.receivers)
        self._in_data = True
        try:
            await self._read_chunk(size, tx.bdat if usable else None, tx.bdat_dots, tx.pacer)
            if not usable:
                reply = self._bdat_refusal()
            elif tx.bdat.failed or last:
                reply = await self._finish(tx.bdat, tx.bdat_dots.found)
                tx.bdat, tx.bdat_failed = None, reply[0] != "2"
            else:
                reply = R.chunk_received(size)
        except BaseException:
            if tx.bdat is not None:
                tx.bdat.discard()
            raise
        finally:
            self._in_data = False
        await self._reply_after_transaction(reply, reset=last)

    def _bdat_refusal(self) -> str:
        tx = self.envelope
        if not self.session.host_name:
            return R.BAD_SEQUENCE
        if tx.bdat_failed:
            return R.NO_BDAT_TRANSACTION
        return R.NEED_RCPT if tx.mail_from is not None else R.NEED_MAIL

    async def _read_chunk(self, size: int, message: IncomingMessage | None, dots: DotLineScanner | None,
                          pacer: Pacer | None):
        reader = self._reader
        remaining = size
        while remaining:
            chunk = await reader.read(min(remaining, CHUNK))
            if not chunk:
                raise ConnectionResetError("connection closed during BDAT")
            self._reset_timeout()
            remaining -= len(chunk)
            if message is not None:
                message.write(chunk)
                dots.feed(chunk)
                if message.backlogged:
                    await message.room()
                await pacer.after_read(len(chunk))

    def _new_message(self) -> IncomingMessage:
        """A message to receive, stopped (and drained) at the size limit or the receivers' room,
        checked by the encryption policy as it streams when that applies."""
        tx = self.envelope
        max_size, reply = self.ctx.cfg.smtp.max_message_size, R.MESSAGE_TOO_BIG
        limit = self.ctx.throttle.stream_limit(tx, self._site, tx.receivers)
        if limit is not None and limit[0] < max_size:
            max_size, reply = limit
        tx.policy = self._encryption_policy()
        return IncomingMessage(self.ctx.storage, max_size, self._trace_header, reply,
                               [tx.policy] if tx.policy is not None else ())

    def _encryption_policy(self) -> EncryptionPolicy | None:
        """The policy for this transaction's recipient sites. Exempt: directory requests (no
        deliveries) and notifications with the null sender (DSNs); MDNs are recognised by the
        policy itself from their multipart/report type."""
        tx = self.envelope
        if self.ctx.keyring is None or not tx.deliveries or tx.mail_from == "":
            return None
        return policy_for(tx.receivers, self.ctx.keyring, self.ctx.cfg)

    def _trace_header(self, queue_id: str) -> bytes:
        protocol = "ESMTP" if self.session.extended_smtp else "SMTP"
        if self._tls_protocol:
            protocol += "S"
        if self.session.authenticated:
            protocol += "A"
        helo = printable(self.session.host_name or "unknown")[:255]
        rcpts = self.envelope.rcpt_tos
        for_clause = f"\r\n\tfor <{printable(rcpts[0])}>" if len(rcpts) == 1 else ""
        return (f"Received: from {helo} ([{self._peer_ip}])\r\n\tby {self.hostname} (DICOM Mail Hub)"
                f" with {protocol} id {queue_id}{for_clause};\r\n\t{_date_now()}\r\n"
                ).encode("utf-8", "replace")

    async def _finish(self, message: IncomingMessage, dot_lines: bool) -> str:
        tx = self.envelope
        site = self._site
        started = time.monotonic()
        message.end_of_data()
        if message.failed and message.too_big:
            reply = message.too_big_reply
        elif message.error is not None:
            reply = message.error.reply
        elif tx.policy is not None and tx.policy.reply is not None:
            message.discard()
            reply = tx.policy.reply
            metrics.encryption_refusal(tx.policy.reason)
            log.info("qid=%s site=%s refused by the encryption policy: %s", message.queue_id,
                     site.name if site else "-", reply)
        elif (sender_gone := site is not None and self._gone(site)) or any(self._gone(r) for r in tx.receivers):
            message.discard()   # a site was removed during the transaction: its rows cannot be written
            reply = R.SITE_REMOVED if sender_gone else R.RECIPIENT_SITE_REMOVED
            log.info("qid=%s site=%s refused: %s", message.queue_id, site.name if site else "-", reply)
        else:
            meta = message.meta(tx.mail_from, site, dot_lines, self._peer_ip)
            part = SetPart.from_headers(meta.set_id, meta.set_part, meta.set_total)
            throttle = self.ctx.throttle
            verdict = throttle.at_end_of_data(tx, site, [(r, tx.verdicts.get(r.id)) for r in tx.receivers],
                                              message.size, part, time.monotonic(), time.time(),
                                              stored=message.spool.size)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("qid=%s end of data: %s", message.queue_id, verdict.log_text())
            if not verdict.ok:
                self._log_refusal(f"qid={message.queue_id}", verdict)
                message.discard()
                reply = verdict.reply
            else:
                reply = await self._store(message, meta, part)
        elapsed = time.monotonic() - started
        if reply[0] != "2":
            self._track_refusal(reply, tx.mail_from, tx.rcpt_tos, message)
        metrics.smtp_transaction(reply, message.size, site.name if site else None,
                                 [d.site_name for d in tx.deliveries] if reply[0] == "2" else (), elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info("qid=%s site=%s from=<%s> rcpts=%s size=%d sha256=%s outcome=%r commit_ms=%.1f paced_s=%.1f",
                     message.queue_id, site.name if site else "-", printable(tx.mail_from),
                     ",".join(printable(r) for r in tx.rcpt_tos), message.size,
                     message.spool.sha256 if message.spool and reply[0] == "2" else "-", reply[:3],
                     elapsed * 1000, tx.pacer.waited if tx.pacer else 0.0)
        return reply

    async def _store(self, message: IncomingMessage, meta, part: SetPart) -> str:
        """Commit the message to its recipients' mailboxes and the outbound queue, and answer a
        directory request."""
        tx = self.envelope
        try:
            if tx.deliveries or tx.remote:
                # the sizes reserved at end of data end as the ledger counts the mail (or at RSET)
                await self.ctx.storage.commit(message.spool, meta, tx.deliveries, remote=tx.remote,
                                              on_committed=lambda: self.ctx.throttle.release(tx))
                self.ctx.throttle.admitted(self._site, tx.receivers, part, time.monotonic())
            else:
                message.discard()  # a request to the directory only: nothing to keep
            if tx.directory_request:
                directory_reply = await self._answer_directory_request(meta.message_id)
                if not (tx.deliveries or tx.remote):
                    return directory_reply
            return R.queued(message.queue_id)
        except StorageError as exc:
            return exc.reply

    async def _answer_directory_request(self, message_id: str | None) -> str:
        site = self._site
        address = self.envelope.mail_from or site.addresses[0]
        try:
            queue_id = await self.ctx.directory.reply(site, address, message_id)
        except DirectoryError as exc:
            log.error("directory reply to %s failed: %s", site.name, exc)
            return R.INTERNAL_ERROR
        log.info("directory sent to site=%s rcpt=<%s> qid=%s", site.name, printable(address), queue_id)
        return R.directory_queued(queue_id)

    async def _reply_after_transaction(self, reply: str, reset: bool = True) -> None:
        if reset:
            self._set_post_data_state()
        await self.reply_pipelined(reply)
        if reset and self.ctx.shutting_down:
            self.close_now(R.SHUTTING_DOWN)


_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _sanitized_log_if_enabled(func, msg, *args, **kwargs) -> None:
    """aiosmtpd logs every command line (debug and info) through this helper, which masks AUTH
    secrets with a regex before the logger looks at its level; ask the level first."""
    logger = getattr(func, "__self__", None)
    level = _LOG_LEVELS.get(getattr(func, "__name__", None))
    if logger is not None and level is not None and not logger.isEnabledFor(level):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


# aiosmtpd's own replies lack RFC 3463 codes; ENHANCEDSTATUSCODES promises them on every reply.
_DEFAULT_ENHANCED = {"221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "421": "4.3.0", "451": "4.3.0",
                     "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
                     "530": "5.7.0", "535": "5.7.8", "554": "5.0.0"}
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def _with_enhanced_code(status: str) -> str:
    code = status[:3]
    if code in _DEFAULT_ENHANCED and "\r\n" not in status and not _HAS_ENHANCED.match(status):
        return f"{code} {_DEFAULT_ENHANCED[code]} {status[4:]}".rstrip()
    return status


_CONTROL_CHARS = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")   # all but CR and LF
_date_cache = [0, ""]


def _date_now() -> str:
    """The RFC 5322 date of this second in UTC, "+0000" (formatted once per second)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = now, format_datetime(datetime.fromtimestamp(now, timezone.utc))
    return _date_cache[1]


__all__ = ["HubSMTP", "SmtpContext"]

# POP3 mailbox serving: the asyncio adapter around relay.pop3.protocol (the sans-I/O core, which
# holds all protocol logic and wording). Per connection it feeds received bytes to the core and does
# what the core's events ask: check logins through SiteCache (slowly on failure), lock the mailbox
# (one session per site), snapshot it at login, stream messages from their blob files (zero-copy
# sendfile when the bytes go out unchanged over plain TCP, else 1 MB chunks, dot-stuffed, under
# transport flow control), upgrade to TLS (STLS), delete at UPDATE and add what was downloaded to
# the site's totals (one storage transaction per session, with the deletions when there are any,
# carrying the tracking events: which mails were downloaded when, which were deleted).
# Must never: parse or word POP3 itself, hold more than a few MB per connection whatever the message
# size, delete anything outside UPDATE, serve one mailbox to two sessions at once, or let anything
# a client sends raise out of a session (I/O errors close the connection and are logged).
# The mailbox locks are relay/mailbox_locks.py's: in this process (one hub on SQLite), or across the
# nodes of a cluster through the cluster link (PostgreSQL).
import asyncio
import logging
import sqlite3
import ssl
import time
from collections.abc import Callable
from typing import cast

from quotas import Throttle
from relay import connection_limits, metrics
from relay.file_sender import ChecksumMismatch, FileSender, RunningCrc
from relay.framing import dot_stuff, message_terminator
from relay.logins import Logins
from relay.mailbox_locks import LocksUnavailable, MailboxLocks
from relay.mailbox_session import MailboxSessionIO, is_loopback
from relay.pop3.protocol import (
    CLOSED,
    NEED_DATA,
    AuthRequest,
    CheckMessage,
    CloseConnection,
    MaildropEntry,
    Pop3Connection,
    SendBytes,
    SendMessage,
    StartTls,
    State,
    TopFilter,
    Update,
    system_error,
)
from relay.sessions import KICK_REASON
from storage import SiteCache, Storage, StorageError
from storage.records import Downloads, MailboxEntry

log = logging.getLogger("mailhub.pop3")
CHUNK = 1024 * 1024
_HIGH_WATER, _LOW_WATER = 2 * CHUNK, CHUNK  # transport buffer while copying a message
_TLS_HANDSHAKE_TIMEOUT = 30.0


_REFUSALS = {
    "shutting_down": system_error("server shutting down"),
    connection_limits.TOTAL: system_error("too many connections, try again later"),
    connection_limits.PER_ADDRESS: system_error("too many connections from your address", code="IN-USE"),
    connection_limits.UNAUTHENTICATED: system_error("too many connections not logged in, try again later"),
    connection_limits.UNAUTHENTICATED_PER_ADDRESS: system_error(
        "too many connections not logged in from your address", code="IN-USE"
    ),
}


class Pop3Context:
    """What all POP3 connections share: config, storage, sites, TLS, sessions and mailbox locks."""

    def __init__(
        self,
        cfg,
        storage: Storage,
        sites: SiteCache,
        tls_context: ssl.SSLContext | None,
        throttle: Throttle,
        logins: Logins | None = None,
        locks: MailboxLocks | None = None,
    ):
        self.cfg = cfg
        self.storage = storage
        self.sites = sites
        self.logins = logins or Logins.from_config(cfg, sites)  # shared by all protocols (server.py)
        self.connection_counter = connection_limits.ConnectionCounter(connection_limits.limits_from(cfg.pop3))
        self.login_timeout = cfg.pop3.login_timeout
        self.ledger = throttle.ledger  # told of each poll and download (the drain-rate measurement)
        self.tls_context = tls_context
        self.sender = FileSender(cfg.pop3.max_connections)
        self.sessions: set[Pop3Session] = set()
        self.locks = locks if locks is not None else MailboxLocks()  # site id -> the session holding its mailbox
        self.shutting_down = False
        storage.add_listener(self)
        Pop3Connection(
            greeting_host=cfg.hostname,
            stls_available=False,  # fail at start, not per client
            plaintext_login_allowed=False,
        )

    def reconfigure(self, cfg) -> None:
        """A reloaded configuration: connection limits and the login timeout at once, the rest
        as sessions read it (idle timeouts of new sessions)."""
        self.cfg = cfg
        self.connection_counter.limits = connection_limits.limits_from(cfg.pop3)
        self.login_timeout = cfg.pop3.login_timeout

    def factory(self, implicit_tls: bool = False) -> Callable[[], "Pop3Session"]:
        return lambda: Pop3Session(self, implicit_tls)

    # storage listener (see Storage.add_listener): an entry removed while a session holds its
    # mailbox (an operator's deletion, expiry) stays in that session's maildrop until QUIT, as POP3
    # wants, but is no longer sent
    def committed(self, sender_site, receiver_site_ids, size, at) -> None:
        pass

    def fetched_committed(self, site_id, uid, sender_site, size) -> None:
        pass

    def removed(self, site_id, uid, sender_site, size, was_waiting) -> None:
        session = self.locks.holder(site_id)
        if session is not None:
            session.removed_elsewhere.add(uid)

    async def drain(self, timeout: float) -> None:
        """Shutdown: end every session (nothing is deleted without QUIT; a session already in UPDATE
        finishes it) and give their bookkeeping up to `timeout` seconds."""
        self.shutting_down = True
        for session in list(self.sessions):
            session.abort()
        tasks = [s.task for s in self.sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.sender.close()


class Pop3Session(MailboxSessionIO[Pop3Context, Pop3Connection]):
    protocol = "pop3"

    def __init__(self, ctx: Pop3Context, implicit_tls: bool):
        super().__init__(ctx, ctx.cfg.pop3.idle_timeout, implicit_tls)
        self._recorded = False  # downloads written with the UPDATE transaction
        self._deleted = 0
        self.removed_elsewhere: set[int] = set()  # UIDs of the maildrop removed meanwhile (Pop3Context.removed)

    # ---- transport callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        refusal = self._admit(transport)
        if refusal is not None:
            self._transport.write(_REFUSALS[refusal])
            self._transport.close()
            metrics.pop3_session("refused")
            return
        ctx.sessions.add(self)
        self.core = Pop3Connection(
            greeting_host=ctx.cfg.hostname,
            stls_available=ctx.tls_context is not None and not self.tls,
            plaintext_login_allowed=self.tls or is_loopback(self.peer) or ctx.cfg.auth.allow_plaintext,
        )
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _login_timeout_reply(self) -> bytes:
        return system_error(f"no login within {self.ctx.login_timeout:.0f} seconds, closing", code=None)

    def kick(self) -> None:
        """The operator ends this session (`mailhub sessions --kick`): nothing is deleted (no QUIT);
        an -ERR says why, unless a mail is being sent or deletions are being applied (then the
        session ends as UPDATE finishes)."""
        if self.core is None or self.core.state is State.UPDATE:
            return
        self._end_reason = self._end_reason or KICK_REASON
        log.info("peer=%s site=%s: %s", self.peer, self._site_name(), KICK_REASON, extra=self._kick_fields())
        if self.transport is not None and not self.transport.is_closing() and self.core.state is not State.SENDING:
            self.bytes_out += len(data := system_error(KICK_REASON))
            self.transport.write(data)
        self.abort()

    def abort(self) -> None:
        """Close now (shutdown), unless deletions are being applied."""
        if self.core is not None and self.core.state is State.UPDATE:
            return
        self._stop_send.set()
        if self.transport is not None:
            self.transport.close()

    # ---- the adapter loop (see relay/pop3/protocol.py) ---------------------------------------

    async def _run(self) -> None:
        core = self._core
        outcome = "closed"
        try:
            self._write(core.initial_bytes())
            while (event := core.next_event()) is not CLOSED:
                if event is NEED_DATA:
                    await self._wait_input()
                elif isinstance(event, SendBytes):
                    self._write(event.data)
                    await self._drain()
                elif isinstance(event, AuthRequest):
                    await self._login(event)
                elif isinstance(event, CheckMessage):
                    entry = _stored(event.entry)
                    if entry.uid in self.removed_elsewhere:
                        self._write(core.check_result("removed", gone=True))
                    else:
                        problem = await self._serving_problem(entry)
                        unreachable = problem is not None and not self.ctx.storage.layout.available()
                        self._write(core.check_result(problem, temporary=unreachable))
                    await self._drain()
                elif isinstance(event, SendMessage):
                    with self.ctx.storage.serving(_stored(event.entry).path):  # (kept in the node's cache)
                        await self._send_message(event)
                elif isinstance(event, Update):
                    await self._update(event)
                elif isinstance(event, StartTls):
                    await self._start_tls()
                elif isinstance(event, CloseConnection):
                    outcome = "quit" if self._recorded else "closed by server"
                    break
                else:
                    raise RuntimeError(f"unexpected event {event!r}")
        except TimeoutError:
            outcome = "idle timeout"
        except ConnectionError as exc:
            outcome = self._end_reason or f"connection lost ({type(exc).__name__}: {exc})"
        except OSError as exc:
            outcome = f"I/O error: {exc}"
            log.error("peer=%s site=%s: %s", self.peer, self._site_name(), exc)
            self._reply_system_error("I/O error")
        except (sqlite3.Error, StorageError) as exc:  # the index cannot be read now (PostgreSQL down, ...)
            outcome = f"index unavailable: {exc}"
            log.error("peer=%s site=%s: the mailbox index cannot be read: %s", self.peer, self._site_name(), exc)
            self._reply_system_error("mailbox index unavailable, try again later")
        except Exception:
            outcome = "internal error"
            log.exception("peer=%s site=%s: internal error", self.peer, self._site_name())
            self._reply_system_error("internal error")
        finally:
            await self._finish(self._end_reason or outcome)

    def _reply_system_error(self, reason: str) -> None:
        """Say why we close, unless that would land inside a message being sent."""
        if not self._lost and not self._transport.is_closing() and self._core.state is not State.SENDING:
            self._transport.write(system_error(reason))

    # ---- what the core's events ask for ----------------------------------------------------

    async def _login(self, event: AuthRequest) -> None:
        ctx = self.ctx
        outcome = await ctx.logins.login("pop3", self.peer, event.user, event.password)
        site = outcome.site
        if site is None:
            self._write(self._core.auth_result(False, temporary=outcome.temporary))
            return
        try:
            locked = await ctx.locks.acquire(site.id, self)
        except LocksUnavailable as exc:
            log.warning("peer=%s site=%s: mailbox lock unavailable: %s", self.peer, site.name, exc)
            self._write(self._core.auth_result(False, temporary="mailbox lock unavailable, try again later"))
            return
        if not locked:
            log.info("peer=%s site=%s: mailbox in use", self.peer, site.name)
            self._write(self._core.auth_result(True, in_use=True))
            return
        self.site = site
        self._logged_in()
        self.downloads = Downloads(polled_at=time.time(), protocol="pop3", peer=self.peer)
        ctx.ledger.note_poll(site.id, time.monotonic())
        entries = await ctx.storage.mailbox(site.id)
        maildrop = [MaildropEntry(str(e.uid), e.size, e.dot_lines, e) for e in entries]
        self._write(self._core.auth_result(True, maildrop=maildrop))

    async def _start_tls(self) -> None:
        tls_context = self.ctx.tls_context
        assert tls_context is not None  # STLS is offered only with a TLS context
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self._transport,
                self,
                tls_context,
                server_side=True,
                ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise ConnectionAbortedError(f"TLS handshake failed: {exc}") from None
        if transport is None:
            raise ConnectionAbortedError("connection closed during the TLS handshake")
        self.transport, self.tls, self._reading_paused = transport, True, False
        self._core.tls_started()

    async def _serving_problem(self, entry: MailboxEntry) -> str | None:
        """Why a mail must not be sent (damaged: storage.Storage.ready), logged; or None."""
        problem = await self.ctx.storage.ready(entry)
        if problem is not None:
            log.warning(
                "peer=%s site=%s: mail %s not served: damaged (%s)",
                self.peer,
                self._site_name(),
                entry.queue_id,
                problem,
            )
        return problem

    async def _send_message(self, event: SendMessage) -> None:
        entry = _stored(event.entry)
        site, downloads = self.site, self.downloads
        assert site is not None and downloads is not None  # messages are sent after login only
        started = time.monotonic()
        # RETR is checked as it goes (storage.verify_while_serving), TOP not
        crc32 = entry.crc32 if event.body_lines is None and self.ctx.cfg.storage.verify_while_serving else None
        try:
            if event.body_lines is None and not entry.dot_lines and FileSender.usable(self._transport):
                await self._flushed()
                ends_with_lf = await self.ctx.sender.send(
                    self._transport, entry.path, entry.offset, entry.size, self._stop_send, self.idle_timeout, crc32
                )
                sent = entry.size
                self._direct += 1
                self.bytes_out += sent
            else:
                sent, ends_with_lf = await self._copy(entry, event.body_lines, RunningCrc(crc32))
            self._checked += crc32 is not None
            self._write(message_terminator(ends_with_lf))
            await self._drain()
        except ChecksumMismatch as exc:
            self._stop_send.set()
            await self._damaged_while_sending(entry, str(exc))
        except BaseException:
            self._stop_send.set()  # a worker still sending stops within a fraction of a second
            raise
        downloads.bytes += sent
        downloads.send_seconds += time.monotonic() - started
        ledger = self.ctx.ledger
        ledger.note_download(site.id, sent, time.monotonic())
        if event.body_lines is None:
            downloads.messages += 1
            downloads.retrieved[entry.queue_id] = (time.time(), sent)
            if not entry.fetched:  # first download: no longer waiting (the index learns it at the end)
                entry.fetched = True
                downloads.fetched_uids.append(entry.uid)
                ledger.fetched(site.id, entry.uid, entry.sender_site, entry.size)
        metrics.pop3_message(site.name, sent, event.body_lines is None)
        self._core.message_sent()

    async def _damaged_while_sending(self, entry: MailboxEntry, reason: str) -> None:
        """The mail's bytes changed on disk, found after they were sent: the connection is reset
        without the end line, so the client cannot take the mail as whole; the mail is marked damaged
        (refused from now on, quarantine copy, log line, metric)."""
        self._end_reason = f"mail {entry.queue_id} found damaged while sending it"
        self._transport.abort()
        self.ctx.storage.mark_damaged_soon(entry.queue_id, reason, "serving")
        raise ConnectionAbortedError(self._end_reason)

    async def _copy(self, entry: MailboxEntry, body_lines: int | None, crc: RunningCrc) -> tuple[int, bool]:
        """Read, cut (TOP), dot-stuff and write the message in chunks; return (octets, ends with LF).
        The next chunk is read while the transport sends the previous ones (at most _HIGH_WATER).
        The chunks read go into `crc`, checked after the last one (ChecksumMismatch)."""
        top = TopFilter(body_lines) if body_lines is not None else None
        sent, at_line_start = 0, True
        self._transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        reading = self._read_ahead(entry, 0)
        try:
            while reading is not None:
                offset, chunk = await reading
                if not chunk:
                    raise OSError(f"{entry.path} ended at {offset} of {entry.size} bytes")
                offset += len(chunk)
                crc.add(chunk)
                if top is not None:
                    chunk = top.feed(chunk)
                reading = None if top is not None and top.done else self._read_ahead(entry, offset)
                sent += len(chunk)
                data, at_line_start = dot_stuff(chunk, at_line_start)  # a no-op unless a line starts with "."
                if data:
                    self._write(data)
                    await self._drain()
            crc.check()
        finally:
            if reading is not None:
                reading.cancel()
            if not self._transport.is_closing():
                self._transport.set_write_buffer_limits()
        return sent, at_line_start

    def _read_ahead(self, entry: MailboxEntry, offset: int) -> asyncio.Future[tuple[int, bytes]] | None:
        if offset >= entry.size:
            return None

        async def read() -> tuple[int, bytes]:
            return offset, await self.ctx.sender.read(
                entry.path, entry.offset + offset, min(CHUNK, entry.size - offset)
            )

        return asyncio.ensure_future(read())

    async def _update(self, event: Update) -> None:
        site = self.site
        assert site is not None  # UPDATE follows a login
        uids = [_stored(e).uid for e in event.deleted]
        if uids and not await self.ctx.locks.still_holds(site.id, self):
            # the mailbox lock went (the cluster link was lost, maybe unnoticed until now): another
            # session may hold the mailbox, so nothing is deleted; the client will poll again
            log.warning(
                "peer=%s site=%s: mailbox lock lost, %d deletion(s) not applied", self.peer, site.name, len(uids)
            )
            self._write(self._core.update_result(False))
            await self._drain()
            return
        try:
            await self.ctx.storage.delete(site.id, uids, self.downloads, site.name)
        except Exception:
            log.exception("site=%s: deleting %d message(s) failed", site.name, len(uids))
            ok = False
        else:
            ok, self._recorded, self._deleted = True, True, len(uids)
        self._write(self._core.update_result(ok))
        await self._drain()

    # ---- the end of a session ---------------------------------------------------------------

    async def _finish(self, outcome: str) -> None:
        self._stop_send.set()
        if not self._transport.is_closing():
            self._transport.close()
        ctx, site = self.ctx, self.site
        if site is not None:
            ctx.locks.release(site.id, self)
        try:
            if site is not None and self.downloads is not None and not self._recorded:  # both set at login
                await ctx.storage.record_downloads(site.id, self.downloads, site.name)
        except Exception as exc:  # e.g. the site was removed meanwhile
            log.warning("site=%s: download totals not recorded: %s", self._site_name(), exc)
        finally:
            ctx.sessions.discard(self)
        metrics.pop3_session(outcome)
        d = self.downloads
        log.info(
            "session peer=%s site=%s retrieved=%d bytes=%d send_s=%.3f direct=%d checked=%d deleted=%d"
            " session_s=%.1f outcome=%s",
            self.peer,
            self._site_name(),
            d.messages if d else 0,
            d.bytes if d else 0,
            d.send_seconds if d else 0.0,
            self._direct,
            self._checked,
            self._deleted,
            time.monotonic() - self._started,
            outcome,
            extra=self._session_fields(d.messages if d else 0, d.bytes if d else 0, self._deleted, outcome),
        )


def _stored(entry: MaildropEntry) -> MailboxEntry:
    """The stored mail a maildrop entry stands for (its ref, set by Pop3Session._login)."""
    return cast(MailboxEntry, entry.ref)


__all__ = ["Pop3Context", "Pop3Session"]

# IMAP mailbox serving: the asyncio adapter around relay.imap.protocol (the sans-I/O core, which holds
# all protocol logic and wording). Per connection it feeds received bytes to the core and does what
# the core's events ask: check logins through SiteCache (slowly on failure), read the site's mailbox
# from the index, load MIME structures (recorded at ingest) and header blocks, store flags, expunge
# (refused while a POP3 session holds the mailbox), stream body literals from the blob files
# (zero-copy sendfile over plain TCP, 1 MB chunks under flow control over TLS), upgrade to TLS
# (STARTTLS), wake idling sessions when their mailbox changes, and add what was downloaded to the
# site's totals once per session (the same totals as POP3, which feed the drain measurement).
# Must never: parse or word IMAP itself, hold more than a few MB per connection whatever the message
# size, or let anything a client sends raise out of a session (I/O errors close the connection and
# are logged). Change notices come from storage's listeners, so they cover this process only.
import asyncio
import logging
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from quotas import Throttle
from relay import connection_limits, metrics
from relay.file_sender import ChecksumMismatch, FileSender, RunningCrc
from relay.imap.fetch import SEEN
from relay.imap.limits import MAX_HEADER, SEARCH_THREADS, SLICE_SECONDS
from relay.imap.protocol import (
    CLOSED,
    NEED_DATA,
    YIELD,
    AuthRequest,
    CloseConnection,
    ExpungeRequest,
    ImapConnection,
    LoadRequest,
    MailboxRequest,
    Message,
    PartHeaderRequest,
    ScanRequest,
    SendBytes,
    SendFile,
    Snapshot,
    StartTls,
    StoreFlags,
    TemporaryFailure,
    bye,
)
from relay.imap.scan import scan_messages
from relay.logins import Logins
from relay.mailbox_locks import MailboxLocks
from relay.mailbox_session import MailboxSessionIO, is_loopback
from relay.mime import structure as mime_structure
from relay.mime.stream import MimeStreamParser
from relay.sessions import KICK_REASON
from storage import SiteCache, Storage, StorageError
from storage.records import Downloads, MailboxEntry
from storage.sites import Site

log = logging.getLogger("mailhub.imap")
CHUNK = 1024 * 1024
_HIGH_WATER, _LOW_WATER = 2 * CHUNK, CHUNK
_HEADER_READ = 64 * 1024
_TLS_HANDSHAKE_TIMEOUT = 30.0
_RECORD_RETRY_SECONDS = 10.0  # pause after a failed recording of a session's downloads


_REFUSALS = {
    "shutting_down": bye("server shutting down"),
    connection_limits.TOTAL: bye("[UNAVAILABLE] Too many connections, try again later"),
    connection_limits.PER_ADDRESS: bye("[UNAVAILABLE] Too many connections from your address"),
    connection_limits.UNAUTHENTICATED: bye("[UNAVAILABLE] Too many connections not logged in, try again later"),
    connection_limits.UNAUTHENTICATED_PER_ADDRESS: bye(
        "[UNAVAILABLE] Too many connections not logged in from your address"
    ),
}


class ImapContext:
    """What all IMAP connections share: config, storage, sites, TLS, sessions, who watches which
    mailbox, the POP3 side's mailbox locks (an expunge waits until POP3 lets go), and the throttle's
    ledger (told of each poll and download: the drain-rate measurement, as for POP3). It is one of
    storage's listeners: every committed delivery or removal wakes the sessions of that site."""

    def __init__(
        self,
        cfg,
        storage: Storage,
        sites: SiteCache,
        tls_context: ssl.SSLContext | None,
        throttle: Throttle,
        pop3_locks: MailboxLocks,
        logins: Logins | None = None,
    ):
        self.cfg = cfg
        self.storage = storage
        self.sites = sites
        self.logins = logins or Logins.from_config(cfg, sites)  # shared by all protocols (server.py)
        self.connection_counter = connection_limits.ConnectionCounter(connection_limits.limits_from(cfg.imap))
        self.login_timeout = cfg.imap.login_timeout
        self.ledger = throttle.ledger
        self.tls_context = tls_context
        self.pop3_locks = pop3_locks
        self.sender = FileSender(cfg.imap.max_connections)
        self.searcher = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="mailhub-imap-search")
        self.sessions: set[ImapSession] = set()
        self.by_site: dict[int, set[ImapSession]] = {}  # logged-in sessions per site id
        self.shutting_down = False
        storage.add_listener(self)

    def reconfigure(self, cfg) -> None:
        """A reloaded configuration: connection limits and the login timeout at once, the rest
        as sessions read it (idle timeouts of new sessions)."""
        self.cfg = cfg
        self.connection_counter.limits = connection_limits.limits_from(cfg.imap)
        self.login_timeout = cfg.imap.login_timeout

    def factory(self, implicit_tls: bool = False) -> Callable[[], "ImapSession"]:
        return lambda: ImapSession(self, implicit_tls)

    def mailboxes_changed(self, site_ids: Iterable[int]) -> None:
        for site_id in site_ids:
            for session in self.by_site.get(site_id, ()):
                session.mailbox_changed()

    def remote_flags_changed(self, site_ids: list[int]) -> None:
        """Another hub node stored flags in these mailboxes (storage/postgres/cluster.py)."""
        self.mailboxes_changed(site_ids)

    # storage listener (see Storage.add_listener)
    def committed(self, sender_site, receiver_site_ids, size, at) -> None:
        self.mailboxes_changed(receiver_site_ids)

    def fetched_committed(self, site_id, uid, sender_site, size) -> None:
        pass

    def removed(self, site_id, uid, sender_site, size, was_waiting) -> None:
        self.mailboxes_changed((site_id,))

    async def drain(self, timeout: float) -> None:
        """Shutdown: say BYE to every session and close it; give their bookkeeping `timeout` s."""
        self.shutting_down = True
        for session in list(self.sessions):
            session.abort("server shutting down")
        tasks = [s.task for s in self.sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.sender.close()
        self.searcher.shutdown(wait=False, cancel_futures=True)


class ImapSession(MailboxSessionIO[ImapContext, ImapConnection]):
    protocol = "imap"

    def __init__(self, ctx: ImapContext, implicit_tls: bool):
        super().__init__(ctx, ctx.cfg.imap.idle_timeout, implicit_tls)
        self._served = Downloads(polled_at=0.0)  # the whole session's, for its log line
        self._expunged = 0
        self._in_literal = False
        self._login_at = 0.0  # time.time() of the login (the site's last login, recorded with its downloads)
        self._record_again_at = 0.0  # after a failed recording of downloads: not before this (monotonic)

    # ---- transport callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        refusal = self._admit(transport)
        if refusal is not None:
            self._transport.write(_REFUSALS[refusal])
            self._transport.close()
            metrics.imap_session("refused")
            return
        ctx.sessions.add(self)
        self.core = ImapConnection(
            greeting_host=ctx.cfg.hostname,
            starttls_available=ctx.tls_context is not None and not self.tls,
            plaintext_login_allowed=self.tls or is_loopback(self.peer) or ctx.cfg.auth.allow_plaintext,
            renderers=mime_structure,
        )
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _login_timeout_reply(self) -> bytes:
        return bye(f"Autologout; no login within {self.ctx.login_timeout:.0f} seconds")

    @property
    def _site(self) -> Site:
        """`site`, which the login set before the core asks for anything of the mailbox."""
        assert self.site is not None
        return self.site

    def mailbox_changed(self) -> None:
        self._core.mailbox_changed()
        if self._core.idling:
            self._input.set()

    def kick(self) -> None:
        """The operator ends this session (`mailhub sessions --kick`): * BYE, then close."""
        self._end_reason = self._end_reason or KICK_REASON
        log.info("peer=%s site=%s: %s", self.peer, self._site_name(), KICK_REASON, extra=self._kick_fields())
        self.abort("Closed by the hub's operator")

    def abort(self, reason: str) -> None:
        self._stop_send.set()
        if self.transport is not None and not self.transport.is_closing():
            if not self._in_literal:
                self.transport.write(bye(reason))
            self.transport.close()

    # ---- the adapter loop (see relay/imap/protocol.py) ---------------------------------------

    async def _run(self) -> None:
        core = self._core
        outcome = "closed"
        loop = asyncio.get_running_loop()
        try:
            self._write(core.initial_bytes())
            slice_end = loop.time() + SLICE_SECONDS
            while (event := core.next_event()) is not CLOSED:
                if event is YIELD:  # a long command: let the other clients run now and then
                    if loop.time() >= slice_end:
                        await asyncio.sleep(0)
                        slice_end = loop.time() + SLICE_SECONDS
                elif event is NEED_DATA:
                    if await self._record_fetched():
                        continue  # input may have come meanwhile: the core looks again first
                    await self._wait_input()
                    slice_end = loop.time() + SLICE_SECONDS
                elif isinstance(event, SendBytes):
                    self._write(event.data)
                    await self._drain()
                elif isinstance(event, SendFile):
                    with self.ctx.storage.serving(_stored(event.ref).path):  # (kept in the node's cache)
                        await self._send_file(event)
                elif isinstance(event, AuthRequest):
                    core.resume(await self._login(event))
                elif isinstance(event, MailboxRequest):
                    core.resume(await self._snapshot())
                elif isinstance(event, LoadRequest):
                    await self._load(event)
                    core.resume(None)
                elif isinstance(event, PartHeaderRequest):
                    core.resume(await self._part_header(event))
                elif isinstance(event, ScanRequest):
                    core.resume(await self._scan(event))
                elif isinstance(event, StoreFlags):
                    core.resume(await self._store_flags(event))
                elif isinstance(event, ExpungeRequest):
                    core.resume(await self._expunge(event))
                elif isinstance(event, StartTls):
                    await self._start_tls()
                    core.resume(None)
                elif isinstance(event, CloseConnection):
                    outcome = "logout"
                    break
                else:
                    raise RuntimeError(f"unexpected event {event!r}")
        except TimeoutError:
            outcome = "idle timeout"
            self._say_bye("autologout; idle for too long")
        except ConnectionError as exc:
            outcome = self._end_reason or f"connection lost ({type(exc).__name__}: {exc})"
        except OSError as exc:
            outcome = f"I/O error: {exc}"
            log.error("peer=%s site=%s: %s", self.peer, self._site_name(), exc)
            self._say_bye("I/O error")
        except (sqlite3.Error, StorageError) as exc:  # the index cannot be read now (PostgreSQL down, ...)
            outcome = f"index unavailable: {exc}"
            log.error("peer=%s site=%s: the mailbox index cannot be read: %s", self.peer, self._site_name(), exc)
            self._say_bye("mailbox index unavailable, try again later")
        except Exception:
            outcome = "internal error"
            log.exception("peer=%s site=%s: internal error", self.peer, self._site_name())
            self._say_bye("internal error")
        finally:
            await self._finish(self._end_reason or outcome)

    def _say_bye(self, reason: str) -> None:
        if not self._lost and not self._transport.is_closing() and not self._in_literal:
            self._transport.write(bye(reason))

    # ---- what the core's events ask for ----------------------------------------------------

    async def _login(self, event: AuthRequest) -> Site | TemporaryFailure | None:
        outcome = await self.ctx.logins.login("imap", self.peer, event.user, event.password)
        site = outcome.site
        if site is None:
            return None if outcome.temporary is None else TemporaryFailure(outcome.temporary)
        self.site = site
        self._logged_in()
        self._login_at = time.time()
        self.downloads = Downloads(polled_at=self._login_at, protocol="imap", peer=self.peer)
        self.ctx.by_site.setdefault(site.id, set()).add(self)
        self.ctx.ledger.note_poll(site.id, time.monotonic())
        return site

    async def _snapshot(self) -> Snapshot | None:
        site = self.ctx.sites.by_name(self._site.name)
        if site is None or site.id != self._site.id:
            return None  # removed (or removed and added again) meanwhile
        storage = self.ctx.storage
        # UIDNEXT before the listing (two reads): a mail committed between them is then listed, and
        # UIDNEXT raised past it; read after, it counted a mail the listing lacks (the client was
        # told UIDNEXT n+1 and saw UID n appear later)
        uid_next = await storage.uid_next(site.id)
        entries = await storage.mailbox(site.id)
        messages = [Message(e.uid, e.size, e.flags, e.delivered_at, e) for e in entries]
        if messages:
            uid_next = max(uid_next, max(m.uid for m in messages) + 1)
        return Snapshot(int(site.created_at), uid_next, messages)

    async def _load(self, event: LoadRequest) -> None:
        for msg in event.messages:
            entry = _stored(msg.ref)
            if event.check:
                msg.damaged = await self.ctx.storage.ready(entry)
                if msg.damaged is not None and not self.ctx.storage.layout.available():
                    # the shared blob folder is away, the mail is not at fault: no "delete them"
                    self._end_reason = f"mail store unreachable: {msg.damaged}"
                    self.abort("[UNAVAILABLE] The mail store cannot be reached now; try again later")
                    raise ConnectionAbortedError(self._end_reason)
                if msg.damaged is not None:
                    log.warning(
                        "peer=%s site=%s: mail %s not served: damaged (%s)",
                        self.peer,
                        self._site_name(),
                        entry.queue_id,
                        msg.damaged,
                    )
                    continue
            if event.structure:
                structure = await self.ctx.storage.message_structure(entry.queue_id)
                if structure is None:  # stored before structures were recorded
                    structure = await self._record_structure(entry)
                msg.structure = mime_structure.capped(structure)  # also records made before the caps
            if event.header:
                msg.header = await self._read_header(entry)

    async def _part_header(self, event: PartHeaderRequest) -> bytes | None:
        structure = event.message.structure
        assert structure is not None  # loaded for the FETCH of a numbered part
        span = mime_structure.section_range(structure, event.part + ".HEADER")
        return None if span is None else await self._read_header(_stored(event.message.ref), *span)

    async def _scan(self, event: ScanRequest) -> bool:
        """The SEARCH probes of a batch of messages, read in the search pool (a few threads for the
        whole process) within the command's budget."""
        budget = event.budget
        if budget.deadline is None:
            budget.deadline = time.monotonic() + budget.seconds
        where = [(_stored(m.ref).path, _stored(m.ref).offset, m.size) for m in event.messages]
        for m in event.messages:  # blobs on object storage: each in the node's cache first
            await self.ctx.storage.cached(_stored(m.ref).path, m.size, _stored(m.ref).sha256)
        answers = await asyncio.get_running_loop().run_in_executor(
            self.ctx.searcher, scan_messages, where, event.probes, budget
        )
        if answers is None:
            return False
        for msg, found in zip(event.messages, answers):
            msg.probes = found
        return True

    async def _record_structure(self, entry: MailboxEntry) -> mime_structure.Record:
        """The MIME structure of a blob, streamed through the ingest's recorder (1 MB at a time)."""
        await self.ctx.storage.cached(entry.path, entry.size, entry.sha256)  # (blobs on object storage)
        recorder = mime_structure.StructureRecorder()
        parser = MimeStreamParser(recorder)
        for offset in range(0, entry.size, CHUNK):
            parser.feed(await self.ctx.sender.read(entry.path, entry.offset + offset, min(CHUNK, entry.size - offset)))
        parser.close()
        assert recorder.structure is not None  # the top-level part is always recorded
        return recorder.structure

    async def _read_header(self, entry: MailboxEntry, start: int = 0, end: int | None = None) -> bytes:
        """The header block from `start` up to and including the blank line (at most MAX_HEADER
        bytes, never beyond `end`)."""
        limit = min(entry.size if end is None else end, start + MAX_HEADER) - start
        await self.ctx.storage.cached(entry.path, entry.size, entry.sha256)  # (blobs on object storage)
        data = b""
        while len(data) < limit:
            chunk = await self.ctx.sender.read(
                entry.path, entry.offset + start + len(data), min(_HEADER_READ, limit - len(data))
            )
            if not chunk:
                break
            scan_from = max(0, len(data) - 3)
            data += chunk
            blank = data.find(b"\r\n\r\n", scan_from)
            if blank >= 0:
                return data[: blank + 4]
            if data.startswith(b"\r\n"):
                return b"\r\n"
        return data

    async def _store_flags(self, event: StoreFlags) -> bool:
        try:
            await self.ctx.storage.set_flags(self._site.id, event.uids, event.add, event.remove)
        except Exception:
            log.exception("site=%s: storing flags failed", self._site.name)
            return False
        self.ctx.mailboxes_changed((self._site.id,))  # the other sessions of the site show the flags
        return True

    async def _expunge(self, event: ExpungeRequest) -> str:
        site = self._site
        if await self.ctx.pop3_locks.in_use(site.id):
            return "in-use"
        try:  # what was downloaded so far is recorded with the deletion (long IDLE sessions)
            await self.ctx.storage.delete(site.id, event.uids, self.downloads, site.name)
        except Exception:
            log.exception("site=%s: expunging %d message(s) failed", site.name, len(event.uids))
            return "error"
        self._expunged += len(event.uids)
        self._next_downloads()
        return "ok"

    def _next_downloads(self) -> None:
        """A fresh Downloads after a part of the session was recorded: the same login (the site's
        last login stays the session's), no second session counted."""
        self.downloads = Downloads(polled_at=self._login_at, sessions=0, protocol="imap", peer=self.peer)

    async def _record_fetched(self) -> bool:
        """Between commands: mails fetched whole by the last one are recorded at once, with their
        site, so a mail fetched and kept stops counting as waiting while the session goes on (IDLE
        sessions last hours), as the quota ledger already counts it. True if it tried (and so
        awaited: the client may have sent more meanwhile)."""
        downloads = self.downloads
        if downloads is None or not (downloads.fetched_uids or downloads.retrieved):
            return False
        if time.monotonic() < self._record_again_at:
            return False
        try:
            await self.ctx.storage.record_downloads(self._site.id, downloads, self._site.name)
        except Exception as exc:  # tried again after a pause, at the latest at the end of the session
            log.warning("site=%s: downloads not recorded yet: %s", self._site_name(), exc)
            self._record_again_at = time.monotonic() + _RECORD_RETRY_SECONDS
            return True
        self._next_downloads()
        return True

    async def _start_tls(self) -> None:
        await self._drain()
        tls_context = self.ctx.tls_context
        assert tls_context is not None  # STARTTLS is offered only with a TLS context
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

    async def _send_file(self, event: SendFile) -> None:
        entry = _stored(event.ref)
        site, downloads = self._site, self.downloads
        assert downloads is not None  # set by the login, like the site
        started = time.monotonic()
        self._in_literal = True
        # a literal of the whole mail is checked as it goes; a part or a partial range is not
        whole = event.start == 0 and event.length == entry.size
        crc32 = entry.crc32 if whole and self.ctx.cfg.storage.verify_while_serving else None
        try:
            if FileSender.usable(self._transport):
                await self._flushed()
                await self.ctx.sender.send(
                    self._transport,
                    entry.path,
                    entry.offset + event.start,
                    event.length,
                    self._stop_send,
                    self.idle_timeout,
                    crc32,
                )
                self._direct += 1
                self.bytes_out += event.length
            else:
                await self._copy(entry, event.start, event.length, RunningCrc(crc32))
        except ChecksumMismatch as exc:
            self._stop_send.set()
            await self._damaged_while_sending(entry, str(exc), event.seen_now)
        except BaseException:
            self._stop_send.set()
            raise
        self._checked += crc32 is not None
        self._in_literal = False
        for totals in (downloads, self._served):
            totals.bytes += event.length
            totals.send_seconds += time.monotonic() - started
            totals.messages += event.whole
        self.ctx.ledger.note_download(site.id, event.length, time.monotonic())
        if event.whole:
            downloads.retrieved[entry.queue_id] = (time.time(), event.length)
        if event.whole and not entry.fetched:  # first download: no longer waiting (as POP3 RETR)
            entry.fetched = True
            downloads.fetched_uids.append(entry.uid)
            self.ctx.ledger.fetched(site.id, entry.uid, entry.sender_site, entry.size)
        metrics.imap_message(site.name, event.length, event.whole)

    async def _damaged_while_sending(self, entry: MailboxEntry, reason: str, seen_now: bool) -> None:
        """The mail's bytes changed on disk, found after the literal was sent: the connection is reset
        before the FETCH response ends, so the client cannot take the mail as whole; the \\Seen flag
        this FETCH set is taken back; the mail is marked damaged (refused from now on, quarantine
        copy, log line, metric)."""
        self._end_reason = f"mail {entry.queue_id} found damaged while sending it"
        self._transport.abort()
        self.ctx.storage.mark_damaged_soon(entry.queue_id, reason, "serving")
        if seen_now:
            try:
                await self.ctx.storage.set_flags(self._site.id, [entry.uid], 0, SEEN)
            except Exception as exc:
                log.warning(
                    "site=%s: \\Seen of damaged mail %s not taken back: %s", self._site_name(), entry.queue_id, exc
                )
            self.ctx.mailboxes_changed((self._site.id,))
        raise ConnectionAbortedError(self._end_reason)

    async def _copy(self, entry: MailboxEntry, start: int, length: int, crc: RunningCrc) -> None:
        """Read and write the range in 1 MB chunks, the next read overlapping the sending; the chunks
        go into `crc`, checked after the last one (ChecksumMismatch)."""
        end = start + length
        self._transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        reading = self._read_ahead(entry, start, end)
        try:
            while reading is not None:
                offset, chunk = await reading
                if not chunk:
                    raise OSError(f"{entry.path} ended at {offset} of {end} bytes")
                offset += len(chunk)
                crc.add(chunk)
                reading = self._read_ahead(entry, offset, end)
                self._write(chunk)
                await self._drain()
            crc.check()
        finally:
            if reading is not None:
                reading.cancel()
            if not self._transport.is_closing():
                self._transport.set_write_buffer_limits()

    def _read_ahead(self, entry: MailboxEntry, offset: int, end: int) -> asyncio.Future[tuple[int, bytes]] | None:
        if offset >= end:
            return None

        async def read() -> tuple[int, bytes]:
            return offset, await self.ctx.sender.read(entry.path, entry.offset + offset, min(CHUNK, end - offset))

        return asyncio.ensure_future(read())

    # ---- the end of a session ---------------------------------------------------------------

    async def _finish(self, outcome: str) -> None:
        self._stop_send.set()
        if not self._transport.is_closing():
            self._transport.close()
        ctx = self.ctx
        try:
            if self.downloads is not None and (self.downloads.sessions or self.downloads.bytes):
                await ctx.storage.record_downloads(self._site.id, self.downloads, self._site.name)
        except Exception as exc:
            log.warning("site=%s: download totals not recorded: %s", self._site_name(), exc)
        finally:
            ctx.sessions.discard(self)
            if self.site is not None:
                watching = ctx.by_site.get(self.site.id, set())
                watching.discard(self)
                if not watching:
                    ctx.by_site.pop(self.site.id, None)
        metrics.imap_session(outcome)
        d = self._served
        log.info(
            "session peer=%s site=%s fetched=%d bytes=%d send_s=%.3f direct=%d checked=%d expunged=%d"
            " session_s=%.1f outcome=%s",
            self.peer,
            self._site_name(),
            d.messages,
            d.bytes,
            d.send_seconds,
            self._direct,
            self._checked,
            self._expunged,
            time.monotonic() - self._started,
            outcome,
            extra=self._session_fields(d.messages, d.bytes, self._expunged, outcome),
        )


def _stored(ref: object) -> MailboxEntry:
    """The stored mail a core Message (or SendFile) stands for (its ref, set by ImapSession._snapshot)."""
    return cast(MailboxEntry, ref)


__all__ = ["ImapContext", "ImapSession"]

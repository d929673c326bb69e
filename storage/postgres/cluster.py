# A hub node's link to the other nodes of its cluster (issue 27: the nodes share nothing but the
# PostgreSQL index and the blob folder): ONE dedicated psycopg 3 connection per node, driven by one
# asyncio task (never blocks the event loop), that holds
# - the POP3 mailbox locks: session-level advisory locks (key space MAILBOX_SPACE, site id), so one
#   session at a time holds a mailbox across all nodes; PostgreSQL frees them when the node's
#   connection ends (the process died, the host is gone once TCP keepalive gives up);
# - the leader lock (LEADER_SPACE): the node holding it runs the cluster's periodic work (expiry,
#   scrub, directory updates, pruning) - `is_leader()`;
# - LISTEN mailhub_events: other nodes' mailbox changes and downloads (storage/cluster_events.py),
#   fed to this node's listeners (IMAP IDLE, the throttle's ledger) at once; its own are skipped;
#   this node's live downloads and logins go out the same way, and its throttle's reservations of
#   mails in flight (a snapshot of them as soon as they change, again every RESERVATIONS_AGAIN
#   seconds while there are any, so the others forget a dead node's within RESERVATIONS_KEPT);
# - LISTEN mailhub_ask: questions to every node (`mailhub sessions --all`, `--kick SITE`: ask_nodes),
#   answered on the asker's reply channel (any database user may ask: the index's users are trusted).
# When the connection is lost, every lock it held is lost with it: the link says so at once
# (`on_leader` False, then `on_locks_lost`), refuses new locks until it is back (ClusterUnavailable)
# and reconnects with a growing delay (0.5 s up to 30 s); then `on_missed` (catch up from the index).
# Docs: docs/cluster.md.
# Must never hold a lock it cannot vouch for (a lock is "held" only while the connection that took
# it is known alive), run a query of anyone else's on this connection, or let a bad payload or a
# listener's error stop the link.
import asyncio
import collections
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import psycopg

from ..cluster_events import (
    ASK_CHANNEL,
    CHANNEL,
    BadPayload,
    Changes,
    answer_payloads,
    decode,
    decode_answer,
    decode_question,
    payloads,
    question_payload,
    reservations_payload,
)
from ..errors import StorageError
from .from_sqlite import _one_line, redacted

log = logging.getLogger("mailhub.cluster")

# Two-key advisory locks (int4, int4): the first key names the use, apart from the one-key (bigint)
# lock of schema migrations (PostgreSQL keeps the two forms apart).
MAILBOX_SPACE: Final = 0x6D680001  # "mh" 1: POP3 mailbox locks, second key the site id
LEADER_SPACE: Final = 0x6D680002  # "mh" 2: the leader lock, second key 0
MAX_QUEUED_CHANGES: Final = 10_000  # rows received and not yet given to the listeners (beyond: dropped)
DOWNLOAD_FLUSH: Final = 0.5  # seconds between two NOTIFYs of this node's live downloads and polls
ANSWERS_PER_SECOND: Final = 5  # questions answered (any database user may ask: bounded)
# the catch-up after dropped rows reads the index (usage figures, every IMAP session's mailbox): at
# most once in this many seconds, however many floods (any database user may NOTIFY)
MISSED_EVERY: Final = 5.0
RESERVATIONS_AGAIN: Final = 1.0  # seconds between two snapshots of unchanged reservations in flight
RESERVATIONS_KEPT: Final = 5.0  # seconds another node's snapshot counts without news (then forgotten)


class ClusterUnavailable(StorageError):
    """The link to PostgreSQL is down: no lock can be taken until it is back."""


class ClusterLink:
    """The node's cluster link. `await start()` connects (StorageError if PostgreSQL cannot be
    reached), `await close()` lets everything go. Listeners (storage.store.MailboxListener, plus
    optionally `remote_downloaded(site, bytes)`, `remote_polled(site)`,
    `remote_reserved(node, rows, submitting, counted)`, `remote_committed(node, seq, rows)` and
    `remote_flags_changed([site, ...])`) hear of other nodes' changes."""

    def __init__(
        self,
        url: str,
        node: str,
        *,
        ping_interval: float = 10.0,
        leader_interval: float = 1.0,  # a free leader lock is taken within a second (a cheap query)
        op_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        connect_timeout: int = 10,
        want_leader: bool = True,
    ):
        self.url = url
        self.node = node
        self.ping_interval = ping_interval
        self.leader_interval = leader_interval
        self.op_timeout = op_timeout
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.want_leader = want_leader
        self.listeners: list[Any] = []
        self.on_locks_lost: Callable[[set[int]], None] | None = None  # the site ids whose locks went
        self.on_leader: Callable[[bool], None] | None = None
        # other nodes' changes may have been missed (the link was down, or rows were dropped): the
        # node reads what it keeps of them from the index again
        self.on_missed: Callable[[None], None] | None = None
        # what this node answers to a question of ASK_CHANNEL: question -> (argument or "") -> rows
        self.answers: dict[str, Callable[[str], list[dict[str, Any]]]] = {}
        self._replies: collections.deque[tuple[str, str]] = collections.deque()  # (channel, payload)
        self._answered: collections.deque[float] = collections.deque()  # monotonic times, last second
        self.held: set[int] = set()  # site ids whose mailbox lock this node holds
        self._locking: collections.Counter[int] = collections.Counter()  # try_locks queued, per site
        self.leader = False
        self.received = 0  # rows of other nodes' changes received
        self.dropped = 0  # rows dropped: too many waiting, or a bad payload
        self.reconnects = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._commands: collections.deque[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._changes: collections.deque[Changes] = collections.deque()
        self._queued_rows = 0
        self._outgoing = Changes(node)
        self._closing = False
        self._missed_soon = False
        self.missed_every = MISSED_EVERY
        self._missed_at = -MISSED_EVERY  # the last catch-up after dropped rows (monotonic)
        self._ready = asyncio.Event()
        # this node's reservations in flight (the throttle's ledger: rows, submitting), told to the
        # others as soon as note_reservations() says they changed
        self.reservations: Callable[[], tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]] | None = None
        # the last group commit of this node whose mails were counted (storage.Storage.counted_seq),
        # named in each snapshot: the others take a commit they heard out of an older snapshot
        self.counted: Callable[[], int | None] | None = None
        self._reservations_changed = True
        self._reservations_told: tuple[bool, float] = (False, 0.0)  # (any told, monotonic time)
        self.reservations_kept = RESERVATIONS_KEPT  # how long the others' count without news

    # ---- life -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._ready.is_set()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._pump(), name="mailhub-cluster-link")

    async def close(self) -> None:
        """Stop: the locks go with the connection (no unlock needed), listeners hear nothing more."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.held = set()  # let go with the connection, on purpose: nothing to tell
        await self._drop_connection()
        for _sql, _params, future in self._commands:
            if not future.done():
                future.set_exception(ClusterUnavailable("the cluster link is closed"))
        self._commands.clear()
        self._locking.clear()

    async def _connect(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name=f"{_APPLICATION}{self.node}"[:63],
                # a host or network gone silent is found in about 20 s (the OS default: 2 hours)
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=2,
            )
        except (psycopg.Error, ValueError, OSError) as exc:
            raise StorageError(
                f"cluster link: cannot connect to {redacted(self.url)}: {_one_line(exc, self.url)}"
            ) from None
        try:
            async with asyncio.timeout(self.op_timeout):
                await conn.execute(f"LISTEN {CHANNEL}")
                await conn.execute(f"LISTEN {ASK_CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        conn.add_notify_handler(self._on_notify)
        self._conn = conn
        self._ready.set()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._ready.clear()
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                pass
        self._set_leader(False)
        if self.held:
            lost, self.held = self.held, set()
            log.warning("cluster link lost: the mailbox locks of %d site(s) are gone", len(lost))
            self._call_back(self.on_locks_lost, lost)

    def _set_leader(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            log.info(
                "node %s %s the cluster's leader (periodic work)", self.node, "is now" if leader else "is no longer"
            )
            self._call_back(self.on_leader, leader)

    def _call_back(self, function: Callable[[Any], None] | None, argument: Any) -> None:
        if function is None:
            return
        try:
            function(argument)
        except Exception:
            log.exception("cluster link: a callback failed")

    # ---- the pump: the only user of the connection ------------------------------------------

    async def _pump(self) -> None:
        delay = self.backoff[0]
        while not self._closing:
            if self._conn is None:
                try:
                    await self._connect()
                except StorageError as exc:
                    log.warning("%s (again in %.1f s)", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
                    continue
                self.reconnects += 1
                self._reservations_changed = True  # told again: the others may have forgotten them
                delay = self.backoff[0]
                log.info("cluster link to %s back", redacted(self.url))
                self._call_back(self.on_missed, None)  # LISTEN is on again: what came meanwhile is read
            try:
                await self._serve(self._conn)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection failed (psycopg.OperationalError, a timeout, ...)
                log.warning("cluster link to %s lost: %s", redacted(self.url), _one_line(exc, self.url))
                self._fail_commands(exc)
                await self._drop_connection()
                await asyncio.sleep(delay)  # a server restarting is not asked again at once

    def _fail_commands(self, exc: BaseException) -> None:
        self._locking.clear()
        while self._commands:
            _sql, _params, future = self._commands.popleft()
            if not future.done():
                # (one line whatever the error: a TimeoutError's text is empty - "".splitlines()[0]
                # raised here and ended the link's task, the node kept its leadership and locks)
                future.set_exception(ClusterUnavailable(f"cluster link lost: {_one_line(exc, self.url)[:200]}"))

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        loop = asyncio.get_running_loop()
        pinged = leader_tried = flushed = time.monotonic()
        leader_tried -= self.leader_interval  # try at once
        while True:
            while self._commands:
                sql, params, future = self._commands[0]
                with self._deadline(conn):
                    cursor = await conn.execute(sql.encode(), params)
                    row = await cursor.fetchone()
                self._commands.popleft()
                self._settle(sql, params, future, row)
            if self._replies:
                with self._deadline(conn):
                    while self._replies:
                        channel, payload = self._replies.popleft()
                        await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
                continue
            now = time.monotonic()
            told, told_at = self._reservations_told
            if self.reservations is not None and (
                self._reservations_changed or (told and now - told_at >= RESERVATIONS_AGAIN)
            ):
                self._reservations_changed = False
                rows, submitting = self.reservations()
                counted = self.counted() if self.counted is not None else None  # (taken with them)
                if rows or submitting or told:  # (an empty snapshot once, after the last mail in flight)
                    payload = reservations_payload(self.node, rows, submitting, counted)
                    with self._deadline(conn):
                        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                self._reservations_told = (bool(rows or submitting), now)
                continue
            if self.want_leader and not self.leader and now - leader_tried >= self.leader_interval:
                leader_tried = now
                with self._deadline(conn):
                    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s, 0)", (LEADER_SPACE,))
                    row = await cursor.fetchone()
                self._set_leader(bool(row and row[0]))
                continue
            if len(self._outgoing) and now - flushed >= DOWNLOAD_FLUSH:
                flushed = now
                outgoing, self._outgoing = self._outgoing, Changes(self.node)
                with self._deadline(conn):
                    for payload in payloads(outgoing):
                        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                continue
            if now - pinged >= self.ping_interval:
                pinged = now
                with self._deadline(conn):
                    await conn.execute("SELECT 1")
                continue
            deadline = pinged + self.ping_interval
            if self.want_leader and not self.leader:
                deadline = min(deadline, leader_tried + self.leader_interval)
            if len(self._outgoing):
                deadline = min(deadline, flushed + DOWNLOAD_FLUSH)
            if told:
                deadline = min(deadline, told_at + RESERVATIONS_AGAIN)
            await self._idle(conn, loop, max(deadline - now, 0.0))

    @contextlib.contextmanager
    def _deadline(self, conn: psycopg.AsyncConnection[Any]) -> Iterator[None]:
        """Like asyncio.timeout(op_timeout), but what runs past it is ended by shutting the
        connection's socket: a cancelled query makes psycopg ask the server to cancel it first, up
        to 10 s more on a silent network (a partition), all the while the node vouching for locks
        the server may have freed. TimeoutError then."""
        expired = False

        def cut() -> None:
            nonlocal expired
            expired = True
            try:
                sock = socket.socket(fileno=conn.pgconn.socket)
            except (OSError, psycopg.Error):
                return  # closed already
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.detach()  # psycopg's file descriptor: shut, not closed under it

        handle = asyncio.get_running_loop().call_later(self.op_timeout, cut)
        try:
            yield
        except psycopg.Error:
            if expired:
                raise TimeoutError(f"no answer from PostgreSQL within {self.op_timeout:g} s") from None
            raise
        finally:
            handle.cancel()

    async def _idle(self, conn: psycopg.AsyncConnection[Any], loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Wait until the server sends something (a notification, or the end of the connection), a
        command comes, or `timeout` passes. Nothing else uses the connection meanwhile (only this
        task does), so watching its socket here is safe."""
        if self._commands or self._replies:
            return
        wake: asyncio.Future[None] = loop.create_future()
        self._wake = wake
        fd = conn.pgconn.socket
        readable = False

        def on_readable() -> None:
            nonlocal readable
            readable = True
            if not wake.done():
                wake.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            await asyncio.wait([wake], timeout=timeout)
        finally:
            loop.remove_reader(fd)
            self._wake = None
        if readable:
            pgconn = conn.pgconn
            pgconn.consume_input()  # raises when the connection ended
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the connection to the server was lost")
            while notify := pgconn.notifies():
                self._on_notify(psycopg.Notify(notify.relname.decode(), notify.extra.decode(), notify.be_pid))

    def _submit(
        self, sql: str, params: tuple[Any, ...], future: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[Any]:
        if self._conn is None or self._closing:
            raise ClusterUnavailable("the cluster link to PostgreSQL is down (reconnecting)")
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._commands.append((sql, params, future))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return future

    def _settle(self, sql: str, params: tuple[Any, ...], future: asyncio.Future[Any], row: Any) -> None:
        """A command's result; a lock taken for a caller that gave up meanwhile is let go."""
        value = row[0] if row else None
        if sql is _TRY_LOCK:
            site = params[1]
            self._locking[site] -= 1
            if self._locking[site] <= 0:
                del self._locking[site]
            if value:
                # session advisory locks are reentrant on one connection: a second grant of a lock
                # this node holds already is given back at once and refused (one holder per node;
                # a count of 2 left one unlock short, the mailbox locked for every other node)
                if future.done() or site in self.held:  # cancelled while waiting, or re-entered
                    self._commands.appendleft((_UNLOCK, params, _unawaited()))
                    if not future.done():
                        future.set_result(False)
                    return
                self.held.add(site)
        elif sql is _UNLOCK:
            self.held.discard(params[1])
        if not future.done():
            future.set_result(value)

    # ---- what the node asks -----------------------------------------------------------------

    async def try_lock(self, site_id: int) -> bool:
        """Take the site's mailbox lock for this node: False if another node holds it; raises
        ClusterUnavailable while the link is down."""
        # (the caller's in-process lock keeps one session per node; an unlock still queued runs first)
        future = self._submit(_TRY_LOCK, (MAILBOX_SPACE, site_id))
        self._locking[site_id] += 1
        return bool(await future)

    def unlock(self, site_id: int) -> None:
        """Let the site's mailbox lock go (at once when the link is up; gone anyway when it is not),
        also one still being taken (the unlock runs after it). Nothing for a lock never asked for
        (PostgreSQL would only warn)."""
        if site_id not in self.held and not self._locking[site_id]:
            return
        try:
            self._submit(_UNLOCK, (MAILBOX_SPACE, site_id), _unawaited())
        except ClusterUnavailable:
            self.held.discard(site_id)

    async def still_held(self, site_id: int) -> bool:
        """Whether this node's lock on the site's mailbox is held on the database NOW, asked on the
        connection that took it (a round trip; a POP3 QUIT asks before it deletes): False when the link
        went (and came back) meanwhile, ClusterUnavailable or TimeoutError when it cannot answer -
        a link gone silent (a partition) is found here before the ping would find it."""
        if site_id not in self.held:
            return False
        return bool(await self._submit(_MINE, (MAILBOX_SPACE, site_id)))

    async def locked_elsewhere(self, site_id: int) -> bool:
        """Whether a session of another node holds the site's mailbox (IMAP EXPUNGE waits then)."""
        if site_id in self.held:
            return False
        return bool(await self._submit(_HELD, (MAILBOX_SPACE, site_id)))

    def is_leader(self) -> bool:
        """Whether this node runs the cluster's periodic work now."""
        return self.leader and self.connected

    def note_download(self, site_id: int, size: int) -> None:
        """This node sent `size` bytes of a mail to the site (told to the others within DOWNLOAD_FLUSH)."""
        self._outgoing.downloaded.append((site_id, size))
        self._kick()

    def note_poll(self, site_id: int) -> None:
        self._outgoing.polled.append(site_id)
        self._kick()

    def note_reservations(self) -> None:
        """This node's reservations in flight changed: told to the others at once (the ledger calls
        this on every reserve and release)."""
        self._reservations_changed = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _kick(self) -> None:
        if len(self._outgoing) > MAX_QUEUED_CHANGES:  # link down for long: keep the newest
            self._outgoing = Changes(self.node, downloaded=self._outgoing.downloaded[-1000:])
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # ---- what the others tell -----------------------------------------------------------------

    def _on_notify(self, notify: psycopg.Notify) -> None:
        if notify.channel == ASK_CHANNEL:
            self._on_question(notify.payload)
            return
        if notify.channel != CHANNEL:
            return
        try:
            changes = decode(notify.payload)
        except BadPayload as exc:
            self.dropped += 1
            log.warning("cluster link: a payload on %s refused: %s", CHANNEL, exc)
            return
        if changes.node == self.node:
            return  # this node's listeners heard of it in the process
        rows = len(changes)
        self.received += rows
        if self._queued_rows + rows > MAX_QUEUED_CHANGES:
            self.dropped += rows
            log.warning("cluster link: %d change(s) from node %s dropped (too many waiting)", rows, changes.node)
            if not self._missed_soon:
                self._missed_soon = True
                wait = self._missed_at + self.missed_every - time.monotonic()
                asyncio.get_running_loop().call_later(max(wait, 0.0), self._missed)
            return
        self._changes.append(changes)
        self._queued_rows += rows
        if len(self._changes) == 1:
            asyncio.get_running_loop().call_soon(self._deliver)

    def _on_question(self, payload: str) -> None:
        try:
            question, reply, argument = decode_question(payload)
        except BadPayload as exc:
            log.warning("cluster link: a question on %s refused: %s", ASK_CHANNEL, exc)
            return
        answer = self.answers.get(question)
        now = time.monotonic()
        while self._answered and now - self._answered[0] > 1.0:
            self._answered.popleft()
        if answer is None or len(self._answered) >= ANSWERS_PER_SECOND:
            return
        self._answered.append(now)
        try:
            rows = answer(argument)
        except Exception:
            log.exception("cluster link: answering %r failed", question)
            return
        self._replies.extend((reply, text) for text in answer_payloads(self.node, rows))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _missed(self) -> None:
        self._missed_soon = False
        self._missed_at = time.monotonic()
        self._call_back(self.on_missed, None)

    def _deliver(self) -> None:
        """Feed the received changes to the listeners, as storage does for this node's own."""
        while self._changes:
            changes = self._changes.popleft()
            self._queued_rows -= len(changes)
            for listener in self.listeners:
                try:
                    for c in changes.committed:
                        listener.committed(*c)
                    for f in changes.fetched:
                        listener.fetched_committed(*f)
                    for r in changes.removed:
                        listener.removed(*r)
                    downloaded = getattr(listener, "remote_downloaded", None)
                    if downloaded is not None:
                        for site, size in changes.downloaded:
                            downloaded(site, size)
                    polled = getattr(listener, "remote_polled", None)
                    if polled is not None:
                        for site in changes.polled:
                            polled(site)
                    ended = getattr(listener, "remote_committed", None)
                    if ended is not None and changes.committed and changes.seq is not None:
                        ended(changes.node, changes.seq, changes.committed)  # (after all listeners counted them)
                    reserved = getattr(listener, "remote_reserved", None)
                    if reserved is not None and changes.reserved is not None:
                        reserved(changes.node, changes.reserved, changes.submitting, changes.seq)
                    flagged = getattr(listener, "remote_flags_changed", None)
                    if flagged is not None and changes.flagged:
                        flagged(changes.flagged)
                except Exception:
                    log.exception("cluster link: a listener failed on node %s's changes", changes.node)


def _unawaited() -> asyncio.Future[Any]:
    """The future of a command nobody waits for (an unlock): its failure is not worth a warning."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


_TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s, %s)"
_UNLOCK: Final = "SELECT pg_advisory_unlock(%s, %s)"
_MINE: Final = (  # held by this connection (a reconnected link holds none of the old one's locks)
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
    " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)
_HELD: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


def ask_nodes(
    url: str, question: str, timeout: float = 5.0, argument: str = ""
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Ask every node of the cluster (their links on the database at `url`) and gather the answers
    (`argument`: the site name of sessions.kick):
    ({node: rows}, [nodes with a link that did not answer within `timeout` seconds]). Synchronous
    (the command line). StorageError with one line when the database cannot be reached."""
    reply = f"mailhub_reply_{secrets.token_hex(8)}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"LISTEN {reply}".encode())
            expected = {
                name.removeprefix(_APPLICATION)
                for (name,) in conn.execute(
                    "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE %s",
                    (_APPLICATION + "%",),
                )
            }
            conn.execute("SELECT pg_notify(%s, %s)", (ASK_CHANNEL, question_payload(question, reply, argument)))
            parts: dict[str, dict[int, list[dict[str, Any]]]] = {}
            totals: dict[str, int] = {}
            deadline = time.monotonic() + timeout

            def complete(node: str) -> bool:
                return node in totals and len(parts.get(node, {})) == totals[node]

            def done() -> bool:  # every node seen in pg_stat_activity answered (a long name is cut there)
                return all(any(complete(n) and n.startswith(e) for n in totals) for e in expected)

            while not done() and (remaining := deadline - time.monotonic()) > 0:
                for notify in conn.notifies(timeout=remaining, stop_after=1):
                    try:
                        node, part, of, rows = decode_answer(notify.payload)
                    except BadPayload:
                        continue
                    totals[node] = of
                    parts.setdefault(node, {})[part] = rows
    except psycopg.Error as exc:
        raise StorageError(f"cannot ask the nodes at {redacted(url)}: {_one_line(exc, url)}") from None
    answers = {node: [row for k in sorted(got) for row in got[k]] for node, got in parts.items() if complete(node)}
    missing = sorted(e for e in expected if not any(n.startswith(e) for n in answers))
    return answers, missing


_APPLICATION: Final = "mailhub cluster link "

# The outbound scheduler (Postfix's qmgr in small): takes due rows of the durable outbound queue
# into a bounded active window (fresh mail first; deferred mail gets at most half the window),
# groups them per message and next hop, and delivers them over a limited number of connections
# per destination, each reused for a burst. Results are settled per recipient: 2xx removes the
# row, 5xx or expiry bounces (RFC 3464 notice to the sender's mailbox, never for a bounce), 4xx
# and connection failures defer with exponential backoff; a destination that cannot be reached is
# backed off as a whole. Rows are the truth: the queue is reloaded from the index on start and
# polled every second (so `mailhub queue retry` takes effect), and a row goes only after the next
# hop's 2xx or a stored bounce, so a crash repeats a delivery at worst.
# Several hub nodes on one index (issue 27): each claims the rows it takes for CLAIM_LEASE seconds
# (storage/outbound.py: FOR UPDATE SKIP LOCKED on PostgreSQL, in the transaction that reads them) and
# renews the claims of its rows in flight every RENEW_SECONDS; rows of a node that died are taken by
# another once the lease ran out (the mail may reach the next hop twice: at least once, as SMTP is).
# Leases are set and judged by the index's clock (PostgreSQL's), never by the nodes' own.
import asyncio
import collections
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field

from relay import metrics
from relay.file_sender import FileSender
from relay.outbound.bounce import MAX_HEADER, FailedRecipient, build_dsn, header_of, identifying_fields
from relay.outbound.client import HopConnection, HopError, OutgoingMessage
from relay.outbound.routes import Route, route_for
from storage import Delivery, MessageMeta, SiteCache, Storage, StorageError, events, outbound
from storage.outbound import Deferral, QueuedRecipient

log = logging.getLogger("mailhub.relay")
POLL_SECONDS = 1.0
LINGER_SECONDS = 2.0  # an idle connection waits this long for more mail before QUIT (bursts)
CLAIM_LEASE = 300.0  # seconds a node's claim on a row lasts unless renewed (its death frees them then)
RENEW_SECONDS = 60.0  # the claims of rows in flight are renewed this often


@dataclass
class Job:
    """One message's recipients for one destination."""

    route: Route
    rows: list[QueuedRecipient]

    def message(self) -> OutgoingMessage:
        first = self.rows[0]
        return OutgoingMessage(
            first.queue_id,
            first.mail_from,
            [r.rcpt for r in self.rows],
            first.blob,
            first.offset,
            first.size,
            first.dot_lines,
        )


@dataclass
class Destination:
    jobs: collections.deque = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when jobs are added
    connections: int = 0
    failures: int = 0  # connection failures in a row
    blocked_until: float = 0.0  # monotonic: a back-off is a duration, whatever the wall clock does


class OutboundQueue:
    def __init__(self, cfg, storage: Storage, sites: SiteCache, sender: FileSender, node: str = ""):
        self.cfg = cfg
        self.node = node  # claims rows under this name (several nodes on one index)
        self._renewed = time.monotonic()
        self.relay = cfg.relay
        self.storage = storage
        self.sites = sites
        self.sender = sender
        self.helo_name = cfg.relay.hostname or cfg.hostname
        self._busy: set[int] = set()  # rows in flight
        self._busy_deferred: set[int] = set()  # of which deferred before (at most half the window)
        self._destinations: dict[str, Destination] = collections.defaultdict(Destination)
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._retry_version: int | None = None  # of `mailhub queue retry`

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        log.info("outbound relay running (%d route(s))", len(self.relay.routes))
        try:
            while True:
                try:
                    await self._renew_claims()
                    await self._fill_window()
                except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
                    log.error("outbound scheduling failed (tried again): %s", exc)
                except Exception:
                    log.exception("outbound scheduling failed")
                try:
                    async with asyncio.timeout(POLL_SECONDS):  # not wait_for: see relay/lifecycle.py
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)

    # ---- taking due rows into the active window ----------------------------------------------

    async def _renew_claims(self) -> None:
        if time.monotonic() - self._renewed < RENEW_SECONDS:
            return
        self._renewed = time.monotonic()
        if self._busy:
            ids = sorted(self._busy)
            renewed = await self.storage.queue_op(
                outbound.renew, ids, self.node, time.time() + CLAIM_LEASE, CLAIM_LEASE
            )
            if renewed < len(ids):  # this node stalled past the lease: another may deliver them too
                log.warning("%d outbound row(s) in flight were claimed by another node meanwhile", len(ids) - renewed)

    async def _fill_window(self) -> None:
        free = self.relay.max_active - len(self._busy)
        if free <= 0:
            return
        now = time.time()
        busy = json.dumps(sorted(self._busy))
        deferred_room = max(1, self.relay.max_active // 2) - len(self._busy_deferred)
        retry_version, rows = await self.storage.queue_op(
            outbound.due_and_version,
            self.storage.blob_dir,
            now,
            busy,
            free,
            deferred_room,
            self.node,
            CLAIM_LEASE,
            True,  # leases by the index's clock (PostgreSQL's): the nodes' clocks may disagree
        )
        if retry_version != self._retry_version:
            if self._retry_version is not None:  # an operator asked for a retry: try every next hop again
                for dest in self._destinations.values():
                    dest.blocked_until, dest.failures = 0.0, 0
            self._retry_version = retry_version
        jobs: dict[tuple[str, str], Job] = {}
        unrouted: list[QueuedRecipient] = []
        blocked: list[tuple[QueuedRecipient, float]] = []
        for row in rows:
            route = route_for(self.relay.routes, row.rcpt)
            if route is None:
                unrouted.append(row)
                continue
            dest = self._destinations[route.destination]
            wait = dest.blocked_until - time.monotonic()
            if wait > 0:  # the queue row's next attempt is a wall-clock time (it outlives the process)
                blocked.append((row, now + wait))
                continue
            jobs.setdefault((route.destination, row.queue_id), Job(route, [])).rows.append(row)
        if unrouted or blocked:
            await self._postpone(unrouted, blocked, now)
        routes = {}
        for (destination, _), job in jobs.items():
            self._busy.update(r.id for r in job.rows)
            self._busy_deferred.update(r.id for r in job.rows if r.attempts)
            self._destinations[destination].jobs.append(job)
            self._destinations[destination].arrived.set()
            routes[destination] = job.route
        for destination, route in routes.items():
            self._start_connections(destination, route)

    async def _postpone(self, unrouted, blocked, now: float) -> None:
        """Rows that cannot be tried now: no route (the config changed since they were queued;
        returned to the sender once their lifetime is over) or a backed-off destination."""
        reason = "no route to the recipient's domain"
        expired = [r for r in unrouted if now - r.queued_at >= self.relay.max_lifetime]
        for row in expired:
            await self._notify(
                row, [FailedRecipient(row.rcpt, 451, f"4.4.7 delivery time expired; {reason}")], delayed=False
            )
            metrics.outbound_delivery("expired")
        deferrals = [
            Deferral(r.id, now + self._backoff(r.attempts + 1), r.attempts + 1, reason, r.warned)
            for r in unrouted
            if r not in expired
        ]
        deferrals += [
            Deferral(r.id, until, r.attempts, r.last_error or "destination backed off", r.warned)
            for r, until in blocked
        ]
        tracked = [
            _outcome_row(now, events.BOUNCED, r, None, f"4.4.7 delivery time expired; {reason}") for r in expired
        ]
        await self.storage.queue_op(outbound.settle, [r.id for r in expired], deferrals, now, tracked)

    def _start_connections(self, destination: str, route: Route) -> None:
        dest = self._destinations[destination]
        wanted = min(route.max_connections, len(dest.jobs)) - dest.connections
        for _ in range(max(0, wanted)):
            dest.connections += 1
            task = asyncio.create_task(self._connection(destination, route))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- one connection: a burst of messages -----------------------------------------------------

    async def _connection(self, destination: str, route: Route) -> None:
        dest = self._destinations[destination]
        hop = HopConnection(route, self.helo_name, self.sender, self.relay.connect_timeout, self.relay.command_timeout)
        try:
            try:
                await hop.open()
            except Exception as exc:  # HopError, or e.g. an unreadable ca_file: the route is unusable
                await self._destination_failed(destination, route, str(exc))
                return
            dest.failures = 0
            while hop.usable:
                if not dest.jobs:
                    dest.arrived.clear()
                    try:
                        async with asyncio.timeout(LINGER_SECONDS):
                            await dest.arrived.wait()
                    except TimeoutError:
                        break
                    if not await hop.alive():
                        break  # the next hop went away meanwhile: a new connection takes the mail
                    continue
                job = dest.jobs.popleft()
                message = job.message()
                try:
                    problem = await self.storage.cached(message.blob, message.size)  # (blobs on object storage)
                    if problem is not None:
                        raise OSError(problem)
                    with self.storage.serving(message.blob):  # (kept in the node's cache)
                        await hop.send(message)
                except Exception as exc:  # the connection broke, the blob could not be read, or a bug
                    if not isinstance(exc, (HopError, OSError)):
                        log.exception("qid=%s to %s: delivery failed", message.queue_id, destination)
                    log.info("qid=%s to %s: %s", message.queue_id, destination, exc)
                    hop.abort()
                    await self._settle(job, message, error=str(exc))
                    break
                await self._settle(job, message)
        except asyncio.CancelledError:
            hop.abort()
            raise
        except Exception:
            log.exception("outbound connection to %s failed", destination)
            hop.abort()
        finally:
            dest.connections -= 1
            if hop.usable:
                await hop.close()
        if dest.jobs and dest.connections == 0:
            self._start_connections(destination, route)

    async def _destination_failed(self, destination: str, route: Route, error: str) -> None:
        dest = self._destinations[destination]
        dest.failures += 1
        backoff = self._backoff(dest.failures)
        dest.blocked_until = time.monotonic() + backoff
        log.warning("next hop %s unusable (%s); backing off for %.0fs", destination, error, backoff)
        if dest.connections > 1:
            return  # another connection may still succeed with the waiting jobs
        jobs, dest.jobs = list(dest.jobs), collections.deque()
        for job in jobs:
            await self._settle(job, job.message(), error=error)

    def _backoff(self, attempts: int) -> float:
        return min(self.relay.min_backoff * 2 ** max(0, attempts - 1), self.relay.max_backoff)

    # ---- settling results ------------------------------------------------------------------

    async def _settle(self, job: Job, message: OutgoingMessage, error: str | None = None) -> None:
        """Remove delivered rows, bounce permanent failures and expired rows, defer the rest."""
        now = time.time()
        relay = self.relay
        done, bounced, deferrals, warn, tracked = [], [], [], [], []
        for row in job.rows:
            reply = message.results.get(row.rcpt)
            text = str(reply) if reply is not None else error or "no reply"
            if reply is not None and reply.ok:
                done.append(row.id)
                tracked.append((events.RELAYED, row, text))
                metrics.outbound_delivery("delivered")
                log.info(
                    "qid=%s rcpt=<%s> relay=%s delivered: %s",
                    row.queue_id,
                    row.rcpt,
                    job.route.destination,
                    text[:200],
                    extra=_relay_fields(row, "delivered", text),
                )
            elif reply is not None and reply.permanent:
                bounced.append((row, FailedRecipient(row.rcpt, reply.code, text, job.route.host)))
                tracked.append((events.BOUNCED, row, text))
                metrics.outbound_delivery("bounced")
            elif now - row.queued_at >= relay.max_lifetime:
                expiry = f"4.4.7 delivery time expired; last error: {text}"
                bounced.append((row, FailedRecipient(row.rcpt, 451, expiry, job.route.host if reply else "")))
                tracked.append((events.BOUNCED, row, expiry))
                metrics.outbound_delivery("expired")
            else:
                tracked.append((events.RELAY_DEFERRED, row, text))
                warned = row.warned
                if not warned and relay.delay_warning and now - row.queued_at >= relay.delay_warning:
                    warn.append(
                        (
                            row,
                            FailedRecipient(
                                row.rcpt, reply.code if reply else 451, text, job.route.host if reply else ""
                            ),
                        )
                    )
                    warned = True
                deferrals.append(
                    Deferral(row.id, now + self._backoff(row.attempts + 1), row.attempts + 1, text, warned)
                )
                metrics.outbound_delivery("deferred")
                log.info(
                    "qid=%s rcpt=<%s> relay=%s deferred: %s",
                    row.queue_id,
                    row.rcpt,
                    job.route.destination,
                    text[:200],
                    extra=_relay_fields(row, "deferred", text),
                )
        removed = done + [row.id for row, _ in bounced]
        try:
            if bounced:
                await self._notify(job.rows[0], [f for _, f in bounced], delayed=False)
            if warn:
                await self._notify(job.rows[0], [f for _, f in warn], delayed=True)
            rows = [_outcome_row(now, kind, row, job.route.hop, text) for kind, row, text in tracked]
            await self.storage.queue_op(outbound.settle, removed, deferrals, now, rows)
        finally:  # on failure (a full disk) the rows stay as they were and are tried again
            self._busy.difference_update(row.id for row in job.rows)
            self._busy_deferred.difference_update(row.id for row in job.rows)
        if removed:
            await self.storage.empty_trash()
        self.wake()

    async def _notify(self, row: QueuedRecipient, failures: list[FailedRecipient], delayed: bool) -> None:
        """Store a DSN in the sender's mailbox (stored before the rows change: a crash in between
        repeats the notice, never loses it). Never for a mail with the null sender."""
        for f in failures:
            log.info(
                "qid=%s rcpt=<%s> %s: %s",
                row.queue_id,
                f.rcpt,
                "delayed" if delayed else "bounced",
                f.diagnostic[:200],
                extra={**_relay_fields(row, "delayed" if delayed else "bounced", f.diagnostic), "recipients": [f.rcpt]},
            )
        if not row.mail_from:
            return
        site = self.sites.by_address(row.mail_from)
        if site is None:
            log.warning("qid=%s: no local mailbox for sender <%s>; notice dropped", row.queue_id, row.mail_from)
            return
        try:
            await self.storage.cached(row.blob, row.size)
            head = identifying_fields(
                header_of(await self.sender.read(row.blob, row.offset, min(MAX_HEADER, row.size)))
            )
        except OSError as exc:
            head = f"X-Mailhub-Note: original header unavailable ({exc.strerror})\r\n".encode()
        dsn = build_dsn(
            reporting_mta=self.helo_name,
            sender=row.mail_from,
            queue_id=row.queue_id,
            arrival=row.queued_at,
            failures=failures,
            delayed=delayed,
            original_header=head,
            retry_until=row.queued_at + self.relay.max_lifetime if delayed else None,
        )
        dot_lines = dsn.startswith(b".") or b"\n." in dsn
        qid = await self.storage.store_generated(
            dsn, MessageMeta("", None, dot_lines), [Delivery(site.id, row.mail_from, site.name)]
        )
        log.info(
            "qid=%s: %s notice %s stored for <%s>", row.queue_id, "delay" if delayed else "bounce", qid, row.mail_from
        )


def _relay_fields(row: QueuedRecipient, outcome: str, text: str) -> dict:
    """The JSON log fields of a relay outcome (mailhub/logsetup.py FIELDS)."""
    return {
        "event": "relay.delivery",
        "queue_id": row.queue_id,
        "sender": row.mail_from,
        "recipients": [row.rcpt],
        "size": row.size,
        "outcome": outcome,
        "reason": text[:200],
    }


def _outcome_row(now: float, kind: str, row: QueuedRecipient, hop: str | None, text: str) -> tuple:
    """The tracking event row of one relay outcome for a queued recipient (storage.events)."""
    return events.row(events.relay_outcome(now, kind, row.queue_id, row.rcpt, hop, row.size, text))


__all__ = ["OutboundQueue"]

# The mailbox lifecycle in the running hub (issue 25): every lifecycle.check_interval it expires
# mail not fetched within its site's retention (relay/expiry.py plans, storage.lifecycle removes
# and queues the notices in one transaction) and warns sites of mail about to expire; after every
# change to a mailbox it checks the quota warning levels (quotas/warnings.py) of that site; it
# sends the notices the index owes in order, each committed with the mark "sent up to here" (a
# restart neither loses nor repeats one; the commit claims the mark, so of two leaders for a moment
# one stores it); it links each receipt (MDN) that passed through to the
# mail and study it answers; and it keeps the study metrics. The clock is passed in (`clock`, Unix
# time) so that tests can move time.
# Must never put content of a mail into a notice (relay/notices.py builds them from IDs, sizes and
# dates), nor run SQL itself (storage.lifecycle), nor block the event loop (reads run on a thread
# of its own, writes in the index writer).
import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from quotas import Throttle, warnings
from relay import metrics, receipts
from relay.expiry import DAY, Plan, plan
from relay.notices import BUILDERS
from relay.outbound.routes import route_for
from storage import AlreadyMarked, Delivery, MessageMeta, Site, SiteCache, Storage, StorageError, lifecycle, sql

log = logging.getLogger("mailhub.lifecycle")
T = TypeVar("T")
STUDY_WINDOW_DAYS = 8  # studies accepted this recently count in the study metrics
_NOTICE_BATCH = 50
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)\r$", re.M)
EXPIRY_BATCH = 500  # mailbox entries removed per transaction (about)
_QUOTA_DELAY = 1.0  # seconds a mailbox change waits before its quota check (changes come in bursts)


class Lifecycle:
    def __init__(
        self,
        cfg: Any,
        storage: Storage,
        sites: SiteCache,
        throttle: Throttle,
        clock: Callable[[], float] = time.time,
        audit: Callable[..., Any] | None = None,
    ):
        self.cfg = cfg
        self.settings = cfg.lifecycle
        self.storage = storage
        self.sites = sites
        self.throttle = throttle
        self.clock = clock
        self.host = cfg.relay.hostname or cfg.hostname
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lifecycle-index")
        self._conn: sql.Connection | None = None  # used on _thread only
        self._levels: dict[int, set[int]] | None = None  # site id -> quota levels recorded
        self._dirty: set[int] = set()  # sites whose quota fill may have changed
        self._wake = asyncio.Event()
        self._round = asyncio.Lock()  # one expiry round at a time (the loop, `mailbox expire`)
        self._sending = asyncio.Lock()
        self._quotas = asyncio.Lock()  # one quota check at a time: a level is recorded before the next looks
        self._tasks: set[asyncio.Task[None]] = set()
        # several nodes on one index: only the cluster's leader expires, warns and sends notices
        self.is_leader: Callable[[], bool] = lambda: True
        storage.add_listener(self)

    def reconfigure(self, cfg: Any) -> None:
        """A reloaded configuration ([lifecycle] is live): used from the next check on."""
        self.cfg, self.settings = cfg, cfg.lifecycle
        self._dirty.update(s.id for s in self.sites.all_sites())  # the levels may have changed
        self._wake.set()

    # ---- storage listener: which sites to check for quota levels -----------------------------

    def committed(self, sender_site: int | None, receiver_site_ids: list[int], size: int, at: float) -> None:
        self._dirty.update(receiver_site_ids)
        self._wake.set()

    def fetched_committed(self, site_id: int, uid: int, sender_site: int | None, size: int) -> None:
        pass

    def removed(self, site_id: int, uid: int, sender_site: int | None, size: int, was_waiting: bool) -> None:
        self._dirty.add(site_id)
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:  # receipts being linked: their mails are stored; only the link is not written
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        next_round = 0.0  # monotonic
        loop = asyncio.get_running_loop()
        while True:
            # cleared before the round, not after it: a mailbox changed while the round awaits the
            # index (after check_quotas took the dirty sites) wakes the next round; cleared after
            # it, that change waited for the next check_interval
            self._wake.clear()
            try:
                leader = self.is_leader()
                if loop.time() >= next_round:
                    next_round = loop.time() + self.settings.check_interval
                    if leader:
                        await self.expire_now()
                    await self.update_study_metrics()
                if leader:
                    await self.check_quotas()
                    await self.send_notices()
            except (StorageError, sqlite3.Error) as exc:  # a full disk, the index unreachable: one line
                log.warning("lifecycle round skipped: %s", exc)
            except Exception:
                log.exception("lifecycle round failed")
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
                # comes as the event is set, and this loop would never end (a hub that never stops)
                async with asyncio.timeout(max(0.0, next_round - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(_QUOTA_DELAY)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._thread.submit(self._close_connection)  # after whatever read is still running there
        self._thread.shutdown(wait=False)  # never holds up the event loop of a stopping hub

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _read(self, function: Callable[..., T], *args: object) -> T:
        """function(conn, *args) on the lifecycle's own read connection, on its thread."""

        def call() -> T:
            if self._conn is None:
                self._conn = self.storage.index.connect_readonly(any_thread=True)
            try:
                return function(self._conn, *args)
            except sqlite3.Error:
                self._close_connection()  # the next read connects again (a PostgreSQL server restarted, ...)
                raise

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    # ---- expiry --------------------------------------------------------------------------------

    async def plan_now(self) -> Plan:
        now, warn_before = self.clock(), self.settings.warn_before_days * DAY
        entries = await self._read(lifecycle.waiting_entries, self.settings.retention_days, now, warn_before)
        return plan(entries, now, warn_before)

    async def expire_now(self, dry_run: bool = False) -> dict[str, Any]:
        """One expiry round at the clock's time (or what it would do): warnings, expiry, notices."""
        async with self._round:
            now = self.clock()
            todo = await self.plan_now()
            report = plan_report(todo, now)
            if dry_run:
                return report
            if todo.warn:
                report["warnings_queued"] = await self.storage.queue_op(lifecycle.warn, now, todo.warn)
            report["removed"] = report["notices_queued"] = 0
            for batch in _batches(todo.expire):  # the index writer is not held up by a long transaction
                summary = await self.storage.remove_with(lifecycle.expire, now, batch)
                report["removed"] += summary["mails"]
                report["notices_queued"] += summary["notices"]
                for site, queue_id, size, sha256, _, set_id in summary["expired"]:
                    metrics.expired(site, size)
                    log.info(
                        "qid=%s site=%s expired unfetched (size=%d sha256=%s set=%s)",
                        queue_id,
                        site,
                        size,
                        sha256,
                        set_id or "-",
                    )
        await self.send_notices()
        return report

    # ---- quota warnings --------------------------------------------------------------------------

    async def check_quotas(self) -> None:
        """Check the quota warning levels of the sites whose mailboxes changed (all, the first time)."""
        async with self._quotas:
            await self._check_quotas()

    async def _check_quotas(self) -> None:
        levels = self.settings.quota_warning_levels
        if self._levels is None:
            self._levels = await self._read(lifecycle.quota_levels)
            self._dirty.update(s.id for s in self.sites.all_sites())
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        by_id = {s.id: s for s in self.sites.all_sites()}
        for site_id in sorted(dirty):
            site = by_id.get(site_id)
            if site is None:
                continue
            limits = self.throttle.limits(site)
            held_bytes, held_messages = self.throttle.ledger.held(site.id)
            percent = warnings.fill_percent(held_bytes, held_messages, limits.mailbox_bytes, limits.mailbox_messages)
            recorded = self._levels.get(site.id, set())
            change = warnings.check(levels, recorded, percent)
            if change is None:
                continue
            notices = []
            if change.crossed:
                level = max(change.crossed)
                facts = {
                    "site": site.name,
                    "level": level,
                    "percent": change.percent,
                    "bytes": held_bytes,
                    "bytes_limit": limits.mailbox_bytes,
                    "messages": held_messages,
                    "messages_limit": limits.mailbox_messages,
                }
                if site.addresses:
                    notices.append((lifecycle.QUOTA_WARNING, site.addresses[0], facts))
                notices.append((lifecycle.QUOTA_OPERATOR, lifecycle.OPERATOR, facts))
                metrics.quota_warning(level)
                log.warning(
                    "site=%s mailbox %.0f%% full: quota warning level %d%% crossed", site.name, change.percent, level
                )
            await self.storage.queue_op(
                lifecycle.quota_crossed, self.clock(), site.id, list(change.crossed), list(change.left), notices
            )
            self._levels[site.id] = (recorded | set(change.crossed)) - set(change.left)

    # ---- notices -------------------------------------------------------------------------------

    async def send_notices(self) -> int:
        """Send the notices the index owes, in order; the number sent."""
        sent = 0
        async with self._sending:
            while notices := await self._read(lifecycle.pending_notices, _NOTICE_BATCH):
                for notice in notices:
                    sent += await self._send(notice)
            if sent:
                await self.storage.queue_op(lifecycle.prune_notices)
        return sent

    async def _send(self, notice: lifecycle.Notice) -> int:
        rcpt = notice.rcpt or self.settings.operator_address
        site = self.sites.by_address(rcpt) if rcpt else None
        relay = self.cfg.relay
        remote = [rcpt] if site is None and rcpt and relay.enabled and route_for(relay.routes, rcpt) else []
        if site is None and not remote:
            why = "no lifecycle.operator_address" if not rcpt else f"no mailbox or route for <{rcpt}>"
            log.warning("%s notice %d not sent (%s): %s", notice.kind, notice.id, why, _summary(notice))
            await self.storage.queue_op(lifecycle.notice_done, notice.id)
            metrics.lifecycle_notice(notice.kind, "undeliverable")
            return 0
        data = BUILDERS[notice.kind](notice.facts, rcpt, self.host, self.clock())
        found = _MESSAGE_ID.search(data)  # for the tracking record and the audit trail (accepted)
        meta = MessageMeta(
            "", None, data.startswith(b".") or b"\n." in data, found.group(1).decode() if found else None
        )
        deliveries = [Delivery(site.id, rcpt, site.name)] if site is not None else []
        try:
            queue_id = await self.storage.store_generated(
                data, meta, deliveries, mark=(lifecycle.NOTICE_MARK, notice.id), remote=remote
            )
        except AlreadyMarked:  # a second leader for a moment: its commit claimed the mark first
            log.info("%s notice %d already sent by another node", notice.kind, notice.id)
            return 0
        metrics.lifecycle_notice(notice.kind, "sent")
        log.info("%s notice %d stored as qid=%s for <%s>: %s", notice.kind, notice.id, queue_id, rcpt, _summary(notice))
        return 1

    # ---- receipts --------------------------------------------------------------------------------

    def mail_stored(self, queue_id: str, meta: MessageMeta, site: Site | None) -> None:
        """Called by SMTP after each commit: a receipt (MDN) is linked to the mail it answers."""
        part = receipts.disposition_part(meta.structure)
        if part is None:
            return
        task = asyncio.ensure_future(self._link_receipt(queue_id, meta.mail_from, site, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _link_receipt(
        self, queue_id: str, sender: str, site: Site | None, part: tuple[int, int, str | None]
    ) -> None:
        start, end, encoding = part
        try:
            rows = await self.storage.messages_after(queue_id, 1, exact=True)
            if not rows:
                return  # fetched and deleted already: its accepted event still names it
            _, blob, offset, _, _ = rows[0]
            data = await asyncio.get_running_loop().run_in_executor(
                self._thread,
                _read_range,
                self.storage.blob_dir / blob,
                offset + start,
                min(end - start, receipts.MAX_FIELDS_BYTES),
            )
            receipt = receipts.parse_fields(data, encoding)
            if receipt is None:
                log.info("qid=%s: a receipt without Original-Message-ID; not linked", queue_id)
                metrics.receipt(False)
                return
            found = await self.storage.queue_op(
                lifecycle.record_receipt,
                self.clock(),
                queue_id,
                site.name if site else None,
                sender,
                receipt.original_message_id,
                receipt.disposition,
            )
        except (OSError, StorageError) as exc:
            log.warning("qid=%s: receipt not linked: %s", queue_id, exc)
            return
        metrics.receipt(found is not None)
        log.info(
            "qid=%s receipt from site=%s for %s: %s%s",
            queue_id,
            site.name if site else "-",
            receipt.original_message_id,
            receipt.disposition,
            f" (qid={found['queue_id']} set={found['set_id'] or '-'})" if found else " (mail unknown)",
        )

    # ---- study metrics -----------------------------------------------------------------------------

    async def update_study_metrics(self) -> tuple[int, int]:
        now = self.clock()
        rows = await self._read(lifecycle.study_rows, now - STUDY_WINDOW_DAYS * DAY)
        unfetched, unacknowledged = study_alerts(rows, now, self.settings.study_alert_hours * 3600)
        metrics.STUDIES_UNFETCHED.set(unfetched)
        metrics.STUDIES_UNACKNOWLEDGED.set(unacknowledged)
        return unfetched, unacknowledged

    async def control_expire(self, request: dict) -> dict:
        """Control command mailbox.expire {"dry_run": bool} (`mailhub mailbox expire`)."""
        return await self.expire_now(bool(request.get("dry_run")))


def _batches(groups: list[lifecycle.ExpiryGroup]) -> list[list[lifecycle.ExpiryGroup]]:
    """Groups in batches of about EXPIRY_BATCH entries (a group, one study, is never split)."""
    batches: list[list[lifecycle.ExpiryGroup]] = []
    size = EXPIRY_BATCH
    for group in groups:
        if size >= EXPIRY_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group.uids)
    return batches


def study_alerts(rows: list[tuple[Any, ...]], now: float, after: float) -> tuple[int, int]:
    """(complete studies with parts unfetched, studies fetched complete with a part still without
    its receipt: an MDN answers one mail), each per receiving site and older than `after` seconds,
    from storage.lifecycle.study_rows."""
    unfetched = unacknowledged = 0
    for _, _, total, parts, _, last_accepted, _, downloaded, last_download, receipts_, _, _, waiting in rows:
        complete = total is not None and parts >= total
        if complete and waiting > 0 and now - last_accepted >= after:
            unfetched += 1
        if complete and downloaded >= total and receipts_ < total and last_download and now - last_download >= after:
            unacknowledged += 1
    return unfetched, unacknowledged


def _read_range(path: Any, start: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(max(0, size))


def plan_report(todo: Plan, now: float) -> dict[str, Any]:
    def entry(e: lifecycle.Waiting, expires_at: float | None = None) -> dict[str, Any]:
        return {
            "site": e.site,
            "queue_id": e.queue_id,
            "size": e.size,
            "sender": e.mail_from,
            "message_id": e.message_id,
            "set_id": e.set_id,
            "set_part": e.set_part,
            "set_total": e.set_total,
            "delivered_at": e.delivered_at,
            "expires_at": expires_at if expires_at is not None else e.delivered_at + e.retention_days * DAY,
        }

    warned = [entry(todo.entries[uid], group.expires_at.get(uid)) for group in todo.warn for uid in group.uids]
    return {
        "now": now,
        "expire": [entry(e) for e in todo.expiring()],
        "warn": warned,
        "studies": len(todo.expire),
    }


def _summary(notice: lifecycle.Notice) -> str:
    facts = notice.facts
    mails = facts.get("mails") or []
    if notice.kind.startswith("quota"):
        return f"site {facts.get('site')} {facts.get('percent', 0):.0f}% full (level {facts.get('level')}%)"
    return f"site {facts.get('site')}, {len(mails)} mail(s)" + (
        f", set {facts['set_id']}" if facts.get("set_id") else ""
    )

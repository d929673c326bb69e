# Site liveness (issue 26): which sites are stale (mail waiting that they have not fetched for
# liveness.stale_after), the per-site liveness metrics read at scrape time, and the monitor that
# looks at every site each liveness.check_interval and sends a notice when a site goes stale and
# when it recovers (to its contact address with liveness.notify_sites, and to the operator,
# lifecycle.operator_address, with liveness.notify_operator).
# "Waiting" is storage.liveness's one definition. The stale/recovered state is kept in the index
# (storage.liveness.mark_stale/mark_recovered), so a restart sends no notice twice.
# Must never: block the event loop on the index (reads run in a worker thread), hold SQL of its own,
# or let a failed notice stop the monitor.
import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from relay.outbound.routes import route_for
from storage import liveness, sql
from storage.errors import StorageError
from storage.index import IndexLocation
from storage.liveness import SiteLiveness
from storage.records import Delivery, MessageMeta

from .report_format import human_size, iso_time

log = logging.getLogger("mailhub.liveness")

Clock = Callable[[], float]


def stale_at(site: SiteLiveness, stale_after: float) -> float | None:
    """When the site is (or will be) stale if it fetches nothing meanwhile: stale_after after the
    later of its last fetch and the delivery of its oldest waiting mail; None with nothing waiting."""
    if site.waiting_messages <= 0 or site.oldest_waiting_at is None:
        return None
    return max(site.last_fetch_at or 0.0, site.oldest_waiting_at) + stale_after


def is_stale(site: SiteLiveness, stale_after: float, now: float) -> bool:
    due = stale_at(site, stale_after)
    return due is not None and now >= due


def summary(site: SiteLiveness, stale_after: float, now: float) -> dict:
    """One site's liveness as `mailhub stats` and `mailhub site show` print it (--json)."""
    oldest = site.oldest_waiting_at
    return {
        "site": site.name,
        "contact": site.contact,
        "waiting_messages": site.waiting_messages,
        "waiting_bytes": site.waiting_bytes,
        "held_messages": site.held_messages,
        "held_bytes": site.held_bytes,
        "oldest_waiting_at": iso_time(oldest) if oldest is not None else None,
        "oldest_waiting_age_seconds": round(now - oldest, 3) if oldest is not None else 0.0,
        "last_login_at": iso_time(site.last_login_at) if site.last_login_at else None,
        "last_fetch_at": iso_time(site.last_fetch_at) if site.last_fetch_at else None,
        "stale": is_stale(site, stale_after, now),
        "stale_since": iso_time(site.stale_since) if site.stale_since else None,
    }


def render(s: dict) -> str:
    """One line: a site's liveness in words."""
    state = "STALE" if s["stale"] else "ok"
    waiting = f"{s['waiting_messages']} waiting ({human_size(s['waiting_bytes'])})"
    if s["waiting_messages"]:
        waiting += f", oldest {_age(s['oldest_waiting_age_seconds'])} old"
    return f"{state}: {waiting}; last login {s['last_login_at'] or 'never'}; last fetch {s['last_fetch_at'] or 'never'}"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ---- metrics (read at scrape time, in the scrape's worker thread) --------------------------------


class LivenessCollector:
    """Per-site waiting mail, oldest waiting age, last login and fetch, and stale (0/1), from one
    query over the index (cached for `ttl` seconds) on a read-only connection of its own."""

    def __init__(self, index: "IndexLocation | Path", stale_after: float, clock: Clock = time.time, ttl: float = 10.0):
        self.index = index if isinstance(index, IndexLocation) else IndexLocation(Path(index))
        self.stale_after = stale_after
        self.clock = clock
        self.ttl = ttl
        self._lock = threading.Lock()
        self._conn: sql.Connection | None = None
        self._cached: tuple[float, list[SiteLiveness]] | None = None

    def _rows(self) -> list[SiteLiveness]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl:
                return self._cached[1]
            if self._conn is None:
                self._conn = liveness.open_reader(self.index)
            try:
                rows = liveness.read(self._conn)
            except sqlite3.Error:
                self._conn.close()  # the next scrape connects again (a PostgreSQL server restarted, ...)
                self._conn = None
                raise
            self._cached = (now, rows)
            return rows

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self._rows()
        except (sqlite3.Error, StorageError) as exc:
            log.warning("liveness metrics unavailable: %s", exc)
            return
        now = self.clock()
        families = {
            "messages": GaugeMetricFamily(
                "mailhub_site_waiting_messages",
                "Mails waiting for each site: in its mailbox and not fetched yet by it"
                " (by POP3 RETR or a whole IMAP body).",
                labels=["site"],
            ),
            "bytes": GaugeMetricFamily(
                "mailhub_site_waiting_bytes",
                "Octets waiting for each site that it has not fetched yet"
                " (the backlog the drain time is computed from).",
                labels=["site"],
            ),
            "age": GaugeMetricFamily(
                "mailhub_site_oldest_waiting_age_seconds",
                "Age of the oldest mail each site has not fetched yet (0 with nothing waiting).",
                labels=["site"],
            ),
            "login": GaugeMetricFamily(
                "mailhub_site_last_login_timestamp_seconds",
                "Login time of each site's latest POP3/IMAP session recorded (at its end, or at its first "
                "fetch or expunge); absent for a site that never logged in.",
                labels=["site"],
            ),
            "fetch": GaugeMetricFamily(
                "mailhub_site_last_fetch_timestamp_seconds",
                "Time each site last fetched a whole mail; absent for a site that never did.",
                labels=["site"],
            ),
            "stale": GaugeMetricFamily(
                "mailhub_site_stale",
                "1 while a site is stale: mail waiting and no fetch for liveness.stale_after seconds.",
                labels=["site"],
            ),
        }
        for site in rows:
            label = [site.name]
            families["messages"].add_metric(label, site.waiting_messages)
            families["bytes"].add_metric(label, site.waiting_bytes)
            age = now - site.oldest_waiting_at if site.oldest_waiting_at is not None else 0.0
            families["age"].add_metric(label, max(age, 0.0))
            if site.last_login_at:
                families["login"].add_metric(label, site.last_login_at)
            if site.last_fetch_at:
                families["fetch"].add_metric(label, site.last_fetch_at)
            families["stale"].add_metric(label, 1.0 if is_stale(site, self.stale_after, now) else 0.0)
        yield from families.values()
        yield GaugeMetricFamily(
            "mailhub_liveness_stale_after_seconds", "The configured liveness.stale_after.", value=self.stale_after
        )

    def describe(self) -> list[Metric]:
        return []

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# ---- the monitor (a background task of the hub) ----------------------------------------------------


class LivenessMonitor:
    """Looks at every site each check_interval; on a change to stale or back, sends the notices and
    then records the new state in the index."""

    def __init__(self, cfg, storage, sites, clock: Clock = time.time):
        self.cfg = cfg
        self.is_leader: Callable[[], bool] = lambda: True  # a cluster's leader alone sends the notices
        self.storage = storage  # storage.Storage: queue_op, store_generated
        self.sites = sites  # storage.SiteCache: whose address is a contact
        self.clock = clock

    async def run(self) -> None:
        while True:
            interval = self.cfg.liveness.check_interval  # a reload may change it (mailhub/reload.py)
            try:
                if self.is_leader():  # several nodes on one index: the cluster's leader sends the notices
                    await self.check()
            except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
                log.error("liveness check failed (tried again in %.0f s): %s", interval, exc)
            except Exception:
                log.exception("liveness check failed (tried again in %.0f s)", interval)
            await asyncio.sleep(interval)

    async def check(self) -> list[tuple[str, str]]:
        """One look at every site; returns the changes made, [(site, 'stale' | 'recovered')]."""
        rows = await asyncio.to_thread(self._read)
        now = self.clock()
        stale_after = self.cfg.liveness.stale_after
        changes = []
        for site in rows:
            stale = is_stale(site, stale_after, now)
            if stale and site.stale_since is None:
                since = stale_at(site, stale_after) or now
                log.warning("site=%s is stale: %s", site.name, render(summary(site, stale_after, now)))
                await self._notify(site, "stale", summary(site, stale_after, now))
                await self.storage.queue_op(liveness.mark_stale, site.site_id, since, now)
                changes.append((site.name, "stale"))
            elif not stale and site.stale_since is not None:
                log.info("site=%s recovered: %s", site.name, render(summary(site, stale_after, now)))
                await self._notify(site, "recovered", summary(site, stale_after, now))
                await self.storage.queue_op(liveness.mark_recovered, site.site_id)
                changes.append((site.name, "recovered"))
        return changes

    def _read(self) -> list[SiteLiveness]:
        """In a worker thread, on a connection of its own that it closes itself: a read still
        running when the hub stops (its task cancelled) never meets a connection closed under it."""
        conn = liveness.open_reader(self.cfg.index_location)
        try:
            return liveness.read(conn)
        finally:
            conn.close()

    async def _notify(self, site: SiteLiveness, change: str, figures: dict) -> None:
        recipients = []
        if self.cfg.liveness.notify_sites and site.contact:
            recipients.append(site.contact)
        if self.cfg.liveness.notify_operator and self.cfg.lifecycle.operator_address:
            recipients.append(self.cfg.lifecycle.operator_address)
        for address in dict.fromkeys(recipients):
            try:
                await self._send(address, notice(self.cfg, site.name, change, figures, address, self.clock()))
            except Exception as exc:  # the state change stands; the log line says what was not sent
                log.error("site=%s: %s notice to <%s> not sent: %s", site.name, change, address, exc)

    async def _send(self, address: str, data: bytes) -> None:
        """Into the mailbox of the site that owns the address, or to the outbound queue along a route."""
        meta = MessageMeta("", None, data.startswith(b".") or b"\n." in data)
        owner = self.sites.by_address(address)
        relay = self.cfg.relay
        if owner is not None:
            await self.storage.store_generated(data, meta, [Delivery(owner.id, address, owner.name)])
        elif relay.enabled and route_for(list(relay.routes), address) is not None:
            await self.storage.store_generated(data, meta, [], remote=[address])
        else:
            raise ValueError("not a site's address and no relay route serves it")


def notice(cfg, site: str, change: str, figures: dict, to: str, now: float) -> bytes:
    """The notice mail (CRLF, not dot-stuffed)."""
    domain = cfg.domain[0]
    msg = EmailMessage()
    msg["From"] = f"DICOM Mail Hub <postmaster@{domain}>"
    msg["To"] = to
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("liveness", domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no automatic replies
    if change == "stale":
        msg["Subject"] = f"[mailhub] site {site} is not fetching its mail"
        first = (
            f"Site {site} has mail waiting on the hub {cfg.hostname or domain} and has not fetched any for"
            f" {_age(cfg.liveness.stale_after)} or more. Please check its gateway (is it running, can it"
            " reach the hub, does its password still work?)."
        )
    else:
        msg["Subject"] = f"[mailhub] site {site} is fetching its mail again"
        first = f"Site {site} is no longer stale: it fetched its mail, or none is waiting any more."
    body = [
        first,
        "",
        f"  mail waiting:   {figures['waiting_messages']} ({human_size(figures['waiting_bytes'])})",
        f"  oldest waiting: {figures['oldest_waiting_at'] or '-'}",
        f"  last login:     {figures['last_login_at'] or 'never'}",
        f"  last fetch:     {figures['last_fetch_at'] or 'never'}",
        "",
        f"`mailhub site show {site}` on the hub shows more.",
    ]
    msg.set_content("\n".join(body) + "\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


__all__ = ["LivenessCollector", "LivenessMonitor", "is_stale", "notice", "render", "stale_at", "summary"]

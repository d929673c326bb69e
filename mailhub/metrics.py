# Prometheus metrics of the hub (issue 7): one registry, the metric definitions, the cheap hooks the
# protocol edges call (one counter increment per transaction, message or session, never per chunk),
# a collector that reads storage totals from the index at scrape time (cached briefly), and a small
# HTTP listener on the hub's event loop serving /metrics, /healthz and the hub's public key
# (mailhub/hub_key_http.py).
# Must never: block the event loop on a scrape (the exposition is rendered in a worker thread), or
# let a metrics failure reach an SMTP, POP3 or IMAP session.
import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from .http_server import HttpServer

log = logging.getLogger("mailhub.metrics")

disable_created_metrics()   # no *_created series: they double the series count for nothing we use
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

NO_SITE = "-"   # label value for mail from an unauthenticated peer (smtp.peer_networks)

SMTP_SESSIONS = Counter(
    "mailhub_smtp_sessions_total", "SMTP connections, by whether they were admitted or refused (and why).",
    ["outcome"], registry=REGISTRY)
SMTP_TRANSACTIONS = Counter(
    "mailhub_smtp_transactions_total",
    "SMTP mail transactions that reached the end of data, by outcome (accepted, deferred = 4xx, "
    "rejected = 5xx) and reply code.", ["outcome", "code"], registry=REGISTRY)
SMTP_REFUSALS = Counter(
    "mailhub_smtp_refusals_total", "MAIL FROM and RCPT TO commands refused by policy or limits, by command "
    "and reply code.", ["command", "code"], registry=REGISTRY)
RECEIVED_MESSAGES = Counter(
    "mailhub_smtp_received_messages_total", "Mails accepted (250 after end of data), by sending site.",
    ["site"], registry=REGISTRY)
RECEIVED_BYTES = Counter(
    "mailhub_smtp_received_bytes_total",
    "Octets of accepted mails as the site sent them (without the hub's Received: header), by sending site.",
    ["site"], registry=REGISTRY)
DELIVERED_MESSAGES = Counter(
    "mailhub_smtp_delivered_messages_total", "Mailbox entries created by accepted mails, by receiving site.",
    ["site"], registry=REGISTRY)
DELIVERED_BYTES = Counter(
    "mailhub_smtp_delivered_bytes_total", "Octets of accepted mails, counted once per receiving site.",
    ["site"], registry=REGISTRY)
INGEST_SECONDS = Histogram(
    "mailhub_smtp_ingest_duration_seconds", "Time from the end of data to the 250 reply (durable commit) "
    "of accepted mails.", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY)
POP3_SESSIONS = Counter(
    "mailhub_pop3_sessions_total", "POP3 connections, by how they ended (quit, closed, idle_timeout, "
    "login_timeout, connection_lost, error, refused).", ["outcome"], registry=REGISTRY)
POP3_MESSAGES = Counter(
    "mailhub_pop3_messages_served_total", "Whole messages sent by RETR, by site.", ["site"], registry=REGISTRY)
POP3_BYTES = Counter(
    "mailhub_pop3_served_bytes_total", "Message octets sent by RETR and TOP (before dot-stuffing), by site.",
    ["site"], registry=REGISTRY)
SMTP_DEFERRALS = Counter(
    "mailhub_smtp_deferrals_total", "Recipients (at RCPT) and mails (at end of data) deferred with a 4xx by "
    "the quota and drain-time policy, by reason (drain_time, over_fair_share, mailbox_bytes, "
    "mailbox_messages, received_per_day, ...).", ["reason"], registry=REGISTRY)
ENCRYPTION_REFUSALS = Counter(
    "mailhub_encryption_refusals_total", "Mails refused by the encryption policy at the end of data, by reason "
    "(cleartext_dicom, malformed, wrong_key, hidden_recipient).", ["reason"], registry=REGISTRY)
DIRECTORY_MAILS = Counter(
    "mailhub_directory_mails_total", "Signed participant-directory mails stored, by kind (reply to a request, "
    "update after a change, key_rotation announcing a new hub key; an update or announcement is one mail "
    "for all sites).", ["kind"], registry=REGISTRY)
IMAP_SESSIONS = Counter(
    "mailhub_imap_sessions_total", "IMAP connections, by how they ended (logout, closed, idle_timeout, "
    "login_timeout, connection_lost, error, refused).", ["outcome"], registry=REGISTRY)
IMAP_MESSAGES = Counter(
    "mailhub_imap_messages_served_total", "Whole messages sent by FETCH (BODY[], RFC822), by site.", ["site"],
    registry=REGISTRY)
IMAP_BYTES = Counter(
    "mailhub_imap_served_bytes_total", "Message octets sent as FETCH body literals, by site.", ["site"],
    registry=REGISTRY)
OUTBOUND_DELIVERIES = Counter(
    "mailhub_outbound_deliveries_total", "Outbound relay results per recipient (delivered, deferred, "
    "bounced = permanent failure, expired = lifetime exceeded).", ["outcome"], registry=REGISTRY)
LOOP_LAG = Histogram(
    "mailhub_event_loop_lag_seconds", "How late the event loop ran a callback due every 0.1 s (measured "
    "continuously; a blocked loop delays every protocol).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=REGISTRY)
LOOP_STALLS = Counter(
    "mailhub_event_loop_stalls_total", "Times the event loop was late by log.stall_threshold or more (each "
    "logged with what it was doing, within the log rate).", registry=REGISTRY)
INTERNAL_ERRORS = Counter(
    "mailhub_internal_errors_total", "Unexpected errors (bugs) met while serving a client, by protocol; each"
    " is logged in one line, its traceback at most once a minute.", ["protocol"], registry=REGISTRY)
SMTP_ABORTED = Counter(
    "mailhub_smtp_aborted_transactions_total", "Transactions that ended while their data was being received"
    " or committed, without a reply (client gone, idle timeout, shutdown, RSET between BDAT chunks), by"
    " reason.", ["reason"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "mailhub_http_requests_total", "Requests to the metrics port, by reply status (4xx and 503: refused by "
    "its limits).", ["code"], registry=REGISTRY)
DAMAGED_MAILS = Counter(
    "mailhub_damaged_mails_total", "Stored mails found damaged (bytes missing or not the ones acknowledged;"
    " refused to POP3/IMAP, copied to the quarantine, listed by `mailhub storage damaged`), by who found them:"
    " serving (size check), scrub, verify.", ["found_by"], registry=REGISTRY)
SCRUB_BYTES = Counter(
    "mailhub_scrub_verified_bytes_total", "Octets of stored mails the background scrub read and checked"
    " against their SHA-256 (storage.scrub_rate).", registry=REGISTRY)
SMTP_ACTIVE = Gauge("mailhub_smtp_sessions_active", "Open SMTP sessions.", registry=REGISTRY)
POP3_ACTIVE = Gauge("mailhub_pop3_sessions_active", "Open POP3 sessions.", registry=REGISTRY)
IMAP_ACTIVE = Gauge("mailhub_imap_sessions_active", "Open IMAP sessions.", registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "mailhub_connections_refused_total", "Connections refused at once by the connection limits, by protocol and "
    "reason (total, per_address, unauthenticated = not logged in in total, unauthenticated_per_address).",
    ["protocol", "reason"], registry=REGISTRY)
LOGIN_TIMEOUTS = Counter(
    "mailhub_login_timeouts_total", "Connections closed for not logging in within <protocol>.login_timeout (SMTP "
    "from a peer network: for not starting a transaction), by protocol.", ["protocol"], registry=REGISTRY)
LOGIN_FAILURES = Counter(
    "mailhub_login_failures_total", "Failed logins (wrong password or unknown account), by protocol.",
    ["protocol"], registry=REGISTRY)
LOGIN_PENALTIES = Counter(
    "mailhub_login_penalties_total", "Login attempts and failure replies held back by their address's penalty "
    "(auth.failure_delay), by protocol.", ["protocol"], registry=REGISTRY)
LOGIN_PENALTY_SECONDS = Counter(
    "mailhub_login_penalty_seconds_total", "Seconds logins were held back by their address's penalty, by protocol.",
    ["protocol"], registry=REGISTRY)
LOGIN_BLOCKS = Counter(
    "mailhub_login_blocks_total", "(account, address) pairs blocked for auth.block_time after "
    "auth.max_failures failures.", registry=REGISTRY)
LOGIN_REFUSED = Counter(
    "mailhub_login_refused_total", "Login attempts refused with a temporary failure and no password check, by "
    "protocol and reason (blocked = the pair is blocked, queue = the address's turn too far off, busy = too many "
    "password checks waiting).", ["protocol", "reason"], registry=REGISTRY)


# ---- hooks called by the protocol edges (cheap; they never raise into a session) -------------

_children: dict = {}


def _labelled(metric, *values):
    """metric.labels(*values), kept: labels() checks its arguments and takes a lock on every call,
    and the SMTP hooks run several times per mail."""
    child = _children.get((metric, values))
    if child is None:
        child = _children[(metric, values)] = metric.labels(*values)
    return child


def damaged_mail(found_by: str) -> None:
    _labelled(DAMAGED_MAILS, found_by).inc()


def smtp_session(outcome: str) -> None:
    _labelled(SMTP_SESSIONS, outcome).inc()


def smtp_refusal(command: str, reply: str) -> None:
    _labelled(SMTP_REFUSALS, command, reply[:3]).inc()


def internal_error(protocol: str) -> None:
    _labelled(INTERNAL_ERRORS, protocol).inc()


def smtp_aborted(reason: str) -> None:
    _labelled(SMTP_ABORTED, reason).inc()


def encryption_refusal(reason: str) -> None:
    _labelled(ENCRYPTION_REFUSALS, reason).inc()


def directory_mail(kind: str) -> None:
    _labelled(DIRECTORY_MAILS, kind).inc()


def smtp_deferral(reason: str) -> None:
    _labelled(SMTP_DEFERRALS, reason).inc()


def smtp_transaction(reply: str, size: int, sender_site: str | None, receiving_sites, seconds: float) -> None:
    """One transaction at its end of data: `receiving_sites` are the names of the mailboxes it went to."""
    code = reply[:3]
    outcome = "accepted" if code[0] == "2" else "deferred" if code[0] == "4" else "rejected"
    _labelled(SMTP_TRANSACTIONS, outcome, code).inc()
    if outcome != "accepted":
        return
    sender = sender_site or NO_SITE
    _labelled(RECEIVED_MESSAGES, sender).inc()
    _labelled(RECEIVED_BYTES, sender).inc(size)
    for name in receiving_sites:
        _labelled(DELIVERED_MESSAGES, name).inc()
        _labelled(DELIVERED_BYTES, name).inc(size)
    INGEST_SECONDS.observe(seconds)


def http_request(status: int) -> None:
    _labelled(HTTP_REQUESTS, str(status)).inc()


def pop3_message(site: str, octets: int, whole: bool) -> None:
    if whole:
        _labelled(POP3_MESSAGES, site).inc()
    _labelled(POP3_BYTES, site).inc(octets)


def outbound_delivery(outcome: str) -> None:
    _labelled(OUTBOUND_DELIVERIES, outcome).inc()


def pop3_session(outcome: str) -> None:
    """`outcome` as the POP3 adapter logs it; details after the first word are dropped."""
    _labelled(POP3_SESSIONS, _session_outcome(outcome, "quit")).inc()


def imap_message(site: str, octets: int, whole: bool) -> None:
    if whole:
        _labelled(IMAP_MESSAGES, site).inc()
    _labelled(IMAP_BYTES, site).inc(octets)


def imap_session(outcome: str) -> None:
    """`outcome` as the IMAP adapter logs it."""
    _labelled(IMAP_SESSIONS, _session_outcome(outcome, "logout")).inc()


def connection_refused(protocol: str, reason: str) -> None:
    _labelled(CONNECTIONS_REFUSED, protocol, reason).inc()


def login_timeout(protocol: str) -> None:
    _labelled(LOGIN_TIMEOUTS, protocol).inc()


def login_failure(protocol: str) -> None:
    _labelled(LOGIN_FAILURES, protocol).inc()


def login_penalty(protocol: str, seconds: float) -> None:
    _labelled(LOGIN_PENALTIES, protocol).inc()
    _labelled(LOGIN_PENALTY_SECONDS, protocol).inc(seconds)


def login_block() -> None:
    LOGIN_BLOCKS.inc()


def login_refused(protocol: str, reason: str) -> None:
    _labelled(LOGIN_REFUSED, protocol, reason).inc()


def _session_outcome(outcome: str, clean_end: str) -> str:
    if outcome.startswith("connection lost"):
        key = "connection_lost"
    elif outcome.startswith(("I/O error", "internal error")):
        key = "error"
    elif outcome in ("idle timeout", "login timeout"):
        key = outcome.replace(" ", "_")
    elif outcome in (clean_end, "refused"):
        key = outcome
    else:
        key = "closed"
    return key


# ---- storage and disk, read at scrape time ----------------------------------------------------

class StorageCollector:
    """Blob count and bytes and each site's mailbox backlog from the index (two aggregate queries,
    cached for `ttl` seconds) and the data folder's file system. Runs in the scrape's worker thread
    on its own read-only connection."""

    def __init__(self, data_dir: Path, ttl: float = 10.0):
        self.data_dir = Path(data_dir)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._cached: tuple[float, tuple] | None = None

    def _totals(self) -> tuple[tuple[int, int, int], list[tuple[str, int, int, float | None]],
                               tuple[int, float | None]]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl:
                return self._cached[1]
            if self._conn is None:
                uri = (self.data_dir / "index.sqlite3").resolve().as_uri() + "?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5)
            row = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(size * (refs - 1)), 0)"
                " FROM messages").fetchone()
            backlog = self._conn.execute(
                "SELECT s.name, count(b.uid), coalesce(sum(m.size), 0), min(b.delivered_at) FROM sites s"
                " LEFT JOIN mailbox b ON b.site_id = s.id LEFT JOIN messages m ON m.queue_id = b.queue_id"
                " GROUP BY s.id ORDER BY s.name").fetchall()
            queued = self._conn.execute("SELECT count(DISTINCT queue_id), min(queued_at) FROM outbound").fetchone()
            totals = ((int(row[0]), int(row[1]), int(row[2])), backlog, queued, _quarantine_totals(self.data_dir))
            self._cached = (now, totals)
            return totals

    def collect(self):
        try:
            (blobs, size, saved), backlog, (queued, oldest_queued), (quarantined, quarantined_bytes) = self._totals()
        except sqlite3.Error as exc:
            log.warning("storage metrics unavailable: %s", exc)
        else:
            yield GaugeMetricFamily("mailhub_storage_blobs", "Messages in storage (one blob each, however many"
                                    " recipients; small ones share pack files).", value=blobs)
            yield GaugeMetricFamily("mailhub_storage_blobs_bytes", "Octets of the messages in storage.",
                                    value=size)
            yield GaugeMetricFamily("mailhub_storage_single_instance_saved_bytes",
                                    "Octets not stored thanks to one blob per mail however many recipients.",
                                    value=saved)
            messages = GaugeMetricFamily("mailhub_mailbox_messages", "Messages waiting in each site's mailbox.",
                                         labels=["site"])
            octets = GaugeMetricFamily("mailhub_mailbox_bytes", "Octets waiting in each site's mailbox.",
                                       labels=["site"])
            oldest = GaugeMetricFamily("mailhub_mailbox_oldest_message_timestamp_seconds",
                                       "Delivery time of the oldest message in each non-empty mailbox.",
                                       labels=["site"])
            for name, count, total, first in backlog:
                messages.add_metric([name], count)
                octets.add_metric([name], total)
                if first is not None:
                    oldest.add_metric([name], first)
            yield messages
            yield octets
            yield oldest
            yield GaugeMetricFamily("mailhub_outbound_queue_messages",
                                    "Messages waiting in the outbound relay queue.", value=queued)
            entries = GaugeMetricFamily("mailhub_quarantine_entries", "Items the hub moved aside instead of deleting"
                                        " (docs/storage.md), by reason (uncommitted_blob, missing_blob, damaged...).",
                                        labels=["reason"])
            for reason, count in sorted(quarantined.items()):
                entries.add_metric([reason], count)
            yield entries
            yield GaugeMetricFamily("mailhub_quarantine_bytes", "Octets held in the quarantine.",
                                    value=quarantined_bytes)
            yield GaugeMetricFamily("mailhub_outbound_queue_oldest_age_seconds",
                                    "Age of the oldest message in the outbound queue (0 when empty).",
                                    value=time.time() - oldest_queued if oldest_queued else 0)
        try:
            st = os.statvfs(self.data_dir)
        except OSError as exc:
            log.warning("disk metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily("mailhub_disk_free_bytes", "Free octets (for unprivileged users) on the data "
                                "folder's file system.", value=st.f_bavail * st.f_frsize)
        yield GaugeMetricFamily("mailhub_disk_size_bytes", "Size of the data folder's file system.",
                                value=st.f_blocks * st.f_frsize)

    def describe(self):
        return []   # collected lazily: no scrape-time query at registration

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _quarantine_totals(data_dir: Path) -> tuple[dict[str, int], int]:
    """Entries per reason and bytes of the quarantine (storage.quarantine)."""
    from storage.quarantine import list_entries

    reasons: dict[str, int] = {}
    size = 0
    try:
        entries = list_entries(data_dir)
    except OSError as exc:
        log.warning("quarantine metrics unavailable: %s", exc)
        entries = []
    for entry in entries:
        reasons[entry.reason] = reasons.get(entry.reason, 0) + 1
        size += entry.size
    return reasons, size


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class ThrottleCollector:
    """Per-site drain and quota figures; the throttle loop hands over a fresh list each interval
    (site name, state dict of quotas.Throttle.state), so a scrape never touches live state."""

    def __init__(self):
        self.states: list[tuple[str, dict]] = []

    def collect(self):
        rate = GaugeMetricFamily("mailhub_site_drain_rate_bytes_per_second", "Estimated rate at which each "
                                 "site downloads its waiting mail (0 while it does not poll).", labels=["site"])
        drain = GaugeMetricFamily("mailhub_site_drain_time_seconds", "Time each site needs to download the "
                                  "mail waiting for it at its drain rate (+Inf when not draining).", labels=["site"])
        limit = GaugeMetricFamily("mailhub_site_max_drain_time_seconds", "Each site's drain-time limit.",
                                  labels=["site"])
        waiting = GaugeMetricFamily("mailhub_site_waiting_bytes", "Octets waiting for each site that it has "
                                    "not downloaded yet (the backlog the drain time is computed from).",
                                    labels=["site"])
        paced = GaugeMetricFamily("mailhub_site_pacing_rate_bytes_per_second", "Rate at which senders' data "
                                  "for each site is read while paced (0: not paced).", labels=["site"])
        ratios = GaugeMetricFamily("mailhub_site_quota_usage_ratio", "Usage of each limited quota of each site "
                                   "(1 = at the limit).", labels=["site", "quota"])
        for name, state in self.states:
            rate.add_metric([name], state["drain_rate"])
            drain.add_metric([name], state["drain_time"])
            limit.add_metric([name], state["max_drain_time"])
            waiting.add_metric([name], state["backlog_bytes"])
            paced.add_metric([name], state["paced_rate"] or 0.0)
            for quota, ratio in state["usage_ratios"].items():
                ratios.add_metric([name, quota], ratio)
        yield from (rate, drain, limit, waiting, paced, ratios)

    def describe(self):
        return []


THROTTLE = ThrottleCollector()
REGISTRY.register(THROTTLE)


class MemoryBudgetCollector:
    """The memory budget of mails in flight (storage.MemoryBudget), read at scrape time."""

    def __init__(self):
        self.budget = None

    def collect(self):
        budget = self.budget
        if budget is None:
            return
        yield GaugeMetricFamily("mailhub_ingest_memory_bytes", "Bytes of mails in flight held in memory"
                                " (read buffers, queued for the spool files, small mails waiting for their"
                                " commit).",
                                value=budget.held)
        yield GaugeMetricFamily("mailhub_ingest_memory_peak_bytes", "The most bytes of mails in flight held in"
                                " memory at once since the start (the budget may be overshot by one"
                                " read per session).", value=budget.peak)
        yield GaugeMetricFamily("mailhub_ingest_memory_budget_bytes", "The budget of memory for mails in"
                                " flight (smtp.memory_budget).", value=budget.limit)
        yield CounterMetricFamily("mailhub_ingest_memory_spills", "Mails in flight sent to their spool file"
                                  " early because the memory budget was reached.", value=budget.spills)
        yield CounterMetricFamily("mailhub_ingest_memory_waits", "Times a session stopped reading its"
                                  " sender's data until memory was freed (budget reached).", value=budget.waits)

    def describe(self):
        return []


MEMORY_BUDGET = MemoryBudgetCollector()
REGISTRY.register(MEMORY_BUDGET)


# ---- the HTTP port's routes (mailhub/http_server.py serves them) -------------------------------

class MetricsServer:
    """GET /metrics (Prometheus text format), GET /healthz (200 "ok" or 503 with the reasons), and the
    hub key's paths when `key_routes` is given."""

    def __init__(self, data_dir: Path, min_free_bytes: int, listeners_up, smtp_sessions, pop3_sessions,
                 imap_sessions=lambda: 0, key_routes=None):
        self.data_dir = Path(data_dir)
        self.key_routes = key_routes        # a HubKeyRoutes, or None
        self.min_free_bytes = min_free_bytes
        self.listeners_up = listeners_up    # () -> list of names of listeners not serving
        self.collector = StorageCollector(self.data_dir)
        SMTP_ACTIVE.set_function(smtp_sessions)
        POP3_ACTIVE.set_function(pop3_sessions)
        IMAP_ACTIVE.set_function(imap_sessions)
        REGISTRY.register(self.collector)
        self.handle = HttpServer(self._route, http_request).handle   # the asyncio.start_server callback
        self._running: dict[str, asyncio.Future] = {}   # what concurrent requests share

    def close(self) -> None:
        REGISTRY.unregister(self.collector)
        self.collector.close()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            body = await self._shared("metrics", lambda: asyncio.to_thread(generate_latest, REGISTRY))
            return "200 OK", CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            problems = await self._shared("healthz", self.health)
            if problems:
                return "503 Service Unavailable", "text/plain", ("; ".join(problems) + "\n").encode()
            return "200 OK", "text/plain", b"ok\n"
        if self.key_routes is not None and (found := self.key_routes.route(path)) is not None:
            return found
        return "404 Not Found", "text/plain", b"not found\n"

    async def _shared(self, name: str, start):
        """The result of the run of start() in progress, or of a new one: a flood of requests costs
        one exposition (or health probe) at a time."""
        running = self._running.get(name)
        if running is None:
            running = self._running[name] = asyncio.ensure_future(start())
            running.add_done_callback(lambda _: self._running.pop(name, None))
        return await asyncio.shield(running)

    async def health(self) -> list[str]:
        problems = []
        try:
            await asyncio.to_thread(self._write_probe)
        except OSError as exc:
            problems.append(f"storage not writable: {exc.strerror or exc}")
        try:
            free = free_bytes(self.data_dir)
            if free < self.min_free_bytes:
                problems.append(f"disk low: {free} bytes free, floor {self.min_free_bytes}")
        except OSError as exc:
            problems.append(f"disk unknown: {exc.strerror or exc}")
        down = self.listeners_up()
        if down:
            problems.append("listeners down: " + ", ".join(down))
        return problems

    def _write_probe(self) -> None:
        probe = self.data_dir / "spool" / f"healthz-{os.getpid()}.probe"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)

# Prometheus metrics of storage, in a registry of the storage package's own (mailhub/metrics.py adds
# it to the one it exposes): damaged mails, scrub progress and the object store's downloads,
# evictions and failed uploads (counted through the hooks the hub wires into Storage, Scrub and
# ObjectBlobs), the memory budget of mails in flight, and StorageCollector, which
# reads the index totals (portable SQL: on SQLite or, through a `connect` given, PostgreSQL), the
# quarantine and the data folder's file system at scrape time.
# Must never: run on the event loop (the collectors run in the scrape's worker thread), write to the
# index, or import from relay/ or mailhub/.
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from . import sql
from .errors import StorageError
from .memory_budget import MemoryBudget
from .quarantine import list_entries

log = logging.getLogger("mailhub.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

DAMAGED_MAILS = Counter(
    "mailhub_damaged_mails_total",
    "Stored mails found damaged (bytes missing or not the ones acknowledged;"
    " refused to POP3/IMAP, copied to the quarantine, listed by `mailhub storage damaged`), by who found them:"
    " serving (size check), scrub, verify.",
    ["found_by"],
    registry=REGISTRY,
)
SCRUB_BYTES = Counter(
    "mailhub_scrub_verified_bytes_total",
    "Octets of stored mails the background scrub read and checked against their SHA-256 (storage.scrub_rate).",
    registry=REGISTRY,
)

OBJECT_DOWNLOADS = Counter(
    "mailhub_object_store_downloads_total",
    "Mails downloaded from the object store into the node's cache to be served (storage.blobs = s3://...).",
    registry=REGISTRY,
)
OBJECT_EVICTIONS = Counter(
    "mailhub_object_store_cache_evictions_total",
    "Cached mails removed from the node's cache past storage.cache_bytes (their objects stay).",
    registry=REGISTRY,
)
OBJECT_UPLOAD_FAILURES = Counter(
    "mailhub_object_store_upload_failures_total",
    "Mails answered 451 4.3.0 because the object store did not confirm their upload.",
    registry=REGISTRY,
)


def damaged_mail(found_by: str) -> None:
    DAMAGED_MAILS.labels(found_by).inc()


# (messages, octets, octets saved by sharing), per site (name, mails, octets, oldest delivery),
# outbound (messages, oldest queued), quarantine (entries per reason, octets)
_Totals = tuple[
    tuple[int, int, int],
    list[tuple[str, int, int, float | None]],
    tuple[int, float | None],
    tuple[dict[str, int], int],
]


class StorageCollector:
    """Blob count and bytes and each site's mailbox backlog from the index (two aggregate queries,
    cached for `ttl` seconds) and the data folder's file system. Runs in the scrape's worker thread
    on its own read-only connection (`connect`: default the data folder's SQLite index, read-only)."""

    def __init__(self, data_dir: Path, ttl: float = 10.0, connect: Callable[[], sql.Connection] | None = None):
        self.data_dir = Path(data_dir)
        self.ttl = ttl
        self._connect = connect or self._sqlite_readonly
        self._lock = threading.Lock()
        self._conn: sql.Connection | None = None
        self._cached: tuple[float, _Totals] | None = None

    def _sqlite_readonly(self) -> sql.Connection:
        uri = (self.data_dir / "index.sqlite3").resolve().as_uri() + "?mode=ro"
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5)

    def _totals(self) -> "_Totals":
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl:
                return self._cached[1]
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                row = conn.execute(
                    "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(size * (refs - 1)), 0) FROM messages"
                ).fetchone()
                # held per site from mailbox_usage (kept by triggers), the oldest as the first entry in
                # arrival order (mailbox_site index): no pass over every mailbox entry per scrape
                backlog = conn.execute(
                    "SELECT s.name, coalesce(sum(u.held_messages), 0), coalesce(sum(u.held_bytes), 0),"
                    " (SELECT b.delivered_at FROM mailbox b WHERE b.site_id = s.id ORDER BY b.uid LIMIT 1) FROM sites s"
                    " LEFT JOIN mailbox_usage u ON u.receiver_id = s.id GROUP BY s.id ORDER BY s.name"
                ).fetchall()
                queued = conn.execute("SELECT count(DISTINCT queue_id), min(queued_at) FROM outbound").fetchone()
            except (sqlite3.Error, StorageError):
                self._conn = None  # the next scrape connects again (a PostgreSQL server restarted, ...)
                conn.close()
                raise
            totals: _Totals = (
                (int(row[0]), int(row[1]), int(row[2])),
                backlog,
                queued,
                _quarantine_totals(self.data_dir),
            )
            self._cached = (now, totals)
            return totals

    def collect(self) -> Iterator[Metric]:
        try:
            (blobs, size, saved), backlog, (queued, oldest_queued), (quarantined, quarantined_bytes) = self._totals()
        except (sqlite3.Error, StorageError) as exc:
            log.warning("storage metrics unavailable: %s", exc)
        else:
            yield GaugeMetricFamily(
                "mailhub_storage_blobs",
                "Messages in storage (one blob each, however many recipients; small ones share pack files).",
                value=blobs,
            )
            yield GaugeMetricFamily("mailhub_storage_blobs_bytes", "Octets of the messages in storage.", value=size)
            yield GaugeMetricFamily(
                "mailhub_storage_single_instance_saved_bytes",
                "Octets not stored thanks to one blob per mail however many recipients.",
                value=saved,
            )
            messages = GaugeMetricFamily(
                "mailhub_mailbox_messages",
                "Messages held in each site's mailbox, fetched or not (what its mailbox quota counts;"
                " mailhub_site_waiting_messages: those not fetched yet).",
                labels=["site"],
            )
            octets = GaugeMetricFamily(
                "mailhub_mailbox_bytes",
                "Octets held in each site's mailbox, fetched or not (what its mailbox quota counts).",
                labels=["site"],
            )
            oldest = GaugeMetricFamily(
                "mailhub_mailbox_oldest_message_timestamp_seconds",
                "Delivery time of the oldest message held in each non-empty mailbox, fetched or not.",
                labels=["site"],
            )
            for name, count, total, first in backlog:
                messages.add_metric([name], count)
                octets.add_metric([name], total)
                if first is not None:
                    oldest.add_metric([name], first)
            yield messages
            yield octets
            yield oldest
            yield GaugeMetricFamily(
                "mailhub_outbound_queue_messages", "Messages waiting in the outbound relay queue.", value=queued
            )
            entries = GaugeMetricFamily(
                "mailhub_quarantine_entries",
                "Items the hub moved aside instead of deleting"
                " (docs/storage.md), by reason (uncommitted_blob, missing_blob, damaged...).",
                labels=["reason"],
            )
            for reason, count in sorted(quarantined.items()):
                entries.add_metric([reason], count)
            yield entries
            yield GaugeMetricFamily(
                "mailhub_quarantine_bytes", "Octets held in the quarantine.", value=quarantined_bytes
            )
            yield GaugeMetricFamily(
                "mailhub_outbound_queue_oldest_age_seconds",
                "Age of the oldest message in the outbound queue (0 when empty).",
                value=time.time() - oldest_queued if oldest_queued else 0,
            )
        try:
            st = os.statvfs(self.data_dir)
        except OSError as exc:
            log.warning("disk metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily(
            "mailhub_disk_free_bytes",
            "Free octets (for unprivileged users) on the data folder's file system.",
            value=st.f_bavail * st.f_frsize,
        )
        yield GaugeMetricFamily(
            "mailhub_disk_size_bytes", "Size of the data folder's file system.", value=st.f_blocks * st.f_frsize
        )

    def describe(self) -> list[Metric]:
        return []  # collected lazily: no scrape-time query at registration

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _quarantine_totals(data_dir: Path) -> tuple[dict[str, int], int]:
    """Entries per reason and bytes of the quarantine (storage.quarantine)."""
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


class MemoryBudgetCollector:
    """The memory budget of mails in flight (storage.MemoryBudget), read at scrape time."""

    def __init__(self) -> None:
        self.budget: MemoryBudget | None = None

    def collect(self) -> Iterator[Metric]:
        budget = self.budget
        if budget is None:
            return
        yield GaugeMetricFamily(
            "mailhub_ingest_memory_bytes",
            "Bytes of mails in flight held in memory"
            " (read buffers, queued for the spool files, small mails waiting for their"
            " commit).",
            value=budget.held,
        )
        yield GaugeMetricFamily(
            "mailhub_ingest_memory_peak_bytes",
            "The most bytes of mails in flight held in"
            " memory at once since the start (the budget may be overshot by one"
            " read per session).",
            value=budget.peak,
        )
        yield GaugeMetricFamily(
            "mailhub_ingest_memory_budget_bytes",
            "The budget of memory for mails in flight (smtp.memory_budget).",
            value=budget.limit,
        )
        yield CounterMetricFamily(
            "mailhub_ingest_memory_spills",
            "Mails in flight sent to their spool file early because the memory budget was reached.",
            value=budget.spills,
        )
        yield CounterMetricFamily(
            "mailhub_ingest_memory_waits",
            "Times a session stopped reading its sender's data until memory was freed (budget reached).",
            value=budget.waits,
        )

    def describe(self) -> list[Metric]:
        return []


MEMORY_BUDGET = MemoryBudgetCollector()
REGISTRY.register(MEMORY_BUDGET)

# Prometheus metrics of the hub process (issue 7): the registry /metrics exposes, which gathers the
# registries of the layers below (relay.metrics, storage.metrics, directory.metrics: each layer
# defines the metrics of what it owns), the process's own metrics (event loop, HTTP port, per-site
# throttle state), and the small HTTP listener on the hub's event loop serving /metrics, /healthz and
# the hub's public key (mailhub/hub_key_http.py).
# Must never: block the event loop on a scrape (the exposition is rendered in a worker thread), or
# let a metrics failure reach an SMTP, POP3 or IMAP session.
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

import directory.metrics
import relay.metrics
import storage.metrics
from relay.metrics import IMAP_ACTIVE, POP3_ACTIVE, SMTP_ACTIVE
from storage.index import IndexLocation
from storage.metrics import StorageCollector

from .http_server import HttpServer
from .liveness import LivenessCollector
from .tls_metrics import CertificateCollector

log = logging.getLogger("mailhub.metrics")

disable_created_metrics()  # no *_created series: they double the series count for nothing we use
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
for _layer in (relay.metrics.REGISTRY, storage.metrics.REGISTRY, directory.metrics.REGISTRY):
    REGISTRY.register(_layer)  # collected at each scrape; a metric name defined twice fails here

LOOP_LAG = Histogram(
    "mailhub_event_loop_lag_seconds",
    "How late the event loop ran a callback due every 0.1 s (measured "
    "continuously; a blocked loop delays every protocol).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
LOOP_STALLS = Counter(
    "mailhub_event_loop_stalls_total",
    "Times the event loop was late by log.stall_threshold or more (each "
    "logged with what it was doing, within the log rate).",
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "mailhub_http_requests_total",
    "Requests to the metrics port, by reply status (4xx and 503: refused by its limits).",
    ["code"],
    registry=REGISTRY,
)


def http_request(status: int) -> None:
    HTTP_REQUESTS.labels(str(status)).inc()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class ThrottleCollector:
    """Per-site drain and quota figures; the throttle loop hands over a fresh list each interval
    (site name, state dict of quotas.Throttle.state), so a scrape never touches live state."""

    def __init__(self) -> None:
        self.states: list[tuple[str, dict]] = []

    def collect(self):
        rate = GaugeMetricFamily(
            "mailhub_site_drain_rate_bytes_per_second",
            "Estimated rate at which each site downloads its waiting mail (0 while it does not poll).",
            labels=["site"],
        )
        drain = GaugeMetricFamily(
            "mailhub_site_drain_time_seconds",
            "Time each site needs to download the mail waiting for it at its drain rate (+Inf when not draining).",
            labels=["site"],
        )
        limit = GaugeMetricFamily(
            "mailhub_site_max_drain_time_seconds", "Each site's drain-time limit.", labels=["site"]
        )
        paced = GaugeMetricFamily(
            "mailhub_site_pacing_rate_bytes_per_second",
            "Rate at which senders' data for each site is read while paced (0: not paced).",
            labels=["site"],
        )
        ratios = GaugeMetricFamily(
            "mailhub_site_quota_usage_ratio",
            "Usage of each limited quota of each site (1 = at the limit).",
            labels=["site", "quota"],
        )
        for name, state in self.states:
            rate.add_metric([name], state["drain_rate"])
            drain.add_metric([name], state["drain_time"])
            limit.add_metric([name], state["max_drain_time"])
            paced.add_metric([name], state["paced_rate"] or 0.0)
            for quota, ratio in state["usage_ratios"].items():
                ratios.add_metric([name, quota], ratio)
        yield from (rate, drain, limit, paced, ratios)  # waiting bytes: mailhub/liveness.py

    def describe(self):
        return []


THROTTLE = ThrottleCollector()
REGISTRY.register(THROTTLE)


class ClusterCollector:
    """The cluster link's state (several nodes on one PostgreSQL index; storage/postgres/cluster.py);
    nothing for one hub. `link` is set while the hub runs."""

    def __init__(self) -> None:
        self.link: Any = None  # a storage.postgres.cluster.ClusterLink (psycopg: not imported here)

    def collect(self):
        link = self.link
        if link is None:
            return
        yield GaugeMetricFamily(
            "mailhub_cluster_link_up",
            "1 while this node's cluster link to PostgreSQL is up.",
            value=int(link.connected),
        )
        yield GaugeMetricFamily(
            "mailhub_cluster_leader", "1 while this node runs the cluster's periodic work.", value=int(link.is_leader())
        )
        yield CounterMetricFamily(
            "mailhub_cluster_reconnects", "Times the cluster link was connected again after a loss.", link.reconnects
        )
        yield CounterMetricFamily(
            "mailhub_cluster_changes_received", "Other nodes' mailbox changes received (rows).", link.received
        )
        yield CounterMetricFamily(
            "mailhub_cluster_changes_dropped",
            "Other nodes' changes dropped (too many waiting, or a payload not ours); caught up from the index.",
            link.dropped,
        )

    def describe(self):
        return []


CLUSTER = ClusterCollector()
REGISTRY.register(CLUSTER)


class WithNodeLabel:
    """A registry's metrics with the label node="..." added to each sample (a label of that name
    already set by a metric is kept): what a cluster's nodes scraped into one Prometheus are told
    apart by, also in federated or remote-written data where the scrape's instance label is gone."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.registry = registry
        self.node = node

    def collect(self):
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={"node": self.node, **sample.labels}) for sample in family.samples
            ]
            yield labelled


# ---- the HTTP port's routes (mailhub/http_server.py serves them) -------------------------------


class MetricsServer:
    """GET /metrics (Prometheus text format), GET /healthz (200 "ok" or 503 with the reasons), and the
    hub key's paths when `key_routes` is given."""

    def __init__(
        self,
        data_dir: Path,
        min_free_bytes: int,
        listeners_up,
        smtp_sessions,
        pop3_sessions,
        imap_sessions=lambda: 0,
        key_routes=None,
        stale_after: float = 21600.0,
        cert_file: Path | None = None,
        node: str = "",
        index: IndexLocation | None = None,
    ):
        self.data_dir = Path(data_dir)
        index = index or IndexLocation(self.data_dir)
        self.key_routes = key_routes  # a HubKeyRoutes, or None
        self.min_free_bytes = min_free_bytes
        self.listeners_up = listeners_up  # () -> list of names of listeners not serving
        self.node = node  # metrics.node: the label added to every sample, or "" for none
        self.draining: str | None = None  # set while the hub shuts down or restarts: /healthz says 503
        self.collector = StorageCollector(
            self.data_dir, connect=(lambda: index.connect_readonly(any_thread=True)) if index.is_postgresql else None
        )
        SMTP_ACTIVE.set_function(smtp_sessions)
        POP3_ACTIVE.set_function(pop3_sessions)
        IMAP_ACTIVE.set_function(imap_sessions)
        REGISTRY.register(self.collector)
        self.liveness = LivenessCollector(index, stale_after)  # per-site waiting, logins, stale
        REGISTRY.register(self.liveness)
        self.certificate = CertificateCollector(cert_file)
        REGISTRY.register(self.certificate)
        self.handle = HttpServer(self._route, http_request).handle  # the asyncio.start_server callback
        self._running: dict[str, asyncio.Future] = {}  # what concurrent requests share

    def close(self) -> None:
        REGISTRY.unregister(self.collector)
        self.collector.close()
        REGISTRY.unregister(self.liveness)
        self.liveness.close()
        REGISTRY.unregister(self.certificate)

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            body = await self._shared("metrics", lambda: asyncio.to_thread(self.exposition))
            return "200 OK", CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            problems = await self._shared("healthz", self.health)
            if problems:
                return "503 Service Unavailable", "text/plain", ("; ".join(problems) + "\n").encode()
            return "200 OK", "text/plain", b"ok\n"
        if self.key_routes is not None and (found := self.key_routes.route(path)) is not None:
            return found
        return "404 Not Found", "text/plain", b"not found\n"

    def exposition(self) -> bytes:
        """The text of a scrape: every metric of REGISTRY, with node="..." added when metrics.node is set."""
        node = self.node
        return generate_latest(WithNodeLabel(REGISTRY, node) if node else REGISTRY)

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
        if self.draining is not None:  # (its listeners are closed on purpose)
            problems.append(f"draining: {self.draining}")
        elif down := self.listeners_up():
            problems.append("listeners down: " + ", ".join(down))
        if CLUSTER.link is not None and not CLUSTER.link.connected:
            problems.append("cluster link to PostgreSQL down (reconnecting)")
        return problems

    def _write_probe(self) -> None:
        probe = self.data_dir / "spool" / f"healthz-{os.getpid()}.probe"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)

# The readers that keep a copy or a total of the index outside the event loop, on both engines
# through the `index` fixture (issue 27, docs/postgresql.md): the metrics collector's scrape-time
# totals (storage.metrics.StorageCollector) and the watcher that reloads a copy when a version
# counter moves (storage.index_watch.IndexWatcher, under SiteCache and KeyRing: a site's encryption
# policy), each on connections of its own from `connect`. The site cache's own tests
# (test_site_cache.py) run on both engines too.
import logging
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from test_index_engines import add_sites, fetch, store

from directory.keys import KeyRing, set_policy
from storage import db, sites
from storage.index_watch import IndexWatcher
from storage.metrics import StorageCollector

from conftest import wait_for


def scrape(collector) -> dict[tuple, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        if isinstance(family, GaugeMetricFamily)
        for s in family.samples
    }


def test_the_storage_totals_on_both_engines(index, index_connect, tmp_path):
    alpha, beta, gamma = add_sites(index, "alpha", "beta", "gamma")
    empty = StorageCollector(tmp_path, ttl=0, connect=index_connect)
    try:
        m = scrape(empty)
        assert m[("mailhub_storage_blobs", ())] == 0 and m[("mailhub_storage_blobs_bytes", ())] == 0
        assert m[("mailhub_mailbox_messages", (("site", "beta"),))] == 0
        assert ("mailhub_mailbox_oldest_message_timestamp_seconds", (("site", "beta"),)) not in m
        assert m[("mailhub_outbound_queue_messages", ())] == 0

        store(index, "Q1", 1000, 100.0, alpha, [beta, gamma])  # one blob, two mailbox entries
        (uid,) = store(index, "Q2", 300, 200.0, beta, [beta])
        fetch(index, uid, 250.0)  # fetched, still held
        with db.transaction(index):
            for rcpt in ("x@far.test", "y@far.test"):
                index.execute(
                    "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at, attempts)"
                    " VALUES (?, ?, ?, ?, 0)",
                    ("Q1", rcpt, 150.0, 150.0),
                )
        m = scrape(empty)
    finally:
        empty.close()
    assert m[("mailhub_storage_blobs", ())] == 2
    assert m[("mailhub_storage_blobs_bytes", ())] == 1300
    assert m[("mailhub_storage_single_instance_saved_bytes", ())] == 1000
    assert m[("mailhub_mailbox_messages", (("site", "beta"),))] == 2
    assert m[("mailhub_mailbox_bytes", (("site", "beta"),))] == 1300
    assert m[("mailhub_mailbox_oldest_message_timestamp_seconds", (("site", "beta"),))] == 100.0
    assert m[("mailhub_mailbox_messages", (("site", "gamma"),))] == 1
    assert m[("mailhub_mailbox_messages", (("site", "alpha"),))] == 0
    assert [k[1] for k in m if k[0] == "mailhub_mailbox_messages"] == [
        (("site", "alpha"),),
        (("site", "beta"),),
        (("site", "gamma"),),
    ]
    assert m[("mailhub_outbound_queue_messages", ())] == 1  # one mail, two recipients
    assert m[("mailhub_outbound_queue_oldest_age_seconds", ())] > 0


def test_an_index_error_is_logged_and_the_next_scrape_connects_again(index, index_connect, tmp_path, caplog):
    opened = []

    def counted():
        opened.append(index_connect())
        return opened[-1]

    collector = StorageCollector(tmp_path, ttl=0, connect=counted)
    try:
        assert scrape(collector)[("mailhub_storage_blobs", ())] == 0
        opened[0].close()  # the connection breaks (a server restart, a closed database)
        with caplog.at_level(logging.WARNING, "mailhub.metrics"):
            m = scrape(collector)
        assert ("mailhub_storage_blobs", ()) not in m and ("mailhub_disk_free_bytes", ()) in m
        assert "storage metrics unavailable" in caplog.text
        assert scrape(collector)[("mailhub_storage_blobs", ())] == 0
        assert len(opened) == 2
    finally:
        collector.close()


def test_the_watcher_reloads_when_the_version_moves(index, index_connect, tmp_path):
    loads: list[list[str]] = []

    def load(conn):
        loads.append([s.name for s in sites.list_sites(conn)])

    add_sites(index, "alpha")
    watcher = IndexWatcher(tmp_path, "sites", sites.sites_version, load, interval=0.05, connect=index_connect)
    try:
        assert loads == [["alpha"]]
        add_sites(index, "beta")
        wait_for(lambda: len(loads) >= 2, timeout=30, message="a second load after the version moved")
        assert loads[-1] == ["alpha", "beta"]
        time.sleep(0.2)  # a negative window: several checks with the version unchanged, no load
        assert len(loads) == 2
    finally:
        watcher.close()


def test_the_key_ring_follows_a_sites_encryption_policy(index, index_connect, tmp_path):
    (alpha,) = add_sites(index, "alpha")
    ring = KeyRing(tmp_path, connect=index_connect)
    try:
        assert not ring.encryption_required(alpha, hub_default=False) and ring.keys(alpha) == []
        set_policy(index, "alpha", "on")
        wait_for(  # reloaded within about 0.5 s
            lambda: ring.encryption_required(alpha, hub_default=False),
            timeout=30,
            message="alpha's policy 'on' loaded",
        )
        set_policy(index, "alpha", "default")
        wait_for(
            lambda: not ring.encryption_required(alpha, hub_default=False),
            timeout=30,
            message="alpha's policy 'default' loaded",
        )
        assert ring.encryption_required(alpha, hub_default=True)
    finally:
        ring.close()
